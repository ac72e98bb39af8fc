"""Evaluation of trained VAEs: ELBO, importance-sampled log-likelihood, ELBO surgery,
posterior-collapse diagnostics."""

import contextlib
import math
from typing import Optional

import torch
from torch import nn
from torch.distributions import kl_divergence

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .compiled import compiled, rng_untouched
from .arguments import check_counts, check_number
from .contract import check_data, check_model, check_model_guide
from .datasets import as_dataset
from .errors import ArgumentError
from .memory import check_fits, check_step_memory
from .objectives import (AUTO, Loss, choose_elbo, is_latent, kl_weight, plate_nesting,
                         probe_traces)
from .progress import bar
from .guides import posterior_mean
from .priors import Mixture, logsumexp


@contextlib.contextmanager
def seeded(seed: Optional[int], device=None):
    """Draw from a stream seeded with ``seed`` inside the block and leave the caller's
    random state as it was (``torch.random.fork_rng``); ``seed=None``: the global stream,
    untouched."""
    if seed is None:
        yield
        return
    if not (type(seed) is int and 0 <= seed < 2 ** 64):
        raise ArgumentError("seed", f"must be None or an integer in 0 ... 2**64 - 1, got "
                                    f"{seed!r}")
    with rng_untouched(device or "cpu"):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _evaluating(model):
    """``model.eval()`` inside the block, the caller's mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def units(model, data) -> dict:
    """What a log-likelihood (or ELBO) of ``model`` on ``data`` is measured in: nats per
    data point (per image for image data) of a probability (a discrete likelihood head:
    ``discrete = True``, see ``pyro_vae.likelihoods``) or of a density. Densities of
    continuous x are not comparable with probabilities, nor across rescalings of x."""
    data = as_dataset(data)
    discrete = bool(getattr(getattr(model, "likelihood", None), "discrete", False))
    per = "image" if data.image_shape else "data point"
    return {"units": f"nats per {per}",
            "likelihood_of": "probability" if discrete else "density",
            "dims": int(data.x[0].numel())}


def bits_per_dim(nats: float, dims: int) -> float:
    """-nats / (dims ln 2): a log-probability per point in bits per dimension.

    Example:
        >>> round(bits_per_dim(-87.3, 784), 4)   # MNIST: nats per image -> bits/dim
        0.1606
    """
    return -nats / (dims * math.log(2))


@torch.no_grad()
def elbo(model, data, loss: Loss = AUTO, num_particles: int = 1,
         batch_size: int = 1000, seed: Optional[int] = None, beta: float = 1.0,
         beta_sites=None, check: bool = True) -> float:
    """The ELBO per data point (nats), averaged over ``data`` (a ``TensorDataset``,
    ``torch.utils.data.TensorDataset``, a tensor or a tuple of tensors), for any
    model/guide pair (``pyro_vae.contract``); returns a float.

    Computed by Pyro's ELBO ``.loss`` under ``no_grad`` (what ``SVI.evaluate_loss`` does),
    never by ``SVI.step``, so no parameter moves. ``loss``: ``"auto"`` (the objective
    ``fit`` chooses for this model by the same rule, ``objectives.choose_elbo``: so a
    model is evaluated with the ELBO it was trained with), another name, or an ELBO
    object (``"iwae"`` gives the IWAE bound with ``num_particles`` samples). ``seed``
    fixes the Monte Carlo draws without touching the caller's random state. ``beta``
    weights the latent sites (``beta_sites``, default all): ``beta=0`` gives the
    reconstruction term E_q[log p(x|z)] alone. ``check``: refuse data the model cannot
    take first (the trainer, which checked its validation data once, skips it every
    epoch). Raises ``ValueError`` for such data or an unknown ``loss``, ``TypeError`` for
    ``data`` of another kind.
    """
    check_model(model)
    check_counts(num_particles=num_particles, batch_size=batch_size)
    check_number("beta", beta)
    data = as_dataset(data)
    if check:
        check_data(model, data)
        check_model_guide(model, data, validate=False)  # the pair's structure
    objective, _ = choose_elbo(loss, num_particles, model, probe_batch(data))
    if check:
        check_step_memory(data, batch_size, objective.num_particles, data.device)
    total = 0.0
    with _evaluating(model), seeded(seed, data.device), kl_weight(beta, beta_sites):
        for batch in data.batches(batch_size, shuffle=False):
            # num_data=None: the loss is the plain sum over the batch.
            total += objective.loss(model.model, model.guide, *batch)
    return -total / len(data)


def probe_batch(data, size: int = 2) -> tuple:
    """The first ``size`` points of ``data`` to trace the model on, drawn without
    touching the random state (gray data are binarized with random draws)."""
    with rng_untouched(data.device):
        return next(data.batches(size, shuffle=False))


def _log_weights(model, batch, num_samples: int, dim: int = -2) -> torch.Tensor:
    """log p(x, z_s) - log q(z_s | x) for z_s ~ q(z | x): shape (num_samples, B).

    Runs the guide under a particle plate at ``dim`` (left of the model's plates), replays
    the model on its samples, and sums each site's unscaled log-density. A latent site
    the guide does not sample is drawn by the model from its own conditional, which is
    then its proposal: its density cancels and is left out. So any model and guide (any
    prior, both layers of the HVAE, any guide family, a discrete latent of the model).

    A guide site marked ``infer={"enumerate": "parallel"}`` (M2's label) is summed out
    exactly: the guide runs at each of its values (a dimension left of ``dim``), its
    own density is left out, and the weights are summed over it, so that
    exp(log w_s) = sum_y p(x, y, z_sy) / q(z_sy | x, y), z_sy ~ q(z | x, y).
    """
    particles = pyro.plate("_eval_particles", num_samples, dim=dim)
    guide = poutine.enum(particles(model.guide), first_available_dim=dim - 1)
    guide_trace = poutine.trace(guide).get_trace(*batch)
    model_trace = poutine.trace(poutine.replay(particles(model.model), trace=guide_trace)
                                ).get_trace(*batch)
    log_w = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if trace is model_trace and not site["is_observed"] and name not in guide_trace:
                continue
            if trace is guide_trace and site["infer"].get("_enumerate_dim") is not None:
                continue  # summed out below, weighted by p(y) alone
            log_w = log_w + sign * _sum_right(site["fn"].log_prob(site["value"]), dim)
    if torch.is_tensor(log_w) and log_w.dim() > 2:  # enumerated values, left of dim
        log_w = log_w.logsumexp(dim=tuple(range(log_w.dim() - 2)))
    return log_w.expand(num_samples, len(batch[0]))


def _sum_right(log_p: torch.Tensor, dim: int) -> torch.Tensor:
    """A site's log-density, shape (E..., S, ..., B) right-aligned to ``-dim`` dimensions,
    summed over the plates nested in the data plate (which Pyro puts at dim -1, the first
    entered): shape (E..., S, B), E the enumerated dimensions left of the particles'."""
    while log_p.dim() < -dim:
        log_p = log_p.unsqueeze(0)
    nested = tuple(range(dim + 1, -1))
    return log_p.sum(dim=nested) if nested else log_p


class _Fixed(nn.Module):
    """A prior whose distribution has been computed already."""

    def __init__(self, distribution):
        super().__init__()
        self.distribution = distribution

    def forward(self, encoder=None):
        return self.distribution


@contextlib.contextmanager
def _prior_computed_once(model):
    """p(z) does not depend on x: compute it once for all chunks (the VampPrior's K
    pseudo-inputs then go through the encoder once, not once per chunk). Models without
    a ``prior`` module and ``p_z`` are left as they are."""
    prior = getattr(model, "prior", None)
    if not (isinstance(prior, nn.Module) and hasattr(model, "p_z")):
        yield
        return
    model.prior = _Fixed(model.p_z())
    try:
        yield
    finally:
        model.prior = prior


MAX_SAMPLES = 10 ** 7  # S beyond this would run for days; a typo, most likely


@torch.no_grad()
def log_likelihood(model, data, num_samples: int = 5000, chunk: int = 100,
                   batch_size: int = 40, seed: Optional[int] = 0,
                   progress: bool = False, max_plate_nesting: Optional[int] = None,
                   compile: bool = False, precision: str = "float32") -> torch.Tensor:
    """Importance-sampled log p(x) per data point (Burda et al. 2015, eq. 9):

        log p(x) ~= log (1/S) sum_s p(x, z_s) / q(z_s | x),   z_s ~ q(z | x),

    with S = ``num_samples`` (5000 as in the VampPrior paper), drawn ``chunk`` at a time
    for ``batch_size`` data points at a time and combined by ``logsumexp``. A lower bound
    in expectation (the IWAE bound with K = S) that tightens as S grows. Returns (N,).
    Any model/guide pair whose sites of one point sit in the data plate, with at most
    ``max_plate_nesting`` plates (default: read from a trace of model and guide, as
    ``fit`` reads it); a guide site marked for enumeration is summed out exactly, as
    ``TraceEnum_ELBO`` does in training. ``seed`` leaves the caller's random state alone.
    ``progress``: a progress bar, on a terminal only.
    Pyro's distribution checks are off here: the model was checked when it trained.
    ``compile`` and ``precision``: as for ``fit`` (``pyro_vae.compiled``); the first
    compiled call for a model compiles (seconds), later ones reuse what it compiled.
    """
    check_model(model)
    check_counts(num_samples=num_samples, chunk=chunk, batch_size=batch_size,
                 **({} if max_plate_nesting is None else
                    {"max_plate_nesting": max_plate_nesting}))
    data = as_dataset(data)
    check_data(model, data)
    if num_samples > MAX_SAMPLES:
        raise ArgumentError("num_samples", f"{num_samples} is more than {MAX_SAMPLES} "
                            f"importance samples per point")
    samples, points = min(chunk, num_samples), min(batch_size, len(data))
    check_fits(4 * samples * points * data.x[0].numel(), data.device,
               f"chunks of {samples} samples x {points} points x {data.x[0].numel()} "
               f"features", "lower chunk (--chunk)")
    out = []
    batches = bar(data.batches(batch_size, shuffle=False), progress,
                  total=-(-len(data) // batch_size), desc="log p(x)")
    probe = probe_batch(data, batch_size)  # the first batch, as it will be evaluated
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting(*probe_traces(model, probe))
    dim = -1 - max_plate_nesting
    with _evaluating(model), seeded(seed, data.device), pyro.validation_enabled(False), \
            _prior_computed_once(model), compiled(model, probe, compile, precision):
        for batch in batches:
            parts = []
            for start in range(0, num_samples, chunk):
                s = min(chunk, num_samples - start)
                parts.append(logsumexp(_log_weights(model, batch, s, dim), dim=0))
            out.append(logsumexp(torch.stack(parts), dim=0) - math.log(num_samples))
    return torch.cat(out)


def _all_points(model, data, what: str) -> torch.Tensor:
    """The whole split's x as the model sees it (binarized if dynamic); a one-line error
    when the model lacks what ``what`` needs."""
    missing = [m for m in ("encode", "decode", "p_z") if not hasattr(model, m)]
    if missing:
        raise ValueError(f"{what} needs the model's encode, decode and p_z (see "
                         f"pyro_vae.contract); {type(model).__name__} has no "
                         f"{', '.join(missing)}")
    return next(as_dataset(data).batches(len(data), shuffle=False))[0]


def _check_single_latent(vae, x: torch.Tensor) -> None:
    """ELBO surgery is defined here for one latent site, "z"."""
    trace = poutine.trace(vae.guide).get_trace(x[:1])
    latents = [name for name, site in trace.nodes.items() if is_latent(site)]
    if latents != ["z"]:
        raise ValueError(f"ELBO surgery needs one latent site 'z'; this guide samples "
                         f"{latents}")


@torch.no_grad()
def elbo_surgery(vae, data, chunk: int = 1000, seed: Optional[int] = 0,
                 compile: bool = False, precision: str = "float32") -> dict:
    """ELBO surgery (Hoffman & Johnson 2016) over the N points of ``data``::

        ELBO = E[log p(x_n | z)] - I(n; z) - KL(q(z) || p(z)),
        average KL = (1/N) sum_n KL(q(z|x_n) || p(z)) = I(n; z) + KL(q(z) || p(z)),

    where q(z) = (1/N) sum_n q(z | x_n) is the aggregate posterior. One z_n ~ q(z | x_n)
    per point serves every term: the reconstruction log p(x_n | z_n), the average KL
    log q(z_n | x_n) - log p(z_n), and, since (n, z_n) is a draw from q(n, z), the
    marginal KL log q(z_n) - log p(z_n), where log q(z_n) = logsumexp_m log q(z_n | x_m)
    - log N is evaluated against all N posteriors, ``chunk`` rows at a time.
    I(n; z) = average KL - marginal KL, between 0 and log N. All in nats per data point.
    ``compile`` and ``precision``: as for ``fit`` (``pyro_vae.compiled``).
    """
    check_counts(chunk=chunk)
    x = _all_points(vae, data, "ELBO surgery")
    with compiled(vae, (x[:2],), compile, precision):
        q = vae.encode(x)  # batch (N,)
        with seeded(seed, x.device):
            _check_single_latent(vae, x)
            z = q.sample()
        prior = vae.p_z()
        log_px_z = vae.decode(z).log_prob(x)
        log_qz_x = q.log_prob(z)
        log_pz = prior.log_prob(z)
        aggregate = Mixture(q, torch.zeros(len(x), device=x.device))
        if aggregate._diagonal_normal() is None:
            # Other guide families evaluate chunk x N posteriors elementwise (a flow also
            # inverts each): bound that to about 2^18 rows.
            chunk = max(1, min(chunk, 2 ** 18 // len(x)))
        log_qz = torch.cat([aggregate.log_prob(zc) for zc in z.split(chunk)])
    n = len(x)
    reconstruction = log_px_z.mean().item()
    avg_kl = (log_qz_x - log_pz).mean().item()
    marginal_kl = (log_qz - log_pz).mean().item()
    return {
        "elbo": reconstruction - avg_kl,
        "reconstruction": reconstruction,
        "avg_kl": avg_kl,
        "mutual_information": avg_kl - marginal_kl,
        "marginal_kl": marginal_kl,
        "log_n": math.log(n),
        "num_points": n,
    }


@torch.no_grad()
def active_units(vae, data, threshold: float = 0.01, seed: Optional[int] = 0) -> dict:
    """Posterior-collapse diagnostics (Burda et al. 2015, section 5.2).

    Latent dimension u is active when Cov_x(E_q[z_u | x]) > ``threshold`` (E_q from 256
    draws where q has no closed-form mean, as for a flow guide): its posterior
    mean moves with the data. Also the average KL(q(z_u | x) || p(z_u)) per dimension when
    the prior and the guide are both diagonal Gaussians (else None).
    """
    check_number("threshold", threshold)
    x = _all_points(vae, data, "active_units")
    q = vae.encode(x)
    with seeded(seed, x.device):
        activity = posterior_mean(q).var(dim=0)
    kl_per_dim = None
    prior = vae.p_z()
    q_base, p_base = getattr(q, "base_dist", None), getattr(prior, "base_dist", None)
    if isinstance(q_base, dist.Normal) and isinstance(p_base, dist.Normal):
        kl_per_dim = kl_divergence(q_base, p_base.expand(q_base.batch_shape)).mean(0).tolist()
    return {
        "active_units": int((activity > threshold).sum()),
        "activity": activity.tolist(),
        "kl_per_dim": kl_per_dim,
    }

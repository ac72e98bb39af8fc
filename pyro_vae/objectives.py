"""Which ELBO, and the KL weight beta.

``loss`` is a name or any ``pyro.infer.ELBO`` object:

- ``"auto"`` (the default of ``fit``, ``elbo`` and ``log_likelihood``): chosen from the
  model and guide (``choose_elbo``): the model's own ``default_loss`` where it declares
  one; else ``TraceEnum_ELBO`` where a site is marked for enumeration; else
  ``Trace_ELBO`` where the guide is not mean-field (Pyro's own check: its sites in the
  model's order) or a guide site is not reparameterized; else ``TraceMeanField_ELBO``.
  ``max_plate_nesting`` is read from the traces.

- ``"trace"``: ``Trace_ELBO``, Monte Carlo estimate of E_q[log p(x, z) - log q(z|x)].
- ``"meanfield"``: ``TraceMeanField_ELBO``, E_q[log p(x|z)] - KL(q(z|x) || p(z)) with the
  KL in closed form where PyTorch/Pyro register one (e.g. Normal vs Normal). Where none is
  registered (any mixture prior, the VampPrior included), Pyro *silently* falls back to a
  one-sample Monte Carlo KL; ``warn_if_monte_carlo_kl`` logs that once per pair.
- ``"iwae"``: ``RenyiELBO(alpha=0)``, the importance-weighted bound of Burda et al. (2015),
  log (1/K) sum_k p(x, z_k) / q(z_k|x) per data point, z_k ~ q(z|x), K = num_particles.
- ``"enum"``: ``TraceEnum_ELBO``, the ELBO with the sites marked
  ``infer={"enumerate": "parallel"}`` summed out exactly (M2's label).
- an ELBO object: ``TraceEnum_ELBO(max_plate_nesting=1)`` for discrete latents summed out
  by enumeration, ``TraceGraph_ELBO``, ``RenyiELBO(alpha=0.5)``, a subclass of your own.

Pyro's ``RenyiELBO`` takes the log-mean-exp of the *scaled* site log-densities, so under a
data plate scaled by N / B it would compute log mean exp(s w) instead of s log mean exp(w):
any ``RenyiELBO`` runs unscaled (``scales_with_data_size``).

Beta weights every latent (unobserved) sample site of the model *and* the guide
(``scale_latents``, a Pyro handler the trainer applies, so a model needs no ``beta``
argument): ``TraceMeanField_ELBO`` reads the guide site's scale for its closed-form KL,
``Trace_ELBO`` needs log p(z) and log q(z|x) scaled alike.
"""

import contextlib
import logging
import math
import warnings
from typing import Collection, Dict, Optional, Sequence, Tuple, Union

import torch

from torch.distributions import kl_divergence

from pyro import poutine
from pyro.distributions.torch_distribution import ExpandedDistribution
import pyro
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from .compiled import rng_untouched

logger = logging.getLogger("pyro_vae")

LOSSES = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "iwae": RenyiELBO,
    "enum": TraceEnum_ELBO,
}

Loss = Union[str, ELBO]

#: ``loss="auto"``: the ELBO is chosen from the model and guide (``choose_elbo``).
AUTO = "auto"

_warned = set()


def make_elbo(loss: Loss = "meanfield", num_particles: int = 1,
              max_plate_nesting: int = 1) -> ELBO:
    """The ELBO named ``loss`` (a key of ``LOSSES``) with ``num_particles`` vectorized
    particles and ``max_plate_nesting`` plates, or ``loss`` itself if it is an ELBO object
    (then ``num_particles`` must be 1: the object carries its own). ``"auto"`` needs the
    model: see ``choose_elbo``. Raises ``ValueError`` for an unknown name, for ``"auto"``,
    and for ``num_particles`` given with an ELBO object.

    Example:
        >>> make_elbo("iwae", num_particles=5)
        <pyro.infer.renyi_elbo.RenyiELBO object at ...>
    """
    if isinstance(loss, ELBO):
        if num_particles != 1:
            raise ValueError(f"num_particles={num_particles} with an ELBO object: set "
                             f"num_particles on the object instead")
        return loss
    if loss == AUTO:
        raise ValueError("loss 'auto' is chosen from a model and its data: use "
                         "pyro_vae.objectives.choose_elbo")
    try:
        cls = LOSSES[loss]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES) + [AUTO]} "
                         f"or pass a pyro.infer.ELBO object") from None
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    kwargs = dict(alpha=0.0) if cls is RenyiELBO else {}
    return cls(num_particles=num_particles, vectorize_particles=num_particles > 1,
               max_plate_nesting=max_plate_nesting, **kwargs)


def probe_traces(module, batch: Sequence[torch.Tensor], model_fn=None):
    """The traces of ``module.guide`` on ``batch`` and of the model replayed on its
    draws (subsample sites pruned), as an ELBO sees them: without gradients, without
    Pyro's distribution checks, leaving every random stream as it was, and in a
    parameter store of its own (a ``PyroModule`` would take a same-named entry left in
    the caller's store over its own parameter)."""
    model_fn = model_fn or module.model
    with rng_untouched(batch[0].device), torch.no_grad(), pyro.validation_enabled(False), \
            pyro.get_param_store().scope(), poutine.block():
        guide_trace = poutine.trace(module.guide).get_trace(*batch)
        model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)
                                    ).get_trace(*batch)
    return prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)


def plate_nesting(*traces) -> int:
    """How many vectorized plates nest at most in ``traces``' sample sites (at least 1:
    the data plate), as ``ELBO``'s ``max_plate_nesting`` wants it."""
    dims = [frame.dim for trace in traces for site in trace.nodes.values()
            if site["type"] == "sample" for frame in site["cond_indep_stack"]
            if frame.vectorized]
    return max(1, -min(dims)) if dims else 1


def choose_elbo(loss: Loss, num_particles: int, module, batch: Sequence[torch.Tensor],
                model_fn=None) -> Tuple[ELBO, str]:
    """The ELBO to train or evaluate ``module`` with, and why, in a few words.

    ``loss`` other than ``"auto"``: that one (``make_elbo``; an ELBO object whose
    ``max_plate_nesting`` is unset gets the traces' count, as Pyro would guess it on its
    first use). ``"auto"``: the model's ``default_loss`` (a name or an ELBO object) where
    it declares one; else, from one trace of the guide and the model on ``batch``
    (``probe_traces``), the first of

    - ``TraceEnum_ELBO``: a site of the guide or the model is marked for enumeration
      (``infer={"enumerate": ...}``, e.g. by ``config_enumerate``);
    - ``Trace_ELBO``: a guide site is not reparameterized (a score-function gradient;
      ``TraceGraph_ELBO`` given explicitly reduces its variance), or the guide is not
      mean-field by Pyro's own check (its sites not in the model's order, e.g. z1 then
      z2 | z1 under a model that draws z2 first): the closed-form KL of each site would
      then be conditioned on the wrong draws;
    - ``TraceMeanField_ELBO``: the KL of each latent in closed form where one is
      registered (a one-sample Monte Carlo estimate where not, see
      ``warn_if_monte_carlo_kl``).

    All with ``num_particles`` vectorized particles and ``max_plate_nesting`` read from
    the traces. Raises ``ValueError`` for an unknown name.
    """
    if isinstance(loss, ELBO):
        if loss.max_plate_nesting == math.inf:
            traces = probe_traces(module, batch, model_fn)
            loss.max_plate_nesting = plate_nesting(*traces) + int(
                loss.vectorize_particles and loss.num_particles > 1)
        return make_elbo(loss, num_particles), "as given"
    if loss != AUTO:
        return make_elbo(loss, num_particles), "as given"
    declared = getattr(module, "default_loss", None)
    if declared is not None:
        if declared == AUTO:
            raise ValueError(f"{type(module).__name__}.default_loss cannot be 'auto': name "
                             f"a loss ({sorted(LOSSES)}) or give an ELBO object")
        objective, _ = choose_elbo(declared, num_particles, module, batch, model_fn)
        return objective, f"{type(module).__name__}.default_loss"
    guide_trace, model_trace = probe_traces(module, batch, model_fn)
    cls, why = _objective_for(guide_trace, model_trace)
    return make_elbo(LOSS_NAMES[cls], num_particles,
                     plate_nesting(guide_trace, model_trace)), why


#: The name of each class of ``LOSSES``.
LOSS_NAMES = {cls: name for name, cls in LOSSES.items()}


def _objective_for(guide_trace, model_trace) -> Tuple[type, str]:
    """``choose_elbo``'s rule on the traces: the class and the reason."""
    for trace, whose in ((guide_trace, "guide"), (model_trace, "model")):
        for name, site in trace.nodes.items():
            if is_latent(site) and site["infer"].get("enumerate"):
                return TraceEnum_ELBO, f"the {whose} marks site {name!r} for enumeration"
    for name, site in guide_trace.nodes.items():
        if is_latent(site) and not getattr(site["fn"], "has_rsample", False):
            return Trace_ELBO, f"guide site {name!r} is not reparameterized"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_mean_field_requirement(model_trace, guide_trace)
    if caught:
        order = [name for name, site in guide_trace.nodes.items() if is_latent(site)]
        return Trace_ELBO, (f"the guide is not mean-field (it samples {order}, not in the "
                            f"model's order)")
    return TraceMeanField_ELBO, "a mean-field guide"


def describe_elbo(objective: ELBO) -> Dict:
    """What identifies an ELBO object: its class (by import path) and its settings
    (the plain values among its attributes: ``num_particles``, ``max_plate_nesting``,
    ``alpha``, ...). Two objectives with equal descriptions estimate the same thing."""
    cls = type(objective)
    settings = {k: v for k, v in sorted(vars(objective).items())
                if not k.startswith("_") and type(v) in (bool, int, float, str)}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", **settings}


def scales_with_data_size(objective: Loss) -> bool:
    """Whether the objective (an ELBO or its name) may run under the data plate's N / B
    scale: not a ``RenyiELBO`` (the IWAE bound among them), whose log-mean-exp does not
    commute with the scale."""
    return not isinstance(make_elbo(objective), RenyiELBO)


def plain_elbo(objective: ELBO) -> ELBO:
    """An ELBO estimator for a run trained with ``objective``: the objective itself, or
    for a Renyi bound ``Trace_ELBO`` with the same particles and plates."""
    if scales_with_data_size(objective):  # not a Renyi bound: its value is the ELBO
        return objective
    return Trace_ELBO(num_particles=objective.num_particles,
                      vectorize_particles=objective.vectorize_particles,
                      max_plate_nesting=objective.max_plate_nesting)


def check_objective(objective: ELBO, beta: float = 1.0, warmup_epochs: int = 0) -> None:
    """Raise ValueError for a combination that means nothing."""
    if not beta >= 0 or not warmup_epochs >= 0 or beta == float("inf"):
        raise ValueError(f"beta and warmup_epochs must be finite and >= 0, got {beta}, "
                         f"{warmup_epochs}")
    if isinstance(objective, TraceEnum_ELBO) and (beta != 1 or warmup_epochs):
        raise ValueError("beta and warm-up cannot weight a model's sites under "
                         "TraceEnum_ELBO: Pyro sums enumerated sites out under one common "
                         "scale for every site they touch")
    if not scales_with_data_size(objective) and (beta != 1 or warmup_epochs):
        name = "IWAE" if objective.alpha == 0 else f"Renyi (alpha {objective.alpha})"
        raise ValueError(f"beta and warm-up weight the KL term of the ELBO; the {name} "
                         f"bound has none: use loss trace or meanfield with them")


def beta_at(epoch: int, beta: float = 1.0, warmup_epochs: int = 0) -> float:
    """KL weight for ``epoch`` (1-based): rises linearly from 0 at epoch 1 to ``beta`` at
    epoch ``warmup_epochs + 1`` and stays there (Bowman et al. 2016; Sonderby et al. 2016).

    Example:
        >>> [beta_at(epoch, beta=2.0, warmup_epochs=4) for epoch in range(1, 7)]
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    """
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, (epoch - 1) / warmup_epochs)


def is_latent(site: dict) -> bool:
    """A sample site that is neither observed nor a plate's subsample index."""
    return (site["type"] == "sample" and not site["is_observed"]
            and not site_is_subsample(site))


class scale_latents(Messenger):
    """Multiply the log-density of latent sample sites by ``beta``, in the model and the
    guide alike (beta-VAE, KL warm-up): with ``sites``, only those named. ``beta = 0``
    masks them out (``poutine.scale`` refuses 0).

    A site marked for enumeration (``infer={"enumerate": ...}``) is summed out, not
    weighted: it is refused unless ``sites`` leaves it out (and ``TraceEnum_ELBO`` takes
    no beta at all: Pyro sums enumerated sites out under one common scale).

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro import poutine
        >>> def model():
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))
        >>> with scale_latents(4.0):
        ...     trace = poutine.trace(model).get_trace()
        >>> trace.nodes["z"]["scale"], trace.nodes["x"]["scale"]   # x is observed
        (4.0, 1.0)
    """

    def __init__(self, beta: float, sites: Optional[Collection[str]] = None):
        super().__init__()
        self.beta = beta
        self.sites = None if sites is None else frozenset(sites)

    def _process_message(self, msg: dict) -> None:
        if not is_latent(msg) or (self.sites is not None and msg["name"] not in self.sites):
            return
        if msg["infer"].get("enumerate"):
            raise ValueError(f"beta weights latent site {msg['name']!r}, which is "
                             f"enumerated (summed out: no KL term to weight); leave it out "
                             f"of beta_sites")
        if self.beta == 0:
            msg["mask"] = False if msg["mask"] is None else msg["mask"] & False
        else:
            msg["scale"] = self.beta * msg["scale"]


def kl_weight(beta: float, sites: Optional[Collection[str]] = None):
    """``scale_latents(beta, sites)``, or no handler at all when beta is 1."""
    return contextlib.nullcontext() if beta == 1 else scale_latents(beta, sites)


def has_closed_form_kl(q, p) -> bool:
    """Whether ``kl_divergence(q, p)`` is registered, as ``TraceMeanField_ELBO`` asks."""
    try:
        kl_divergence(q, p.expand(q.batch_shape))
        return True
    except NotImplementedError:
        return False


def warn_if_monte_carlo_kl(objective: Loss, model, guide, *args, **kwargs) -> list:
    """Log once per (guide, prior) pair of distribution types where a
    ``TraceMeanField_ELBO`` (``"meanfield"``) falls back to a Monte Carlo KL. Runs the guide
    and model once on ``args``; returns the names of the latent sites that fall back."""
    if not (objective == "meanfield" or isinstance(objective, TraceMeanField_ELBO)):
        return []
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs)
    fallbacks = []
    for name, site in model_trace.nodes.items():
        if not is_latent(site) or name not in guide_trace:
            continue
        q, p = guide_trace.nodes[name]["fn"], site["fn"]
        if has_closed_form_kl(q, p):
            continue
        fallbacks.append(name)
        key = (_describe(q), _describe(p))
        if key not in _warned:
            _warned.add(key)
            logger.warning(
                "TraceMeanField_ELBO has no closed-form KL(%s || %s) at site %r: Pyro uses "
                "a one-sample Monte Carlo estimate of the KL instead (unbiased, but "
                "noisier)", key[0], key[1], name)
    return fallbacks


def _describe(d) -> str:
    """A short name: Independent(Normal), Mixture(Independent(Normal)), ..."""
    if isinstance(d, ExpandedDistribution):  # the data plate's broadcast, not a family
        return _describe(d.base_dist)
    inner = getattr(d, "base_dist", None) or getattr(d, "component", None)
    name = type(d).__name__.lstrip("_")  # a private subclass reads as its family
    return name if inner is None else f"{name}({_describe(inner)})"

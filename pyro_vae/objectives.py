"""Which ELBO: the objective handed to ``pyro.infer.SVI``, and the KL weight beta.

- ``"trace"``: ``Trace_ELBO``, Monte Carlo estimate of E_q[log p(x, z) - log q(z|x)].
- ``"meanfield"``: ``TraceMeanField_ELBO``, E_q[log p(x|z)] - KL(q(z|x) || p(z)) with the
  KL in closed form where PyTorch/Pyro register one (e.g. Normal vs Normal). Where none is
  registered (any mixture prior, the VampPrior included), Pyro *silently* falls back to a
  one-sample Monte Carlo KL; ``warn_if_monte_carlo_kl`` logs that once per pair.
- ``"iwae"``: ``RenyiELBO(alpha=0)``, the importance-weighted bound of Burda et al. (2015),
  log (1/K) sum_k p(x, z_k) / q(z_k|x) per data point, z_k ~ q(z|x), K = num_particles.
  Pyro takes the log-mean-exp of the *scaled* site log-densities, so under a data plate
  scaled by N / B it would compute log mean exp(s w) instead of s log mean exp(w): the IWAE
  loss must be evaluated unscaled (``scales_with_data_size("iwae")`` is False).

Particles are vectorized: the model and guide must broadcast over a leading sample
dimension left of the ``"data"`` plate, which the models of this package do.
"""

import logging

from torch.distributions import kl_divergence

from pyro import poutine
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.poutine.util import site_is_subsample
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

logger = logging.getLogger("pyro_vae")

LOSSES = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "iwae": RenyiELBO,
}

_warned = set()


def make_elbo(loss: str = "meanfield", num_particles: int = 1) -> ELBO:
    """The ELBO named ``loss`` (a key of ``LOSSES``) with vectorized particles."""
    try:
        cls = LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}") from None
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    kwargs = dict(alpha=0.0) if cls is RenyiELBO else {}
    return cls(num_particles=num_particles, vectorize_particles=num_particles > 1,
               max_plate_nesting=1, **kwargs)


def scales_with_data_size(loss: str) -> bool:
    """Whether the loss may run under the data plate's N / B scale (not the IWAE bound)."""
    return loss != "iwae"


def plain_elbo_loss(loss: str) -> str:
    """The loss that estimates the plain ELBO for a run trained with ``loss``."""
    return "trace" if loss == "iwae" else loss


def check_objective(loss: str, beta: float = 1.0, warmup_epochs: int = 0) -> None:
    """Raise ValueError for a combination that means nothing."""
    if beta < 0 or warmup_epochs < 0:
        raise ValueError(f"beta and warmup_epochs must be >= 0, got {beta}, {warmup_epochs}")
    if loss == "iwae" and (beta != 1 or warmup_epochs):
        raise ValueError("beta and warm-up weight the KL term of the ELBO; the IWAE bound "
                         "has none: use loss trace or meanfield with them")


def beta_at(epoch: int, beta: float = 1.0, warmup_epochs: int = 0) -> float:
    """KL weight for ``epoch`` (1-based): rises linearly from 0 at epoch 1 to ``beta`` at
    epoch ``warmup_epochs + 1`` and stays there (Bowman et al. 2016; Sonderby et al. 2016)."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, (epoch - 1) / warmup_epochs)


def has_closed_form_kl(q, p) -> bool:
    """Whether ``kl_divergence(q, p)`` is registered, as ``TraceMeanField_ELBO`` asks."""
    try:
        kl_divergence(q, p.expand(q.batch_shape))
        return True
    except NotImplementedError:
        return False


def warn_if_monte_carlo_kl(loss: str, model, guide, *args, **kwargs) -> list:
    """Log once per (guide, prior) pair of distribution types where ``loss="meanfield"``
    falls back to a Monte Carlo KL. Runs the guide and model once on ``args``; returns
    the names of the latent sites that fall back."""
    if loss != "meanfield":
        return []
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs)
    fallbacks = []
    for name, site in model_trace.nodes.items():
        if (site["type"] != "sample" or site["is_observed"] or site_is_subsample(site)
                or name not in guide_trace):
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

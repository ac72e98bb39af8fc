"""Which ELBO: the objective handed to ``pyro.infer.SVI``.

- ``"trace"``: ``Trace_ELBO``, Monte Carlo estimate of E_q[log p(x, z) - log q(z|x)].
- ``"meanfield"``: ``TraceMeanField_ELBO``, E_q[log p(x|z)] - KL(q(z|x) || p(z)) with the
  KL in closed form where PyTorch/Pyro register one (e.g. Normal vs Normal). Where none is
  registered, Pyro *silently* falls back to a one-sample Monte Carlo KL;
  ``warn_if_monte_carlo_kl`` logs that once per (guide, prior) pair.

Particles are vectorized: the model and guide must broadcast over a leading sample
dimension left of the ``"data"`` plate, which the models of this package do.
"""

import logging

from torch.distributions import kl_divergence

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

logger = logging.getLogger("pyro_vae")

LOSSES = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
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
    return cls(num_particles=num_particles, vectorize_particles=num_particles > 1,
               max_plate_nesting=1)


def has_closed_form_kl(q, p) -> bool:
    """Whether ``kl_divergence(q, p)`` is registered, as ``TraceMeanField_ELBO`` asks."""
    try:
        kl_divergence(q, p.expand(q.batch_shape))
        return True
    except NotImplementedError:
        return False


def warn_if_monte_carlo_kl(loss: str, q, p) -> bool:
    """Log once when ``loss="meanfield"`` would fall back to a Monte Carlo KL.

    Returns True when it falls back.
    """
    if loss != "meanfield" or has_closed_form_kl(q, p):
        return False
    key = (_describe(q), _describe(p))
    if key not in _warned:
        _warned.add(key)
        logger.warning(
            "TraceMeanField_ELBO has no closed-form KL(%s || %s): Pyro uses a one-sample "
            "Monte Carlo estimate of the KL instead (unbiased, but noisier)", *key)
    return True


def _describe(d) -> str:
    base = getattr(d, "base_dist", None)
    return f"{type(d).__name__}({type(base).__name__})" if base is not None else type(d).__name__

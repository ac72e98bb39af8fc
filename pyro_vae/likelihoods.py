"""Likelihood heads p(x | z): decoder features -> a Distribution over one datum.

A head is an ``nn.Module`` built as ``Head(x_dim)``. Its ``forward(features)`` takes the
decoder's output (``x_dim`` features per datum, any leading batch shape) and returns a
``pyro.distributions`` object with ``event_shape == (x_dim,)``. ``check(x, what)`` rejects
data outside the head's support with a one-line error before any training starts.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints


class BernoulliLikelihood(nn.Module):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(f_d(z))), parameterized by logits.

    Needs x in {0, 1}: binarize gray data first (see ``pyro_vae.datasets``).
    """

    def __init__(self, x_dim: int):
        super().__init__()
        self.x_dim = x_dim

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return BernoulliLogits(logits)

    def check(self, x: torch.Tensor, what: str = "data") -> None:
        if not torch.all(torch.isfinite(x)):
            raise ValueError(f"likelihood 'bernoulli' needs x in {{0, 1}}; {what} has NaN "
                             f"or inf")
        bad = x[(x != 0) & (x != 1)]
        if len(bad):
            raise ValueError(
                f"likelihood 'bernoulli' needs x in {{0, 1}} but {what} has other values "
                f"(e.g. {bad[0].item():g}); binarize it (binarize=True in "
                f"pyro_vae.datasets.load, --binarize on the command line) or use the "
                f"gaussian likelihood")


class BernoulliLogits(TorchDistribution):
    """prod_d Bernoulli(x_d; sigmoid(l_d)) over the last dimension: event (D,), batch the
    rest. The same density as ``Bernoulli(logits=l).to_event(1)``, computed as

        log p(x) = sum_d x_d l_d - sum_d softplus(l_d),

    two reductions over the logits instead of an elementwise binary cross-entropy (six
    passes over samples x batch x D values) followed by a sum: with D = 784 and thousands
    of latent samples per step, this is a visible part of training and evaluation time.
    """

    arg_constraints = {"logits": constraints.independent(constraints.real, 1)}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BernoulliLogits, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        super(BernoulliLogits, new).__init__(batch_shape, self.event_shape,
                                             validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    @property
    def variance(self) -> torch.Tensor:
        p = self.probs
        return p * (1 - p)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            return torch.bernoulli(self.probs.expand(shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return (torch.linalg.vecdot(self.logits, value.to(self.logits.dtype))
                - F.softplus(self.logits).sum(-1))


class GaussianLikelihood(nn.Module):
    """p(x|z) = prod_d Normal(x_d; f_d(z), sigma_d).

    ``scale=None`` learns one sigma per dimension, kept in [min_scale, inf) by a softplus;
    a float fixes sigma (then the model is e.g. the linear-Gaussian VAE of the tests).
    """

    def __init__(self, x_dim: int, scale: Optional[float] = None, min_scale: float = 1e-3):
        super().__init__()
        self.x_dim = x_dim
        self.min_scale = min_scale
        if scale is None:
            # softplus(0.5413) = 1.0: start from unit noise.
            self.raw_scale = nn.Parameter(torch.full((x_dim,), 0.5413))
        else:
            if not 0 < scale < float("inf"):
                raise ValueError(f"likelihood scale must be finite and > 0, got {scale!r}")
            self.register_buffer("fixed_scale", torch.full((x_dim,), float(scale)))

    @property
    def scale(self) -> torch.Tensor:
        if hasattr(self, "raw_scale"):
            return self.min_scale + F.softplus(self.raw_scale)
        return self.fixed_scale

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        return dist.Normal(loc, self.scale).to_event(1)

    def check(self, x: torch.Tensor, what: str = "data") -> None:
        if not torch.all(torch.isfinite(x)):
            raise ValueError(f"likelihood 'gaussian' needs finite x; {what} has NaN or inf")


LIKELIHOODS = {
    "bernoulli": BernoulliLikelihood,
    "gaussian": GaussianLikelihood,
}

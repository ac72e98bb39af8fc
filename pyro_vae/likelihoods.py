"""Likelihood heads p(x | z): decoder features -> a Distribution over one datum.

A head is an ``nn.Module`` built as ``Head(x_dim, **options)`` that declares
``outputs_per_feature`` (k): the decoder gives it k * x_dim features per datum (any
leading batch shape), laid out as k blocks of x_dim (e.g. all means, then all scales),
and ``forward`` returns a ``pyro.distributions`` object with ``event_shape == (x_dim,)``.
``VAE`` and ``HierarchicalVAE`` size their decoder from it, and refuse a head whose
distribution does not have that shape in one line. ``discrete = True`` says ``log_prob``
is a log-probability (a mass function), so evaluation also reports bits per dimension;
a density on continuous x is not comparable with it. Both default (1, False) when a
head of your own leaves them out. ``check(x, what)`` (optional) rejects data outside the
head's support with a one-line error before any training starts.

Heads that predict a scale (k = 2) learn sharp posteriors: their codes may fill a small
part of the prior's space, so samples from p(z) can look worse than the test likelihood
suggests (``tutorials/12_continuous_data.py``).

============================  ===  ========  ==========================================
head                          k    discrete  data
============================  ===  ========  ==========================================
``bernoulli``                 1    yes       x in {0, 1}
``gaussian``                  1    no        real x; sigma learned per feature, or fixed
``gaussian_decoded``          2    no        real x; sigma predicted per point and pixel
``discretized_logistic``      2    yes       x in {0, 1/255, ..., 1} (8-bit gray / 255)
``continuous_bernoulli``      1    no        x in [0, 1]
============================  ===  ========  ==========================================
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .compiled import kernel


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class Likelihood(nn.Module):
    """Base of the package's heads: the two declarations, the feature split, and the
    support checks. A head of your own may subclass it or declare the same attributes."""

    #: The decoder's outputs per feature of x, k; the decoder has k * x_dim outputs.
    outputs_per_feature = 1
    #: Whether ``log_prob`` is a log-probability (then bits per dimension are reported).
    discrete = False
    #: The name in error messages (the registry key).
    name = "likelihood"

    def __init__(self, x_dim: int):
        super().__init__()
        self.x_dim = x_dim

    def split(self, features: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The k blocks of x_dim features: ``features[..., i * x_dim:(i + 1) * x_dim]``."""
        return features.unflatten(-1, (self.outputs_per_feature, self.x_dim)).unbind(-2)

    def check(self, x: torch.Tensor, what: str = "data") -> None:
        """Refuse NaN or infinite x in one line naming ``what``."""
        if not torch.all(torch.isfinite(x)):
            raise ValueError(f"likelihood {self.name!r} needs finite x; {what} has NaN "
                             f"or inf")

    def _check_range(self, x: torch.Tensor, what: str, hint: str) -> None:
        Likelihood.check(self, x, what)
        bad = x[(x < 0) | (x > 1)]
        if len(bad):
            raise ValueError(f"likelihood {self.name!r} needs x in [0, 1] but {what} has "
                             f"{bad[0].item():g}; {hint}")


class BernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(f_d(z))), parameterized by logits.

    Needs x in {0, 1}: binarize gray data first (see ``pyro_vae.datasets``).
    """

    discrete = True
    name = "bernoulli"

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
                f"pyro_vae.datasets.load, --binarize on the command line) or use a "
                f"likelihood for gray data (continuous_bernoulli, discretized_logistic)")


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
        return _bernoulli_log_prob(self.logits, value.to(self.logits.dtype))


@kernel
def _bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(logits, value) - F.softplus(logits).sum(-1)


class GaussianLikelihood(Likelihood):
    """p(x|z) = prod_d Normal(x_d; f_d(z), sigma_d), one sigma per feature for all points.

    ``scale=None`` learns sigma, kept in [min_scale, inf) by a softplus and started at
    ``init_scale``: 0.1, a tenth of the range of data in [0, 1]. (Started at 1, sigma on
    such data shrinks slowly, Adam moving its raw parameter by about lr per step, and while
    it is large the reconstruction term is too weak to use the latent: every image decodes
    to the mean image.) A float ``scale`` fixes sigma (e.g. the linear-Gaussian VAE of the
    tests).
    """

    name = "gaussian"
    option_ranges = {"scale": (">", 0), "init_scale": (">", 0), "min_scale": (">=", 0)}

    def __init__(self, x_dim: int, scale: Optional[float] = None, init_scale: float = 0.1,
                 min_scale: float = 1e-3):
        super().__init__(x_dim)
        self.min_scale = min_scale
        if scale is None:
            _check_init_scale(init_scale, min_scale)
            start = _inverse_softplus(init_scale - min_scale)
            self.raw_scale = nn.Parameter(torch.full((x_dim,), start))
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


def _check_init_scale(init_scale: float, min_scale: float) -> None:
    if not (0 <= min_scale < init_scale < float("inf")):
        raise ValueError(f"likelihood init_scale must be finite and > min_scale "
                         f"({min_scale:g}), and min_scale >= 0; got init_scale "
                         f"{init_scale!r}")


class _DecodedScale(Likelihood):
    """A head whose decoder predicts a location and a scale per feature (k = 2):
    sigma = min_scale + softplus(s + c), with c such that s = 0 gives ``init_scale``."""

    outputs_per_feature = 2
    option_ranges = {"init_scale": (">", 0), "min_scale": (">=", 0)}

    def __init__(self, x_dim: int, init_scale: float = 0.1, min_scale: float = 1e-3):
        super().__init__(x_dim)
        _check_init_scale(init_scale, min_scale)
        self.min_scale = min_scale
        self.shift = _inverse_softplus(init_scale - min_scale)

    def loc_scale(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        loc, s = self.split(features)
        return loc, self.min_scale + F.softplus(s + self.shift)


class GaussianDecodedLikelihood(_DecodedScale):
    """p(x|z) = prod_d Normal(x_d; mu_d(z), sigma_d(z)): the decoder predicts a mean and a
    scale for every feature of every point (heteroscedastic noise; k = 2).

    sigma starts near ``init_scale`` (0.1) and stays above ``min_scale``: a density grows
    without bound as sigma shrinks on a feature the decoder predicts exactly, so on 8-bit
    data (which take 256 values) ``min_scale`` caps what each feature can add, at
    -log(min_scale sqrt(2 pi)) nats. For such data ``discretized_logistic`` is the exact
    model.
    """

    name = "gaussian_decoded"

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        return dist.Normal(*self.loc_scale(features)).to_event(1)


class DiscretizedLogisticLikelihood(_DecodedScale):
    """p(x|z) = prod_d DiscretizedLogistic(x_d; mu_d(z), s_d(z)) on x in {0, 1/255, ...,
    1}: 8-bit gray values divided by 255 (k = 2). The likelihood of the VampPrior paper's
    code for gray images (Tomczak & Welling 2018), with the edge bins taking the tails
    so that the 256 probabilities sum to one (the paper's code leaves the tails out).
    A probability, so evaluation reports bits per dimension too.
    """

    discrete = True
    name = "discretized_logistic"
    # Its mean sums over the bins: 16-bit data are the most there are.
    option_ranges = dict(_DecodedScale.option_ranges, bins=((">=", 2), ("<=", 2 ** 16)))

    def __init__(self, x_dim: int, bins: int = 256, init_scale: float = 0.1,
                 min_scale: float = 1e-3):
        super().__init__(x_dim, init_scale, min_scale)
        if not (isinstance(bins, int) and bins >= 2):
            raise ValueError(f"likelihood bins must be an integer >= 2, got {bins!r}")
        self.bins = bins

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        return DiscretizedLogistic(*self.loc_scale(features), bins=self.bins).to_event(1)

    def check(self, x: torch.Tensor, what: str = "data") -> None:
        last = self.bins - 1
        self._check_range(x, what, f"divide {last + 1}-level values by {last}")
        k = x * last
        bad = x[(k - k.round()).abs() > 1e-3]
        if len(bad):
            raise ValueError(f"likelihood 'discretized_logistic' needs x in {{0, 1/{last}, "
                             f"..., 1}} ({last + 1}-level values divided by {last}) but "
                             f"{what} has {bad[0].item():g}; use continuous_bernoulli or a "
                             f"gaussian likelihood for other values in [0, 1]")


class DiscretizedLogistic(TorchDistribution):
    """Logistic(loc, scale) rounded to ``bins`` values c_k = k / (bins - 1) (elementwise).

    Value c_k gets the logistic mass of [c_k - h, c_k + h], h = 1 / (2 (bins - 1)); the
    first and last values take the tails, (-inf, c_0 + h] and [c_last - h, inf)
    (Salimans et al. 2017, PixelCNN++), so the probabilities sum to one. In log space,
    with a > b the standardized bin edges,

        log(sigmoid(a) - sigmoid(b)) = -softplus(-a) - softplus(b) + log(1 - e^(b - a)),

    finite for every loc and scale. ``.to_event(1)`` makes it a distribution over images.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval  # the grid inside it; heads check the grid

    def __init__(self, loc, scale, bins: int = 256, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        self.bins = bins
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        new.bins = self.bins
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        last = self.bins - 1
        k = (value * last).round()
        inv = self.scale.reciprocal()
        upper = (k / last + 0.5 / last - self.loc) * inv  # standardized bin edges
        lower = (k / last - 0.5 / last - self.loc) * inv
        below, above = -F.softplus(-upper), -F.softplus(lower)  # log F(upper), log 1 - F(lower)
        inside = below - F.softplus(lower) + torch.log(-torch.expm1(-inv / last))
        return torch.where(k <= 0, below, torch.where(k >= last, above, inside))

    @property
    def mean(self) -> torch.Tensor:
        """Exact, sum_k c_k P(c_k) = (1 / (bins - 1)) sum_{j >= 1} P(X >= c_j)."""
        last = self.bins - 1
        lower = (torch.arange(1, self.bins, dtype=self.loc.dtype, device=self.loc.device)
                 - 0.5) / last
        tail = torch.sigmoid((self.loc.unsqueeze(-1) - lower) / self.scale.unsqueeze(-1))
        return tail.sum(-1) / last

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            tiny = torch.finfo(self.loc.dtype).tiny
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
            y = self.loc + self.scale * (torch.log(u + tiny) - torch.log1p(-u))
            last = self.bins - 1
            return (y * last).round().clamp(0, last) / last


class ContinuousBernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d CB(x_d; sigmoid(f_d(z))) on x in [0, 1] (Loaiza-Ganem &
    Cunningham 2019): the Bernoulli's formula made a density on [0, 1] by its normalizer.
    A density, so not comparable with a discrete head's log-probability.
    """

    name = "continuous_bernoulli"

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return ContinuousBernoulliLogits(logits).to_event(1)

    def check(self, x: torch.Tensor, what: str = "data") -> None:
        self._check_range(x, what, "scale the data into [0, 1]")


def continuous_bernoulli_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """log C(l) of the continuous Bernoulli with logit l = log(lambda / (1 - lambda)).

    C = 2 atanh(1 - 2 lambda) / (1 - 2 lambda) is l / tanh(l / 2) in the logit: exact
    and finite for any ``|l| >= 0.1``; below that (lambda near 1/2, where it is 0 / 0) the
    series log 2 + l^2 / 12 - 7 l^4 / 1440 (error < 1e-9).
    """
    small = logits.abs() < 0.1
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe / torch.tanh(safe / 2))
    l2 = logits * logits
    return torch.where(small, math.log(2) + l2 / 12 - 7 * l2 * l2 / 1440, exact)


class ContinuousBernoulliLogits(TorchDistribution):
    """The continuous Bernoulli, elementwise, computed from logits l::

        log p(x) = x l - softplus(l) + log C(l),   C(l) = l / tanh(l / 2).

    torch's ``ContinuousBernoulli`` clamps lambda to [eps, 1 - eps], which changes the
    density once ``|l| > ~16`` (at l = -30 it gives log p(0) = 2.769; the exact value is
    log 30 = 3.401); this form is exact at every logit.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.unit_interval

    def __init__(self, logits, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ContinuousBernoulliLogits, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape)
        super(ContinuousBernoulliLogits, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        l = self.logits
        return value * l - F.softplus(l) + continuous_bernoulli_log_normalizer(l)

    @property
    def mean(self) -> torch.Tensor:
        """sigmoid(l) / tanh(l / 2) - 1 / l; 1/2 + l / 12 - l^3 / 720 for ``|l| < 0.1``."""
        l = self.logits
        small = l.abs() < 0.1
        safe = torch.where(small, torch.ones_like(l), l)
        exact = torch.sigmoid(safe) / torch.tanh(safe / 2) - 1 / safe
        return torch.where(small, 0.5 + l / 12 - l ** 3 / 720, exact)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """The inverse CDF, x = log(1 + u (e^l - 1)) / l, on the side where e^l - 1 is in
        (-1, 0) (l < 0; x -> 1 - x and l -> -l for l > 0)."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            l = self.logits.expand(shape)
            u = torch.rand(shape, dtype=l.dtype, device=l.device)
            neg = -l.abs()
            v = torch.where(l > 0, 1 - u, u)
            safe = torch.where(neg < -1e-4, neg, -torch.ones_like(neg))
            x = torch.log1p(v * torch.expm1(safe)) / safe
            x = torch.where(neg < -1e-4, x, v + neg * v * (1 - v) / 2)
            return torch.where(l > 0, 1 - x, x).clamp(0, 1)


LIKELIHOODS = {
    "bernoulli": BernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian_decoded": GaussianDecodedLikelihood,
    "discretized_logistic": DiscretizedLogisticLikelihood,
    "continuous_bernoulli": ContinuousBernoulliLikelihood,
}

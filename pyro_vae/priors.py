"""Priors p(z): modules whose ``forward(encoder)`` returns a Distribution over one z.

Contract: ``prior(encoder)`` returns a ``pyro.distributions`` object with
``batch_shape == ()`` and ``event_shape == (z_dim,)``; the model samples it inside the
``"data"`` plate, which broadcasts it over the batch. The encoder is passed in (never
stored) so that priors built from the encoder's own posteriors, such as the VampPrior,
share its weights with the guide.

A prior class is built by name (``PRIORS[name]``) with those of the keyword arguments
``z_dim``, ``x_dim``, ``components``, ``pseudo_init``, ``learn_weights`` and ``data`` (the
training images) that its constructor names. Register your own with
``PRIORS["mine"] = MyPrior``, or name it as ``"package.module:ClassName"``.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

import pyro.distributions as dist
from pyro.distributions.torch_distribution import TorchDistribution

from .compiled import kernel


class Mixture(TorchDistribution):
    """p(z) = sum_k softmax(logits)_k p_k(z), for a component distribution of batch (K,).

    Unlike ``MixtureSameFamily``, which a data plate expands to B x K x z parameters,
    ``log_prob`` broadcasts z of shape (..., z_dim) against the K x z_dim parameters as
    they are: ``log p(z) = logsumexp_k [log w_k + log p_k(z)]``. Inside a plate, Pyro wraps
    it in an ``ExpandedDistribution``, which calls this ``log_prob`` unchanged.
    Sampling is not reparameterized (``has_rsample`` is False).
    """

    arg_constraints = {"logits": constraints.real_vector}
    has_rsample = False

    def __init__(self, component: dist.Distribution, logits: torch.Tensor,
                 validate_args=None):
        if component.batch_shape != logits.shape or logits.dim() != 1:
            raise ValueError(f"component batch shape {tuple(component.batch_shape)} must "
                             f"equal logits shape {tuple(logits.shape)} = (K,)")
        self.component = component
        self.logits = logits
        super().__init__(torch.Size(), component.event_shape, validate_args=validate_args)

    @property
    def support(self):
        return self.component.support

    @property
    def log_weights(self) -> torch.Tensor:
        return self.logits.log_softmax(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        base = self._diagonal_normal()
        if base is not None:
            # log w_k + log p_k(z) for every k in one matrix product: (..., K).
            terms = _diag_normal_log_prob(value, base.loc, base.scale, self.log_weights)
        else:
            # (..., K, z_dim): expanded, not broadcast, so that components with their own
            # conditioning (a flow's context of batch K) see one value per component.
            value = value.unsqueeze(-1 - len(self.event_shape))
            value = value.expand(value.shape[:-1 - len(self.event_shape)]
                                 + self.component.batch_shape + self.event_shape)
            terms = self.component.log_prob(value) + self.log_weights
        return logsumexp(terms, dim=-1)

    def _diagonal_normal(self):
        """The Normal of an Independent(Normal) component over the last dim, else None."""
        base = getattr(self.component, "base_dist", None)
        if isinstance(base, dist.Normal) and self.component.reinterpreted_batch_ndims == 1:
            return base
        return None

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            k = dist.Categorical(logits=self.logits).sample(sample_shape)
            comp = self.component
            base = self._diagonal_normal()
            if base is not None:
                return torch.normal(base.loc[k], base.scale[k])
            # Any other family: draw from every component, keep the chosen one.
            draws = comp.sample(sample_shape)  # (*sample_shape, K, *event)
            index = k.reshape(k.shape + (1,) * (1 + len(self.event_shape)))
            index = index.expand(k.shape + (1,) + self.event_shape)
            return draws.gather(len(k.shape), index).squeeze(len(k.shape))

    @property
    def mean(self) -> torch.Tensor:
        w = self.log_weights.exp().unsqueeze(-1)
        return (w * self.component.mean).sum(-2)

    @property
    def variance(self) -> torch.Tensor:
        w = self.log_weights.exp().unsqueeze(-1)
        second = (w * (self.component.variance + self.component.mean ** 2)).sum(-2)
        return second - self.mean ** 2


_FLOAT32_MIN_SCALE = 0.1  # smallest component scale for the float32 product


def _diag_normal_log_prob(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                          offset: Optional[torch.Tensor] = None):
    """log N(z; loc_k, diag scale_k^2) + offset_k for z (..., D) and every row k of loc,
    scale (K, D) and offset (K,) (default 0).

    The quadratic form expands into one matrix product: with u = z - c and v_k = m_k - c
    for a common centre c (the mean of the m_k),

        log N(z; m_k, s_k^2) + o_k = [u^2, u, 1] @ [-1/(2 s_k^2), v_k/s_k^2, c_k],
        c_k = o_k - sum_d (v_kd^2/(2 s_kd^2) + log s_kd) - D/2 log(2 pi),

    so no (..., K, D) tensor is ever formed: with K = 500 components and vectorized
    particles that tensor and its gradient dominate a training step. The expansion adds
    and cancels terms of size sum_d (u_d^2 + v_kd^2)/s_kd^2, so its rounding error grows
    as the scales shrink: the product runs in float32 (4x faster than float64 on CPU)
    while every scale is >= 0.1, where that error stays below 4e-3 nats in 40 dimensions
    for latents of unit spread (2e-4 at scale 1; tested), and in float64 otherwise.
    """
    dims, out_dtype = loc.shape[-1], z.dtype
    small = scale.detach().min() < _FLOAT32_MIN_SCALE
    dtype = torch.float64 if out_dtype == torch.float64 or small else torch.float32
    z, loc, scale = z.to(dtype), loc.to(dtype), scale.to(dtype)
    centre = loc.detach().mean(0)
    u, v = z - centre, loc - centre
    prec = scale.pow(-2)
    const = (-0.5 * (v * v * prec).sum(-1) - scale.log().sum(-1)
             - 0.5 * dims * math.log(2 * math.pi))
    if offset is not None:
        const = const + offset.to(dtype)
    weights = torch.cat([-0.5 * prec, v * prec, const.unsqueeze(-1)], dim=-1)  # (K, 2D+1)
    features = torch.cat([u * u, u, torch.ones_like(u[..., :1])], dim=-1)  # (..., 2D+1)
    return (features @ weights.T).to(out_dtype)


# exp(t) for t below about -88 (float32) takes a slow special-case path in the vectorized
# kernels, 20-50x slower than the normal path; log-densities of far components sit there.
_EXP_FLOOR = -80.0


@kernel
def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.logsumexp(x, dim)``, fast when many terms are far below the largest.

    Differences to the maximum are clamped at -80 before ``exp``: a term that small adds
    less than e^-80 (about 2e-35) of the largest one, so the result moves by at most
    (number of terms) x 2e-35 in relative terms, and its gradient, which would be as small,
    is zero. The clamp keeps ``exp`` (forward and backward) on its fast path, which on CPU
    makes the K-component mixtures here several times faster. Rows that are all -inf give
    -inf, like ``torch.logsumexp``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, -1.0, -200.0], [-float("inf")] * 3])
        >>> logsumexp(x, dim=-1)
        tensor([0.3133,   -inf])
    """
    top = x.detach().amax(dim, keepdim=True)
    finite = torch.isfinite(top)
    shift = torch.where(finite, top, torch.zeros_like(top))
    if torch.is_grad_enabled() and x.requires_grad:
        total = (x - shift).clamp(min=_EXP_FLOOR).exp().sum(dim)
    else:  # no graph to keep: work in place, one buffer
        total = (x - shift).clamp_(min=_EXP_FLOOR).exp_().sum(dim)
    # A row whose maximum is -inf, +inf or nan gives that maximum, as torch.logsumexp does.
    return torch.where(finite.squeeze(dim), total.log() + shift.squeeze(dim),
                       top.squeeze(dim))


def _check_components(components) -> None:
    if not (isinstance(components, int) and components >= 1):
        raise ValueError(f"prior option components must be >= 1, got {components!r}")


class StandardNormal(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        # Buffers, so that .to(device) moves them and no parameter is created.
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self, encoder: nn.Module = None) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class LearnedNormal(nn.Module):
    """p(z) = N(mu, diag sigma^2) with learned mu and sigma = 1e-4 + softplus(s)."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.loc = nn.Parameter(torch.zeros(z_dim))
        self.raw_scale = nn.Parameter(torch.full((z_dim,), math.log(math.e - 1)))  # sigma=1

    def forward(self, encoder: nn.Module = None) -> dist.Distribution:
        return dist.Normal(self.loc, 1e-4 + F.softplus(self.raw_scale)).to_event(1)


class MixtureOfGaussians(nn.Module):
    """p(z) = sum_k w_k N(z; mu_k, diag sigma_k^2), all learned (K = ``components``).

    Means start at N(0, I) draws, scales at 1, weights uniform.
    """

    option_ranges = {"components": (">=", 1)}

    def __init__(self, z_dim: int, components: int = 10):
        super().__init__()
        _check_components(components)
        self.z_dim, self.components = z_dim, components
        self.locs = nn.Parameter(torch.randn(components, z_dim))
        self.raw_scales = nn.Parameter(torch.full((components, z_dim), math.log(math.e - 1)))
        self.logits = nn.Parameter(torch.zeros(components))

    def forward(self, encoder: nn.Module = None) -> Mixture:
        component = dist.Normal(self.locs, 1e-4 + F.softplus(self.raw_scales)).to_event(1)
        return Mixture(component, self.logits)


class VampPrior(nn.Module):
    """p(z) = (1/K) sum_k q(z | u_k): the encoder's posteriors at K learned pseudo-inputs
    (Tomczak & Welling 2018, "VAE with a VampPrior", eq. 9).

    As in the paper's code, u = Hardtanh(0, 1)(W) for a K x x_dim weight W (a bias-free
    linear layer applied to the identity), so pseudo-inputs stay in the data range [0, 1].
    ``pseudo_init="normal"`` draws W ~ N(0.05, 0.01) (the paper's MNIST setting); a
    negative mean would clamp every u to 0, where Hardtanh has zero gradient and the
    pseudo-inputs never train. ``pseudo_init="data"`` starts from K random training
    images (``data``), squeezed into [0.01, 0.99] for the same reason.
    ``learn_weights``: learned mixture weights instead of uniform ones.
    """

    uses_encoder = True  # the model hands it the encoder: p(z) is built on q(z | u)
    option_ranges = {"components": (">=", 1), "init_std": (">=", 0)}

    def __init__(self, z_dim: int, x_dim: int, components: int = 500,
                 pseudo_init: str = "normal", learn_weights: bool = False,
                 data: Optional[torch.Tensor] = None, init_mean: float = 0.05,
                 init_std: float = 0.01):
        super().__init__()
        _check_components(components)
        self.z_dim, self.x_dim, self.components = z_dim, x_dim, components
        if pseudo_init == "normal":
            w = init_mean + init_std * torch.randn(components, x_dim)
        elif pseudo_init == "data":
            if data is None or data.shape[-1] != x_dim or len(data) < components:
                raise ValueError(f"pseudo_init='data' needs at least {components} training "
                                 f"images of {x_dim} values")
            w = 0.01 + 0.98 * data[torch.randperm(len(data))[:components]].float().cpu()
        else:
            raise ValueError(f"unknown pseudo_init {pseudo_init!r}; choose 'normal' or 'data'")
        self.pseudo_weight = nn.Parameter(w)
        logits = torch.zeros(components)
        if learn_weights:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """The K pseudo-inputs u_k, in [0, 1]."""
        return F.hardtanh(self.pseudo_weight, 0.0, 1.0)

    def forward(self, encoder: nn.Module) -> Mixture:
        if encoder is None:
            raise ValueError("VampPrior needs the encoder: call prior(encoder)")
        return Mixture(encoder(self.pseudo_inputs), self.logits)


PRIORS = {
    "normal": StandardNormal,
    "learned_normal": LearnedNormal,
    "mog": MixtureOfGaussians,
    "vamp": VampPrior,
}

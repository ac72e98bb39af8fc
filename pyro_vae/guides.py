"""Amortized guide families q(z|x): ``encoder(x)`` returns a Distribution over z.

Contract: for x of shape ``(B, x_dim)`` the returned distribution has
``batch_shape == (B,)`` and ``event_shape == (z_dim,)``, and is reparameterized
(``has_rsample``). The VAE's guide samples it inside the ``"data"`` plate; swapping the
guide family means swapping this object, the model does not change.

A guide class is built by name (``GUIDES[name]``) with those of the keyword arguments
``x_dim``, ``z_dim``, ``hidden``, ``act``, ``arch`` and ``flow_steps`` that its
constructor names. Register your own with ``GUIDES["mine"] = MyEncoder``, or name it as
``"package.module:ClassName"``.

- ``diagonal``: N(mu(x), diag sigma(x)^2) (Kingma & Welling 2014);
- ``fullrank``: N(mu(x), L(x) L(x)^T) with L lower-triangular, positive diagonal;
- ``iaf``: a diagonal Gaussian pushed through ``flow_steps`` inverse autoregressive
  flow steps conditioned on the encoder's features (Kingma et al. 2016).

Only Normal against Normal has a closed-form KL in PyTorch; with the full-rank guide
(against a diagonal Gaussian prior) this module registers one; with the flow guide,
``TraceMeanField_ELBO`` uses a Monte Carlo KL (``fit`` logs it once).
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import register_kl

import pyro.distributions as dist
from pyro.distributions import transforms as T

from .nn import network


def _positive(s: torch.Tensor, kind: str, min_scale: float) -> torch.Tensor:
    """A scale from an unconstrained network output: min_scale + softplus(s), or
    exp(Hardtanh(-6, 2)(s) / 2) (a bounded log-variance, the VampPrior paper's)."""
    if kind == "softplus":
        return min_scale + F.softplus(s)
    return torch.exp(0.5 * F.hardtanh(s, -6.0, 2.0))


def _check_scale(scale: Optional[str], arch: str) -> str:
    scale = scale or ("logvar" if arch == "gated" else "softplus")
    if scale not in ("softplus", "logvar"):
        raise ValueError(f"unknown scale {scale!r}; choose one of ['softplus', 'logvar']")
    return scale


class DiagonalNormalEncoder(nn.Module):
    """q(z|x) = N(mu(x), diag sigma(x)^2): the factorized Gaussian of Kingma & Welling (2014).

    One network (``arch`` "mlp" or "gated", see ``pyro_vae.nn.network``) emits mu and a
    scale parameter, which ``scale`` turns into sigma:

    - ``"softplus"``: sigma = min_scale + softplus(s), positive and bounded away from 0;
    - ``"logvar"``: log sigma^2 = Hardtanh(-6, 2)(s), so sigma in [e^-3, e]: the VampPrior
      paper's choice (the default with ``arch="gated"``).

    Also serves as any conditional diagonal Gaussian, such as p(z1 | z2) in the HVAE.
    """

    #: Ranges of constructor options (checked by ``pyro_vae.models.check_options``).
    option_ranges = {"min_scale": (">", 0)}

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (400,),
                 act: str = "relu", arch: str = "mlp", scale: Optional[str] = None,
                 min_scale: float = 1e-4):
        super().__init__()
        self.x_dim, self.z_dim, self.min_scale = x_dim, z_dim, min_scale
        self.scale = _check_scale(scale, arch)
        self.net = network(arch, x_dim, hidden, 2 * z_dim, act)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, s = self.net(x).chunk(2, dim=-1)
        return dist.Normal(loc, _positive(s, self.scale, self.min_scale)).to_event(1)


class _MultivariateNormal(dist.MultivariateNormal):
    """``MultivariateNormal`` whose density at its own latest ``rsample`` comes from the
    noise that made it: z = mu + L eps gives log q(z) = log N(eps; 0, I) - sum_i log L_ii,
    exact however ill-conditioned L is. The general formula solves L u = z - mu, which in
    float32 loses all accuracy once the off-diagonal entries dwarf the diagonal; an
    optimizer then climbs that error instead of the ELBO, and training diverges. The
    value and its gradient are the same in exact arithmetic (Pyro's flows cache the same
    way). Any other value takes the general formula."""

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc + (self._unbroadcasted_scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
        self._own_sample = (z, eps)
        return z

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        own = getattr(self, "_own_sample", None)
        if own is None or value is not own[0]:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        eps = own[1]
        half_log_det = self._unbroadcasted_scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return (-0.5 * (eps * eps).sum(-1) - half_log_det
                - 0.5 * self.event_shape[0] * math.log(2 * math.pi))


class FullRankNormalEncoder(DiagonalNormalEncoder):
    """q(z|x) = N(mu(x), L(x) L(x)^T): a full-covariance Gaussian posterior.

    One network emits mu (z_dim), the diagonal of L (z_dim, made positive as in
    ``DiagonalNormalEncoder``) and its z_dim (z_dim - 1) / 2 entries below the diagonal.
    The off-diagonal outputs start at zero, so the guide starts as the diagonal one.
    """

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (400,),
                 act: str = "relu", arch: str = "mlp", scale: Optional[str] = None,
                 min_scale: float = 1e-4):
        super().__init__(x_dim, z_dim, hidden, act, arch, scale, min_scale)
        self.offdiag = nn.Linear(self.net[-1].in_features, z_dim * (z_dim - 1) // 2)
        nn.init.zeros_(self.offdiag.weight)
        nn.init.zeros_(self.offdiag.bias)
        self.register_buffer("rows", torch.tril_indices(z_dim, z_dim, -1)[0], False)
        self.register_buffer("cols", torch.tril_indices(z_dim, z_dim, -1)[1], False)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        h = _features(self.net, x)
        loc, s = self.net[-1](h).chunk(2, dim=-1)
        diag = _positive(s, self.scale, self.min_scale)
        tril = torch.diag_embed(diag)
        tril[..., self.rows, self.cols] = self.offdiag(h)
        return _MultivariateNormal(loc, scale_tril=tril)


class IAFEncoder(nn.Module):
    """q(z|x): z = f_T o ... o f_1(eps), eps ~ N(mu(x), diag sigma(x)^2), where each f_t is
    an inverse autoregressive flow step (Kingma et al. 2016) conditioned on a context
    h(x) from the same network: Pyro's ``ConditionalAffineAutoregressive`` in its stable
    form, z_i = s_i z_i + (1 - s_i) m_i with (m, logit s) from a masked network of
    z_<i and h. Each step has its own variable order (a random permutation).

    log q(z|x) = log N(eps) - sum_t log ``|det df_t/dz|``; for the guide's own samples Pyro
    caches eps, so no inverse is computed. Evaluating q at other points (a VampPrior built
    on this guide, ELBO surgery) needs the inverse, z_dim sequential network passes per
    step: correct, but slow.
    """

    # A flow of more than a hundred steps is a typo (papers use up to eight); each step
    # is a module built at construction.
    option_ranges = {"min_scale": (">", 0), "flow_steps": ((">=", 1), ("<=", 100)),
                     "context_dim": (">=", 1), "flow_hidden": (">=", 1)}

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (400,),
                 act: str = "relu", arch: str = "mlp", flow_steps: int = 2,
                 flow_hidden: Optional[Sequence[int]] = None, context_dim: int = 50,
                 scale: Optional[str] = None, min_scale: float = 1e-4):
        super().__init__()
        if flow_steps < 1:
            raise ValueError(f"flow_steps must be >= 1, got {flow_steps}")
        self.x_dim, self.z_dim, self.min_scale = x_dim, z_dim, min_scale
        self.flow_steps, self.context_dim = flow_steps, context_dim
        self.scale = _check_scale(scale, arch)
        self.net = network(arch, x_dim, hidden, 2 * z_dim + context_dim, act)
        flow_hidden = list(flow_hidden or [2 * z_dim + context_dim] * 2)
        self.flows = nn.ModuleList(
            T.conditional_affine_autoregressive(z_dim, context_dim, flow_hidden, stable=True)
            for _ in range(flow_steps))

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, s, context = self.net(x).split([self.z_dim, self.z_dim, self.context_dim], -1)
        base = dist.Normal(loc, _positive(s, self.scale, self.min_scale)).to_event(1)
        return dist.TransformedDistribution(base, [f.condition(context) for f in self.flows])


def location(q: dist.Distribution) -> torch.Tensor:
    """A point summary of q(z|x): its mean where that is known in closed form, else (a
    flow) the image of its base distribution's mean under the flow."""
    try:
        return q.mean
    except NotImplementedError:
        if not isinstance(q, dist.TransformedDistribution):
            raise
        z = location(q.base_dist)
        for t in q.transforms:
            z = t(z)
        return z


def posterior_mean(q: dist.Distribution, samples: int = 256) -> torch.Tensor:
    """E_q[z]: exact where known, else the average of ``samples`` draws."""
    try:
        return q.mean
    except NotImplementedError:
        return q.sample((samples,)).mean(0)


def _features(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The input of the network's last (linear) layer."""
    for layer in list(net)[:-1]:
        x = layer(x)
    return x


@register_kl(dist.MultivariateNormal, dist.Independent)
def _kl_fullrank_diagonal(q: dist.MultivariateNormal, p: dist.Independent) -> torch.Tensor:
    """KL(N(m, L L^T) || N(mu, diag s^2)) in closed form:
    1/2 [sum_d ((L L^T)_dd + (m_d - mu_d)^2) / s_d^2 - D + 2 sum_d log s_d - log det LL^T].
    Only for a diagonal Normal ``p``; anything else falls back to Monte Carlo."""
    base = p.base_dist
    if not (isinstance(base, torch.distributions.Normal) and p.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    var = q.scale_tril.pow(2).sum(-1)  # diag(L L^T)
    dims = q.event_shape[0]
    return 0.5 * (((var + (q.loc - base.loc) ** 2) / base.scale ** 2).sum(-1) - dims
                  + 2 * base.scale.log().sum(-1)
                  - 2 * q.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1))


GUIDES = {
    "diagonal": DiagonalNormalEncoder,
    "fullrank": FullRankNormalEncoder,
    "iaf": IAFEncoder,
}

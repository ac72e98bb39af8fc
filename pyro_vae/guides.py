"""Amortized guide families q(z|x): ``encoder(x)`` returns a Distribution over z.

Contract: for x of shape ``(B, x_dim)`` the returned distribution has
``batch_shape == (B,)`` and ``event_shape == (z_dim,)``, and is reparameterized
(``has_rsample``). The VAE's guide samples it inside the ``"data"`` plate; swapping the
guide family means swapping this object, the model does not change.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist

from .nn import network


class DiagonalNormalEncoder(nn.Module):
    """q(z|x) = N(mu(x), diag sigma(x)^2): the factorized Gaussian of Kingma & Welling (2014).

    One network (``arch`` "mlp" or "gated", see ``pyro_vae.nn.network``) emits mu and a
    scale parameter, which ``scale`` turns into sigma:

    - ``"softplus"``: sigma = min_scale + softplus(s), positive and bounded away from 0;
    - ``"logvar"``: log sigma^2 = Hardtanh(-6, 2)(s), so sigma in [e^-3, e]: the VampPrior
      paper's choice (the default with ``arch="gated"``).

    Also serves as any conditional diagonal Gaussian, such as p(z1 | z2) in the HVAE.
    """

    SCALES = ("softplus", "logvar")

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (400,),
                 act: str = "relu", arch: str = "mlp", scale: Optional[str] = None,
                 min_scale: float = 1e-4):
        super().__init__()
        scale = scale or ("logvar" if arch == "gated" else "softplus")
        if scale not in self.SCALES:
            raise ValueError(f"unknown scale {scale!r}; choose one of {list(self.SCALES)}")
        self.x_dim, self.z_dim, self.scale, self.min_scale = x_dim, z_dim, scale, min_scale
        self.net = network(arch, x_dim, hidden, 2 * z_dim, act)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, s = self.net(x).chunk(2, dim=-1)
        if self.scale == "softplus":
            sigma = self.min_scale + F.softplus(s)
        else:
            sigma = torch.exp(0.5 * F.hardtanh(s, -6.0, 2.0))
        return dist.Normal(loc, sigma).to_event(1)


GUIDES = {
    "diagonal": DiagonalNormalEncoder,
}

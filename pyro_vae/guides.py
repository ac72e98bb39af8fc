"""Amortized guide families q(z|x): ``encoder(x)`` returns a Distribution over z.

Contract: for x of shape ``(B, x_dim)`` the returned distribution has
``batch_shape == (B,)`` and ``event_shape == (z_dim,)``, and is reparameterized
(``has_rsample``). The VAE's guide samples it inside the ``"data"`` plate; swapping the
guide family means swapping this object, the model does not change.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist

from .nn import MLP


class DiagonalNormalEncoder(nn.Module):
    """q(z|x) = N(mu(x), diag sigma(x)^2), with sigma = min_scale + softplus(.) > 0.

    The factorized Gaussian of Kingma & Welling (2014); one MLP body emits both
    mu and the pre-softplus scale.
    """

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (400,),
                 act: str = "relu", min_scale: float = 1e-4):
        super().__init__()
        self.x_dim, self.z_dim, self.min_scale = x_dim, z_dim, min_scale
        self.net = MLP(x_dim, hidden, 2 * z_dim, act)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return dist.Normal(loc, self.min_scale + F.softplus(raw_scale)).to_event(1)


GUIDES = {
    "diagonal": DiagonalNormalEncoder,
}

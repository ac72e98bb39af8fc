"""Priors p(z): modules whose ``forward(encoder)`` returns a Distribution over one z.

Contract: a prior is built as ``Prior(z_dim)``; ``prior(encoder)`` returns a
``pyro.distributions`` object with ``batch_shape == ()`` and ``event_shape == (z_dim,)``.
The model samples it inside the ``"data"`` plate, which broadcasts it over the batch.
The encoder is passed in (never stored) so that priors built from the encoder's own
posteriors, such as the VampPrior, share its weights with the guide.

Add your own by subclassing ``nn.Module`` (or ``PyroModule``) with that signature and
registering it: ``PRIORS["mine"] = MyPrior``.
"""

import torch
from torch import nn

import pyro.distributions as dist


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


PRIORS = {
    "normal": StandardNormal,
}

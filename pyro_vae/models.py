"""VAE models: one top-level PyroModule each, with ``model(x)`` and ``guide(x)``.

Model and guide are methods of the same module, so every parameter has exactly one name
in Pyro's parameter store. Child networks are plain ``nn.Module``s; PyroModule registers
them (``pyro.module``) whenever ``model`` or ``guide`` touches them.
"""

from typing import Optional, Sequence, Union

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule, pyro_method

from .guides import GUIDES
from .likelihoods import LIKELIHOODS
from .nn import MLP
from .priors import PRIORS


def _build(part, registry: dict, kind: str, *args):
    """An ``nn.Module`` given as-is, or a registry name built with ``args``."""
    if isinstance(part, nn.Module):
        return part
    try:
        cls = registry[part]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {part!r}; choose one of {sorted(registry)} "
                         f"or pass an nn.Module") from None
    return cls(*args)


class VAE(PyroModule):
    """Variational autoencoder (Kingma & Welling 2014) as a Pyro model/guide pair.

    Model:  z_n ~ p(z),  x_n ~ p(x | decoder(z_n))      for n in the "data" plate
    Guide:  z_n ~ q(z | x_n) = encoder(x_n)

    ``prior``, ``likelihood`` and ``encoder`` are registry names (see ``PRIORS``,
    ``LIKELIHOODS``, ``GUIDES``) or ready-made modules following their contracts.
    ``hidden`` gives the encoder's hidden sizes; the decoder mirrors them.
    """

    def __init__(self, x_dim: int, z_dim: int = 50, hidden: Sequence[int] = (400,),
                 likelihood: Union[str, nn.Module] = "bernoulli",
                 prior: Union[str, nn.Module] = "normal",
                 encoder: Union[str, nn.Module] = "diagonal",
                 act: str = "relu"):
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim
        self.encoder = _build(encoder, GUIDES, "guide", x_dim, z_dim, tuple(hidden), act)
        self.decoder = MLP(z_dim, tuple(reversed(hidden)), x_dim, act)
        self.likelihood = _build(likelihood, LIKELIHOODS, "likelihood", x_dim)
        self.prior = _build(prior, PRIORS, "prior", z_dim)

    @pyro_method
    def model(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """p(x, z). ``num_data`` is the full data set size N: the minibatch's log-density
        is scaled by N / len(x), so the loss estimates the ELBO of the whole data set."""
        with pyro.plate("data", num_data or len(x), subsample=x):
            z = pyro.sample("z", self.prior(self.encoder))
            pyro.sample("x", self.decode(z), obs=x)
        return z

    @pyro_method
    def guide(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """q(z | x), amortized by the encoder."""
        with pyro.plate("data", num_data or len(x), subsample=x):
            return pyro.sample("z", self.encoder(x))

    def encode(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x): batch shape (B,), event shape (z_dim,)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z): batch shape z.shape[:-1], event shape (x_dim,)."""
        return self.likelihood(self.decoder(z))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Mean of p(x | z) for n draws z ~ p(z): shape (n, x_dim)."""
        z = self.prior(self.encoder).sample((n,))
        return self.decode(z).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at the posterior mean z = E_q[z | x]: shape of x."""
        return self.decode(self.encode(x).mean).mean

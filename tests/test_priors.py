import math

import torch

import pyro

from pyro_vae import VAE
from pyro_vae.priors import PRIORS, StandardNormal


def test_standard_normal_log_prob_and_shapes():
    p = StandardNormal(3)()
    assert p.batch_shape == () and p.event_shape == (3,)
    z = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.0, 0.0]])
    expected = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(p.log_prob(z), expected)
    assert p.sample((7,)).shape == (7, 3)


def test_constants_are_buffers_that_follow_the_module():
    prior = StandardNormal(3)
    assert not list(prior.parameters())
    prior = prior.double()
    assert prior().sample().dtype == torch.float64


class ShiftedNormal(torch.nn.Module):
    """A user prior: N(mu, I) with a learned mu."""

    def __init__(self, z_dim):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.full((z_dim,), 3.0))

    def forward(self, encoder=None):
        return pyro.distributions.Normal(self.mu, 1.0).to_event(1)


def test_user_prior_by_registry_name_is_used_and_trained(monkeypatch):
    monkeypatch.setitem(PRIORS, "shifted", ShiftedNormal)
    vae = VAE(6, 2, (5,), prior="shifted")
    assert isinstance(vae.prior, ShiftedNormal)
    torch.manual_seed(0)
    z = vae.prior().sample((4000,))
    assert torch.allclose(z.mean(0), torch.full((2,), 3.0), atol=0.1)
    # Its parameter is registered with Pyro through the VAE and gets gradients.
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert "prior$$$mu" in pyro.get_param_store()
    assert vae.prior.mu.grad is not None and vae.prior.mu.grad.abs().sum() > 0

import math

import pytest
import torch

import pyro
import pyro.distributions as dist

from pyro_vae import VAE
from pyro_vae.guides import DiagonalNormalEncoder
from pyro_vae.priors import (PRIORS, LearnedNormal, Mixture, MixtureOfGaussians, logsumexp,
                             StandardNormal, VampPrior)


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
    """A user prior: N(mu, I) with a learned mu (also loaded by name in test_cli)."""

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


def _encoder(x_dim=12, z_dim=3):
    torch.manual_seed(0)
    return DiagonalNormalEncoder(x_dim, z_dim, hidden=(8,))


def _all_priors():
    torch.manual_seed(0)
    return {
        "normal": StandardNormal(3),
        "learned_normal": LearnedNormal(3),
        "mog": MixtureOfGaussians(3, components=5),
        "vamp": VampPrior(3, 12, components=7),
    }


@pytest.mark.parametrize("name", ["normal", "learned_normal", "mog", "vamp"])
def test_every_prior_has_the_contract_shapes(name):
    prior = _all_priors()[name]
    assert PRIORS[name] is type(prior)
    p = prior(_encoder())
    assert p.batch_shape == () and p.event_shape == (3,)
    z = torch.randn(6, 3)
    assert p.log_prob(z).shape == (6,)
    assert p.expand([6]).log_prob(z).shape == (6,)  # as inside the data plate
    assert p.log_prob(torch.randn(4, 6, 3)).shape == (4, 6)  # vectorized particles
    assert p.sample((5,)).shape == (5, 3)


def _hand_logsumexp(terms):
    """log sum_k exp(t_k), written out with the max trick."""
    m = max(t.max() for t in terms)
    return m + torch.log(sum(torch.exp(t - m) for t in terms))


def test_mog_log_prob_is_a_logsumexp_over_components():
    torch.manual_seed(1)
    mog = MixtureOfGaussians(3, components=5)
    with torch.no_grad():
        mog.logits.copy_(torch.randn(5))
    z = torch.randn(6, 3)
    w = torch.softmax(mog.logits, 0)
    scales = 1e-4 + torch.nn.functional.softplus(mog.raw_scales)
    terms = [torch.log(w[k]) + torch.distributions.Normal(mog.locs[k], scales[k]).log_prob(z).sum(-1)
             for k in range(5)]
    assert torch.allclose(mog().log_prob(z), _hand_logsumexp(terms), atol=1e-5)


def test_vamp_log_prob_is_the_mean_of_the_encoders_posteriors():
    torch.manual_seed(2)
    enc = _encoder()
    vamp = VampPrior(3, 12, components=7)
    z = torch.randn(6, 3)
    terms = []
    for k in range(7):
        q_k = enc(vamp.pseudo_inputs[k])
        terms.append(torch.distributions.Normal(q_k.base_dist.loc, q_k.base_dist.scale)
                     .log_prob(z).sum(-1))
    expected = _hand_logsumexp(terms) - math.log(7)
    assert torch.allclose(vamp(enc).log_prob(z), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["mog", "vamp"])
def test_mixture_samples_have_the_mixtures_moments(name):
    torch.manual_seed(3)
    prior = _all_priors()[name]
    if name == "mog":
        with torch.no_grad():
            prior.logits.copy_(torch.randn(5))
            prior.locs.mul_(3)
    with torch.no_grad():
        p = prior(_encoder())
        comp = p.component.base_dist
        w = torch.softmax(p.logits, 0)[:, None]
        mean = (w * comp.loc).sum(0)  # by hand, not through Mixture.mean
        var = (w * (comp.scale ** 2 + comp.loc ** 2)).sum(0) - mean ** 2
        n = 100_000
        z = p.sample((n,))
    # Standard errors: sd / sqrt(n) for the mean; about sd^2 * sqrt(2 / n) * 2 for the
    # variance (the factor 2 allows for the mixture's excess kurtosis). 5 of them.
    assert torch.all((z.mean(0) - mean).abs() < 5 * (var / n).sqrt())
    assert torch.all((z.var(0) - var).abs() < 5 * 2 * var * math.sqrt(2 / n))
    assert torch.allclose(p.mean, mean, atol=1e-6) and torch.allclose(p.variance, var, atol=1e-5)


def test_mixture_of_other_families_samples_by_gathering():
    torch.manual_seed(4)
    locs = torch.tensor([[-5.0, 0.0], [5.0, 1.0]])
    comp = dist.MultivariateNormal(locs, scale_tril=0.1 * torch.eye(2).expand(2, 2, 2))
    p = Mixture(comp, torch.log(torch.tensor([0.25, 0.75])))
    z = p.sample((20_000,))
    assert z.shape == (20_000, 2)
    frac_right = (z[:, 0] > 0).float().mean().item()
    assert frac_right == pytest.approx(0.75, abs=5 * math.sqrt(0.75 * 0.25 / 20_000))
    assert torch.allclose(z[z[:, 0] > 0].mean(0), locs[1], atol=0.01)


def test_vamp_gradients_reach_pseudo_inputs_and_encoder():
    vae = VAE(12, 3, (8,), prior="vamp", prior_options={"components": 7})
    x = torch.bernoulli(torch.full((5, 12), 0.4))
    z = vae.encode(x).sample()  # a fixed z: only the prior's path carries gradient
    vae.prior(vae.encoder).log_prob(z).sum().backward()
    assert vae.prior.pseudo_weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters())
    assert all(p.grad is None for p in vae.decoder.parameters())


def _train_pseudo_inputs(vamp, steps=50, lr=0.05):
    """A few SVI steps on random binary data; returns the pseudo-inputs before and after."""
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    vae = VAE(12, 3, (8,), prior=vamp)
    x = torch.bernoulli(torch.full((20, 12), 0.4))
    before = vamp.pseudo_inputs.detach().clone()
    svi = SVI(vae.model, vae.guide, Adam({"lr": lr}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x)
    return before, vamp.pseudo_inputs.detach()


def test_vamp_pseudo_inputs_train_and_stay_in_the_data_range():
    torch.manual_seed(5)
    vamp = VampPrior(3, 12, components=7)
    before, after = _train_pseudo_inputs(vamp, lr=0.05)
    assert before.min() > 0 and before.max() < 0.2  # N(0.05, 0.01)
    assert (after - before).abs().max() > 0.1  # they moved
    assert after.min() >= 0 and after.max() <= 1


def test_vamp_with_negative_init_mean_never_trains():
    """The trap the default init avoids: Hardtanh(0, 1) clamps them all to 0 with zero
    gradient, so the pseudo-inputs stay at 0."""
    torch.manual_seed(6)
    vamp = VampPrior(3, 12, components=7, init_mean=-0.05, init_std=0.01)
    before, after = _train_pseudo_inputs(vamp)
    assert torch.all(before == 0) and torch.all(after == 0)


def test_vamp_data_init_and_learned_weights():
    torch.manual_seed(7)
    images = torch.bernoulli(torch.full((30, 12), 0.5))
    vamp = VampPrior(3, 12, components=7, pseudo_init="data", data=images, learn_weights=True)
    u = vamp.pseudo_inputs
    # Each pseudo-input is one of the images, squeezed into [0.01, 0.99].
    matches = ((0.01 + 0.98 * images[None]) - u[:, None]).abs().amax(-1) < 1e-6
    assert matches.any(1).all()
    assert isinstance(vamp.logits, torch.nn.Parameter)
    assert not isinstance(VampPrior(3, 12, components=7).logits, torch.nn.Parameter)
    with pytest.raises(ValueError, match="needs at least 7 training images"):
        VampPrior(3, 12, components=7, pseudo_init="data", data=images[:5])


@pytest.mark.parametrize("min_scale, dims, atol", [
    (1.0, 6, 1e-4), (1.0, 40, 2e-4),     # float32 product
    (0.1, 6, 5e-4), (0.1, 40, 4e-3),     # float32, smallest scale it takes
    (0.05, 40, 2e-4), (1e-3, 6, 1e-4),   # float64 product
])
def test_fast_diagonal_mixture_log_prob_matches_float64_reference(min_scale, dims, atol):
    """The matrix-product form expands (z - m)^2 / s^2, which cancels in float32 as s
    shrinks: float32 while every s >= 0.1 (error stated in the tolerance), else float64.
    Components and latents spread as in a trained VampPrior (unit scale)."""
    torch.manual_seed(8)
    loc = torch.randn(50, dims)
    scale = min_scale * (1 + torch.rand(50, dims))
    logits = torch.randn(50)
    z = torch.cat([loc[:20] + scale[:20] * torch.randn(20, dims),  # near a component
                   1.5 * torch.randn(20, dims)])                     # anywhere
    fast = Mixture(dist.Normal(loc, scale).to_event(1), logits).log_prob(z)
    terms = dist.Normal(loc.double(), scale.double()).log_prob(z.double()[:, None]).sum(-1)
    reference = torch.logsumexp(terms + logits.double().log_softmax(-1), -1)
    # rtol: the float32 output rounds values of size |v| by ~1e-7 |v| whatever the path.
    assert torch.allclose(fast.double(), reference, rtol=1e-6, atol=atol)


def test_logsumexp_matches_torch_and_is_fast_path_safe():
    """Terms far below the maximum (where exp is slow) change nothing; all -inf rows, +inf
    and nan behave as in torch.logsumexp; the gradient is the softmax."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(30, 200) * 100, torch.randn(30, 200)])
    inf, nan = float("inf"), float("nan")
    special = torch.tensor([[-inf, -inf, -inf], [0.0, -inf, 1.0], [inf, 0.0, 0.0],
                            [nan, 0.0, 0.0], [-1e4, 0.0, -200.0]])
    assert torch.allclose(logsumexp(x, -1), torch.logsumexp(x, -1), rtol=1e-6, atol=0)
    assert torch.allclose(logsumexp(x.double(), 0), torch.logsumexp(x.double(), 0),
                          rtol=1e-12, atol=0)
    assert torch.allclose(logsumexp(special, -1), torch.logsumexp(special, -1),
                          equal_nan=True)
    y = x.double().requires_grad_()
    logsumexp(y, -1).sum().backward()
    assert torch.allclose(y.grad, torch.softmax(x.double(), -1), rtol=0, atol=1e-15)

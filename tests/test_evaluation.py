import math

import pytest
import torch
from torch import nn
from torch.distributions import kl_divergence

import pyro

from pyro_vae import VAE, HierarchicalVAE, elbo, fit
from pyro_vae.datasets import TensorDataset, load
from pyro_vae.evaluation import active_units, elbo_surgery, log_likelihood
from pyro_vae.objectives import make_elbo
from pyro_vae.priors import VampPrior

from test_models import ExactPosterior, _linear_gaussian
from test_objectives import _DiagonalOfExact


def _lg_data(x):
    return TensorDataset(x, "linear-gaussian", "test", (x.shape[1], 1))


def test_log_likelihood_of_linear_gaussian_vae():
    vae, x, W, b, sigma, log_px = _linear_gaussian()
    vae.encoder = _DiagonalOfExact(ExactPosterior(W, b, sigma))  # good, not exact
    estimate = log_likelihood(vae, _lg_data(x), num_samples=5000, chunk=1000, seed=0)
    assert estimate.shape == (8,)
    # Within 0.01 nats per data point on average over the points. A single point's
    # estimate carries its own Monte Carlo error (measured 0.01 - 0.03 at S = 5000).
    assert abs((estimate - log_px).mean().item()) < 0.01
    assert (estimate - log_px).abs().max().item() < 0.05


def test_log_likelihood_is_exact_with_the_exact_posterior():
    vae, x, W, b, sigma, log_px = _linear_gaussian()
    vae.encoder = ExactPosterior(W, b, sigma)
    estimate = log_likelihood(vae, _lg_data(x), num_samples=1, seed=0)
    assert torch.allclose(estimate, log_px, atol=1e-6)


def test_log_likelihood_rises_with_the_number_of_samples():
    vae, x, W, b, sigma, log_px = _linear_gaussian()
    vae.encoder = _DiagonalOfExact(ExactPosterior(W, b, sigma))
    gaps = {}
    for s in (1, 10, 1000):
        # In expectation: average over points and 10 seeds.
        gaps[s] = sum((log_px - log_likelihood(vae, _lg_data(x), s, seed=seed)).mean().item()
                      for seed in range(10)) / 10
    # Measured: about 0.68, 0.09 and 0.0 nats per point.
    assert gaps[1] > gaps[10] + 0.2 and gaps[10] > gaps[1000] + 0.03
    assert abs(gaps[1000]) < 0.03


@pytest.mark.parametrize("model", ["vae", "hvae"])
def test_log_likelihood_agrees_with_renyi_elbo_on_the_same_samples(model):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((6, 12), 0.4))
    if model == "vae":
        vae = VAE(12, 3, (8,), prior="vamp", prior_options={"components": 5})
    else:
        vae = HierarchicalVAE(12, 3, (8,), prior="vamp", prior_options={"components": 5},
                              arch="mlp")
    pyro.set_rng_seed(3)
    ours = log_likelihood(vae, _lg_data(x), num_samples=40, chunk=40, batch_size=6, seed=None)
    assert isinstance(vae.prior, VampPrior)  # the prior computed once is put back
    pyro.set_rng_seed(3)
    renyi = -make_elbo("iwae", 40).loss(vae.model, vae.guide, x)
    assert ours.sum().item() == pytest.approx(renyi, rel=1e-6)


def test_chunks_and_batches_do_not_change_the_estimate():
    vae, x, *_ = _linear_gaussian()
    data = _lg_data(x)
    one = log_likelihood(vae, data, num_samples=200, chunk=200, batch_size=8, seed=5)
    many = log_likelihood(vae, data, num_samples=200, chunk=50, batch_size=8, seed=5)
    # The same draws in another grouping: logsumexp of logsumexps.
    assert torch.allclose(one, many, atol=1e-9)


def _digits_model(epochs=5, **kw):
    train, valid, test = load("digits")
    pyro.set_rng_seed(0)
    vae = VAE(64, 6, (64,), **kw)
    fit(vae, train, epochs=epochs, batch_size=64, lr=3e-3, progress=False)
    return vae, test


def test_surgery_terms_add_up_to_the_elbo():
    vae, test = _digits_model()
    s = elbo_surgery(vae, test, seed=0)
    assert s["elbo"] == pytest.approx(s["reconstruction"] - s["avg_kl"])
    assert s["avg_kl"] == pytest.approx(s["mutual_information"] + s["marginal_kl"])
    # The sampled average KL against the closed form for the N(0, I) prior: one draw per
    # point over 250 points has a standard error of about 0.05 nats here; allow 5 of them.
    q = vae.encode(test.x)
    exact_kl = kl_divergence(q, vae.prior().expand(q.batch_shape)).mean().item()
    assert s["avg_kl"] == pytest.approx(exact_kl, abs=0.25)
    # Pyro's Trace_ELBO over the same points, averaged over 20 draws to cut its noise;
    # the surgery uses one draw per point: 4 nats is > 5 standard errors here.
    pyro_elbo = sum(elbo(vae, test, "trace", seed=k) for k in range(20)) / 20
    assert s["elbo"] == pytest.approx(pyro_elbo, abs=4.0)
    assert -0.05 <= s["mutual_information"] <= s["log_n"] + 1e-6
    assert s["log_n"] == pytest.approx(math.log(250))
    assert s["marginal_kl"] > 0


def test_identical_points_carry_no_information():
    vae, test = _digits_model(epochs=1)
    same = TensorDataset(test.x[:1].repeat(200, 1), "digits", "test", (8, 8))
    s = elbo_surgery(vae, same, seed=0)
    assert abs(s["mutual_information"]) < 1e-4


def test_prior_equal_to_aggregate_posterior_has_no_marginal_kl():
    vae, test = _digits_model(epochs=1)
    data = test.subset(100)
    # A VampPrior whose pseudo-inputs are exactly the data points (binary, so Hardtanh
    # leaves them unchanged): p(z) = (1/N) sum_n q(z|x_n) = q(z).
    prior = VampPrior(6, 64, components=100)
    with torch.no_grad():
        prior.pseudo_weight.copy_(data.x)
    vae.prior = prior
    s = elbo_surgery(vae, data, seed=0)
    assert abs(s["marginal_kl"]) < 1e-4
    assert s["mutual_information"] == pytest.approx(s["avg_kl"], abs=1e-4)


class _FirstDims(nn.Module):
    """A decoder that reads only the first k latent dimensions."""

    def __init__(self, k, z_dim, x_dim):
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(k, 64), nn.ReLU(), nn.Linear(64, x_dim))

    def forward(self, z):
        return self.net(z[..., :self.k])


def test_active_units_finds_the_dimensions_the_decoder_ignores():
    train, _, test = load("digits")
    pyro.set_rng_seed(0)
    vae = VAE(64, 6, (64,))
    vae.decoder = _FirstDims(3, 6, 64)
    fit(vae, train, epochs=30, batch_size=64, lr=3e-3, progress=False)
    result = active_units(vae, test)
    activity = torch.tensor(result["activity"])
    # Ignored dimensions collapse onto the prior: their means no longer move with x.
    assert torch.all(activity[3:] < 0.01)
    assert torch.all(activity[:3] > 0.01)
    assert result["active_units"] == 3
    kl = torch.tensor(result["kl_per_dim"])
    assert torch.all(kl[3:] < 0.05) and torch.all(kl[:3] > 0.5)


def test_surgery_refuses_two_layer_models():
    hvae = HierarchicalVAE(12, 3, (8,), arch="mlp")
    with pytest.raises(ValueError, match=r"one latent site 'z'; this guide samples \['z2', 'z1'\]"):
        elbo_surgery(hvae, _lg_data(torch.ones(4, 12)))


def test_elbo_builds_no_autograd_graph():
    """Evaluation runs under torch.no_grad: the model sees gradients switched off."""
    vae = VAE(6, 2, (4,))
    seen = []
    original = vae.model

    def model(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    vae.model = model
    elbo(vae, torch.bernoulli(torch.full((10, 6), 0.5)))
    assert seen and not any(seen)

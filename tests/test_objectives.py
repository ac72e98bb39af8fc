import logging
import math

import pytest
import torch
from torch import nn
from torch.distributions import kl_divergence

import pyro.distributions as dist
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import VAE, HierarchicalVAE, fit, objectives
from pyro_vae.datasets import TensorDataset
from pyro_vae.objectives import beta_at, make_elbo, scale_latents, warn_if_monte_carlo_kl

from test_models import ExactPosterior, _linear_gaussian


def test_make_elbo():
    e = make_elbo("meanfield", 3)
    assert type(e) is TraceMeanField_ELBO
    # One "data" plate, plus the particle plate Pyro adds when vectorizing.
    assert e.num_particles == 3 and e.vectorize_particles and e.max_plate_nesting == 2
    assert type(make_elbo("trace")) is Trace_ELBO and not make_elbo("trace").vectorize_particles
    iwae = make_elbo("iwae", 5)
    assert type(iwae) is RenyiELBO and iwae.alpha == 0 and iwae.num_particles == 5
    with pytest.raises(ValueError, match="unknown loss 'iwa'"):
        make_elbo("iwa")
    with pytest.raises(ValueError, match="num_particles must be >= 1"):
        make_elbo("trace", 0)


def test_warmup_schedule():
    assert [beta_at(e, 1.0, 4) for e in range(1, 8)] == [0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert [beta_at(e, 4.0, 2) for e in range(1, 5)] == [0, 2, 4, 4]
    assert [beta_at(e, 0.5, 0) for e in range(1, 3)] == [0.5, 0.5]


def _fixed_vae():
    torch.manual_seed(1)
    vae = VAE(x_dim=10, z_dim=4, hidden=(8,), act="tanh")
    x = torch.bernoulli(torch.full((6, 10), 0.4))
    return vae, x


@pytest.mark.parametrize("beta", [0.0, 0.5, 4.0])
@pytest.mark.parametrize("num_data", [None, 60])
def test_beta_scales_the_kl_under_both_elbos(beta, num_data):
    vae, x = _fixed_vae()
    q = vae.encode(x)
    p = dist.Normal(torch.zeros(4), torch.ones(4)).to_event(1)
    torch.manual_seed(7)
    z = q.base_dist.loc + q.base_dist.scale * torch.randn(6, 4)  # the guide's eps
    recon = vae.decode(z).log_prob(x)
    scale = (num_data or 6) / 6
    kl_exact = kl_divergence(q, p.expand([6]))
    kl_sample = q.log_prob(z) - p.log_prob(z)
    for elbo, kl in ((TraceMeanField_ELBO(), kl_exact), (Trace_ELBO(), kl_sample)):
        torch.manual_seed(7)
        with scale_latents(beta):  # the handler fit applies: the model has no beta
            loss = elbo.loss(vae.model, vae.guide, x, num_data)
        expected = scale * (-recon.sum() + beta * kl.sum())
        assert loss == pytest.approx(expected.item(), rel=1e-5), type(elbo).__name__


def test_beta_applies_to_both_layers_of_the_hvae():
    torch.manual_seed(0)
    hvae = HierarchicalVAE(10, 3, (8,), arch="mlp")
    x = torch.bernoulli(torch.full((5, 10), 0.4))
    losses = {}
    for beta in (1.0, 3.0):
        torch.manual_seed(2)
        with scale_latents(beta):
            losses[beta] = TraceMeanField_ELBO().loss(hvae.model, hvae.guide, x)
    # With the same draws, loss(beta) = -recon + beta * (KL_z2 + KL_z1): linear in beta.
    torch.manual_seed(2)
    z2 = hvae.encode(x).rsample()
    z1 = hvae.encode_z1(x, z2).rsample()
    recon = hvae.decode(z1, z2).log_prob(x).sum().item()
    kl = (losses[1.0] + recon)
    assert losses[3.0] == pytest.approx(-recon + 3 * kl, rel=1e-5)
    assert kl > 0


class _DiagonalOfExact(nn.Module):
    """N(posterior mean, diag(posterior variances)): close, but blind to correlations."""

    def __init__(self, exact):
        super().__init__()
        self.exact = exact

    def forward(self, x):
        d = self.exact(x)
        return dist.Normal(d.loc, d.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()).to_event(1)


def test_iwae_bound_rises_with_k_towards_exact_log_likelihood():
    vae, x, W, b, sigma, log_px = _linear_gaussian()
    vae.encoder = _DiagonalOfExact(ExactPosterior(W, b, sigma))
    exact = log_px.sum().item()  # 8 data points
    torch.manual_seed(0)
    gap, se = {}, {}
    for k, repeats in ((1, 200), (10, 200), (1000, 40)):
        # The bound is an expectation: average independent estimates, keep their error.
        values = torch.tensor([-make_elbo("iwae", k).loss(vae.model, vae.guide, x)
                               for _ in range(repeats)])
        gap[k] = exact - values.mean().item()
        se[k] = values.std().item() / math.sqrt(repeats)

    def clearly_less(a, b):  # a < b by more than 3 combined standard errors
        return gap[b] - gap[a] > 3 * math.hypot(se[a], se[b])

    # Measured with these seeds: gaps of about 4.8, 0.35 and 0.02 nats.
    assert clearly_less(10, 1) and clearly_less(1000, 10)
    assert gap[1000] > -3 * se[1000]  # never above log p(x)
    assert gap[1000] < 0.1  # within 0.0125 nats per data point of the exact value


def test_iwae_must_not_see_the_plate_scale():
    """Pyro's RenyiELBO log-mean-exps scaled log-weights: with the plate's N / B it no
    longer estimates N / B times the IWAE bound. fit() therefore runs it unscaled."""
    vae, x, *_ = _linear_gaussian()
    torch.manual_seed(0)
    unscaled = make_elbo("iwae", 50).loss(vae.model, vae.guide, x)
    torch.manual_seed(0)
    scaled = make_elbo("iwae", 50).loss(vae.model, vae.guide, x, num_data=80)
    assert abs(scaled - 10 * unscaled) > 1.0  # not a rescaling: the bias is real
    assert not objectives.scales_with_data_size("iwae")


def test_fit_reports_the_iwae_bound_per_data_point():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((300, 12), 0.3))
    data = TensorDataset(x, "toy", "train", (3, 4))
    vae = VAE(12, 3, (16,))
    history = fit(vae, data, epochs=1, loss="iwae", num_particles=5, lr=1e-12,
                  batch_size=50, progress=False)
    # With frozen weights, the running training bound is an estimate of the same
    # quantity as a fresh evaluation: per data point, not scaled by N / B.
    fresh = pyro_vae_elbo(vae, data, "iwae", 5)
    assert history[0]["train_elbo"] == pytest.approx(fresh, abs=0.3)


def pyro_vae_elbo(vae, data, loss, k):
    from pyro_vae import elbo

    return elbo(vae, data, loss, k, seed=1)


def test_iwae_refuses_beta():
    data = TensorDataset(torch.ones(4, 3), "toy", "train", (1, 3))
    with pytest.raises(ValueError, match="IWAE bound has none"):
        fit(VAE(3, 2, (4,)), data, loss="iwae", beta=4.0, progress=False)


def test_monte_carlo_kl_fallback_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(objectives, "_warned", set())
    x = torch.bernoulli(torch.full((3, 10), 0.4))
    normal = VAE(10, 2, (8,))
    vamp = VAE(10, 2, (8,), prior="vamp", prior_options={"components": 4})
    hvae = HierarchicalVAE(10, 2, (8,), prior="vamp", prior_options={"components": 4},
                           arch="mlp")
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        assert warn_if_monte_carlo_kl("meanfield", normal.model, normal.guide, x) == []
        assert warn_if_monte_carlo_kl("trace", vamp.model, vamp.guide, x) == []
        assert warn_if_monte_carlo_kl("meanfield", vamp.model, vamp.guide, x) == ["z"]
        assert warn_if_monte_carlo_kl("meanfield", vamp.model, vamp.guide, x) == ["z"]
        # Only the top layer falls back: p(z1|z2) is Normal, as is q(z1|x,z2).
        assert warn_if_monte_carlo_kl("meanfield", hvae.model, hvae.guide, x) == ["z2"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "one-sample Monte Carlo" in messages[0]
    assert "Mixture(Independent(Normal))" in messages[0]

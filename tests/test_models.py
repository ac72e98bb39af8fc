import math

import pytest
import torch
from torch import nn
from torch.distributions import kl_divergence

import pyro.distributions as dist
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import VAE, GaussianLikelihood, HierarchicalVAE
from pyro_vae.models import build
from pyro_vae.objectives import make_elbo
from pyro_vae.priors import PRIORS, VampPrior


def test_trace_site_names_and_shapes():
    vae = VAE(x_dim=12, z_dim=3, hidden=(7,))
    x = torch.bernoulli(torch.full((5, 12), 0.3))
    guide_tr = poutine.trace(vae.guide).get_trace(x, num_data=100)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x, num_data=100)

    assert {n for n, s in guide_tr.nodes.items() if s["type"] == "sample"} == {"data", "z"}
    assert {n for n, s in model_tr.nodes.items() if s["type"] == "sample"} == {"data", "z", "x"}
    z_q, z_p, x_site = guide_tr.nodes["z"], model_tr.nodes["z"], model_tr.nodes["x"]
    assert z_q["fn"].batch_shape == (5,) and z_q["fn"].event_shape == (3,)
    assert z_p["fn"].batch_shape == (5,) and z_p["fn"].event_shape == (3,)
    assert x_site["fn"].batch_shape == (5,) and x_site["fn"].event_shape == (12,)
    assert x_site["is_observed"] and torch.equal(x_site["value"], x)
    assert torch.equal(z_p["value"], z_q["value"]) and z_q["value"].shape == (5, 3)
    # The data plate scales every site by N / B.
    assert z_p["scale"] == x_site["scale"] == z_q["scale"] == pytest.approx(100 / 5)
    assert [f.name for f in x_site["cond_indep_stack"]] == ["data"]


def test_vectorized_particles_shapes():
    vae = VAE(x_dim=12, z_dim=3, hidden=(7,))
    x = torch.bernoulli(torch.full((5, 12), 0.3))
    elbo = make_elbo("trace", num_particles=4)
    # Pyro's vectorized particle plate sits left of the data plate.
    model_tr, guide_tr = elbo._get_vectorized_trace(vae.model, vae.guide, (x,), {})
    assert guide_tr.nodes["z"]["value"].shape == (4, 5, 3)
    assert model_tr.nodes["x"]["fn"].batch_shape == (4, 5)


def _fixed_vae():
    torch.manual_seed(1)
    vae = VAE(x_dim=10, z_dim=4, hidden=(8,), act="tanh")
    x = torch.bernoulli(torch.full((6, 10), 0.4))
    return vae, x


@pytest.mark.parametrize("num_data", [None, 60])
def test_meanfield_loss_is_recon_plus_analytic_kl(num_data):
    vae, x = _fixed_vae()
    q = vae.encode(x)
    torch.manual_seed(123)
    eps = torch.randn(6, 4)
    z = q.base_dist.loc + q.base_dist.scale * eps
    recon = vae.decode(z).log_prob(x)  # (B,)
    kl = kl_divergence(torch.distributions.Normal(q.base_dist.loc, q.base_dist.scale),
                       torch.distributions.Normal(torch.zeros(4), torch.ones(4))).sum(-1)
    scale = (num_data or 6) / 6
    expected = scale * (-(recon - kl).sum())

    torch.manual_seed(123)  # the guide's rsample draws the same eps
    guide_tr = poutine.trace(vae.guide).get_trace(x, num_data)
    assert torch.allclose(guide_tr.nodes["z"]["value"], z, atol=1e-6)
    torch.manual_seed(123)
    loss = TraceMeanField_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x, num_data)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    # Trace_ELBO on the same eps: the Monte Carlo KL log q(z) - log p(z) instead.
    log_qz = q.log_prob(z)
    log_pz = dist.Normal(0.0, 1.0).expand([4]).to_event(1).log_prob(z)
    torch.manual_seed(123)
    loss_mc = Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x, num_data)
    assert loss_mc == pytest.approx((scale * -(recon - log_qz + log_pz).sum()).item(), rel=1e-5)


class ExactPosterior(nn.Module):
    """q(z|x) = p(z|x) of the linear-Gaussian model x = Wz + b + sigma * eps, z ~ N(0, I)."""

    def __init__(self, W, b, sigma):
        super().__init__()
        self.W, self.b, self.sigma = W, b, sigma
        prec = torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W / sigma ** 2
        self.cov = torch.linalg.inv(prec)

    def forward(self, x):
        loc = (x - self.b) @ self.W @ self.cov / self.sigma ** 2
        return dist.MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(self.cov))


def _linear_gaussian(encoder=None, seed=0):
    torch.manual_seed(seed)
    x_dim, z_dim, sigma = 5, 3, 0.5
    W = torch.randn(x_dim, z_dim, dtype=torch.float64)
    b = torch.randn(x_dim, dtype=torch.float64)
    vae = VAE(x_dim, z_dim, hidden=(), likelihood=GaussianLikelihood(x_dim, scale=sigma),
              encoder=encoder or "diagonal").double()
    decoder = vae.decoder[0]
    with torch.no_grad():
        decoder.weight.copy_(W)
        decoder.bias.copy_(b)
    x = (torch.randn(8, z_dim, dtype=torch.float64) @ W.T + b
         + sigma * torch.randn(8, x_dim, dtype=torch.float64))
    marginal = dist.MultivariateNormal(b, W @ W.T + sigma ** 2 * torch.eye(x_dim, dtype=W.dtype))
    return vae, x, W, b, sigma, marginal.log_prob(x)


def test_linear_gaussian_exact_posterior_gives_exact_log_likelihood():
    vae, x, W, b, sigma, log_px = _linear_gaussian()
    vae.encoder = ExactPosterior(W, b, sigma)
    # With q = p(z|x), log p(x, z) - log q(z|x) = log p(x) for every z: no Monte Carlo error.
    elbo = -make_elbo("trace").loss(vae.model, vae.guide, x)
    assert elbo == pytest.approx(log_px.sum().item(), abs=1e-3)


def test_linear_gaussian_exact_posterior_meanfield_uses_closed_form_kl():
    """A full-covariance q against the N(0, I) prior has a closed-form KL (registered by
    pyro_vae.guides): TraceMeanField_ELBO = E_q log p(x|z) - KL, exact in expectation,
    with Monte Carlo error from the reconstruction term only."""
    vae, x, W, b, sigma, log_px = _linear_gaussian()
    vae.encoder = ExactPosterior(W, b, sigma)
    q = vae.encoder(x)
    kl = kl_divergence(q, vae.p_z().expand([len(x)]))
    exact_kl = kl_divergence(q, dist.MultivariateNormal(torch.zeros(3, dtype=x.dtype),
                                                         torch.eye(3, dtype=x.dtype)))
    assert torch.allclose(kl, exact_kl, rtol=1e-12)
    torch.manual_seed(0)
    particles = 4000
    elbo = -make_elbo("meanfield", particles).loss(vae.model, vae.guide, x)
    recon = vae.decode(q.sample((particles,))).log_prob(x).sum(-1)
    stderr = recon.std().item() / math.sqrt(particles)
    assert abs(elbo - log_px.sum().item()) < 5 * stderr


def test_linear_gaussian_elbo_of_any_guide_is_log_px_minus_kl_to_posterior():
    vae, x, W, b, sigma, log_px = _linear_gaussian()
    exact = ExactPosterior(W, b, sigma)
    q = vae.encode(x)  # the randomly initialized diagonal guide
    q_full = dist.MultivariateNormal(q.base_dist.loc, scale_tril=torch.diag_embed(q.base_dist.scale))
    gap = kl_divergence(q_full, exact(x))  # (B,), exact: ELBO = log p(x) - KL(q || p(z|x))
    particles = 4000
    torch.manual_seed(0)
    elbo = -make_elbo("trace", particles).loss(vae.model, vae.guide, x)
    # Monte Carlo standard error of the summed ELBO, from independent draws.
    z = q.sample((particles,))
    log_w = (vae.decode(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)).sum(-1)
    stderr = log_w.std().item() / math.sqrt(particles)
    expected = (log_px - gap).sum().item()
    assert abs(elbo - expected) < 5 * stderr
    assert gap.sum().item() > 10 * stderr  # the bound is strict, and measurably so
    assert elbo < log_px.sum().item()


def test_sample_draws_from_prior_and_reconstruct_uses_posterior_mean():
    vae, x, W, b, sigma, _ = _linear_gaussian()
    torch.manual_seed(0)
    xs = vae.sample(20000)
    # Mean of p(x|z) = Wz + b with z ~ N(0, I): mean b, covariance W W^T.
    assert torch.allclose(xs.mean(0), b, atol=0.05)
    assert torch.allclose(torch.cov(xs.T), W @ W.T, atol=0.15)
    vae.encoder = ExactPosterior(W, b, sigma)
    assert torch.allclose(vae.reconstruct(x), vae.encoder(x).mean @ W.T + b)


def test_unknown_part_names_are_rejected():
    with pytest.raises(ValueError, match="unknown prior 'nope'"):
        VAE(4, 2, prior="nope")
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        VAE(4, 2, likelihood="poisson")


# --- Hierarchical VAE, gated networks, building parts -------------------------------


def test_hvae_trace_site_names_and_shapes():
    hvae = HierarchicalVAE(12, 3, (8, 8), prior="vamp", prior_options={"components": 4})
    x = torch.bernoulli(torch.full((5, 12), 0.3))
    guide_tr = poutine.trace(hvae.guide).get_trace(x, num_data=50)
    model_tr = poutine.trace(poutine.replay(hvae.model, trace=guide_tr)).get_trace(x, num_data=50)
    assert [n for n, s in guide_tr.nodes.items() if s["type"] == "sample"] == ["data", "z2", "z1"]
    assert [n for n, s in model_tr.nodes.items() if s["type"] == "sample"] == [
        "data", "z2", "z1", "x"]
    for name, event in (("z2", 3), ("z1", 3), ("x", 12)):
        fn = model_tr.nodes[name]["fn"]
        assert fn.batch_shape == (5,) and fn.event_shape == (event,), name
        assert model_tr.nodes[name]["scale"] == pytest.approx(10.0)
    for name in ("z2", "z1"):
        assert guide_tr.nodes[name]["fn"].batch_shape == (5,)
        assert guide_tr.nodes[name]["value"].shape == (5, 3)
    # p(z1 | z2) is conditioned on the guide's z2.
    z2 = guide_tr.nodes["z2"]["value"]
    assert torch.allclose(model_tr.nodes["z1"]["fn"].mean, hvae.p_z1(z2).mean)
    # Vectorized particles broadcast x against a leading sample dimension.
    model_v, guide_v = make_elbo("trace", 4)._get_vectorized_trace(hvae.model, hvae.guide, (x,), {})
    assert guide_v.nodes["z1"]["value"].shape == (4, 5, 3)
    assert model_v.nodes["x"]["fn"].batch_shape == (4, 5)
    assert hvae.sample(6).shape == (6, 12) and hvae.reconstruct(x).shape == (5, 12)


@pytest.mark.slow
def test_hvae_training_on_mnist_subset_raises_validation_elbo(mnist):
    from pyro_vae import elbo, fit

    train, valid, _ = mnist
    train, valid = train.subset(3000), valid.subset(1000)
    hvae = HierarchicalVAE(784, 20, (200,), prior="vamp", prior_options={"components": 50})
    before = elbo(hvae, valid, seed=0)
    fit(hvae, train, valid, epochs=3, batch_size=100, progress=False)
    after = elbo(hvae, valid, seed=0)
    # Untrained about -545 nats (784 log 2 = 543); 90 steps reach about -200.
    assert before < -500 and after > before + 150


def test_gated_network_and_logvar_scale_bounds():
    vae = VAE(12, 3, (8, 8), arch="gated")
    assert [type(m).__name__ for m in vae.decoder] == ["GatedDense", "GatedDense", "Linear"]
    assert vae.encoder.scale == "logvar"
    with torch.no_grad():
        for p in vae.encoder.parameters():
            p.mul_(1000)  # push the log-variance far outside [-6, 2]
    scale = vae.encode(torch.rand(50, 12)).base_dist.scale
    assert scale.min() >= math.exp(-3) - 1e-6 and scale.max() <= math.exp(1) + 1e-6
    assert scale.min() < 0.06 and scale.max() > 2.7  # both bounds are reached


def test_build_passes_context_and_refuses_unknown_options():
    vamp = build("vamp", PRIORS, "prior", dict(z_dim=3, x_dim=12), {"components": 9})
    assert isinstance(vamp, VampPrior) and vamp.pseudo_inputs.shape == (9, 12)
    with pytest.raises(ValueError, match="prior 'normal' takes no option components"):
        build("normal", PRIORS, "prior", dict(z_dim=3, x_dim=12), {"components": 9})
    # "package.module:ClassName" loads a class by import path.
    cls = build("pyro_vae.priors:MixtureOfGaussians", PRIORS, "prior", dict(z_dim=2, x_dim=5))
    assert type(cls).__name__ == "MixtureOfGaussians" and cls.locs.shape == (10, 2)
    with pytest.raises(ValueError, match="cannot load prior 'no_such_module:Prior'"):
        build("no_such_module:Prior", PRIORS, "prior", {})

import math

import pytest
import torch
from torch.distributions import kl_divergence

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import SVI

from pyro_vae import VAE, fit
from pyro_vae.datasets import TensorDataset
from pyro_vae.evaluation import elbo, log_likelihood
from pyro_vae.guides import GUIDES, DiagonalNormalEncoder
from pyro_vae.models import MODELS
from pyro_vae.objectives import make_elbo

from test_models import ExactPosterior, _linear_gaussian


def test_diagonal_encoder_shapes_and_reparameterization():
    torch.manual_seed(0)
    enc = DiagonalNormalEncoder(10, 3, hidden=(8,))
    x = torch.rand(5, 10)
    q = enc(x)
    assert q.batch_shape == (5,) and q.event_shape == (3,) and q.has_rsample
    z = q.rsample()
    z.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    # Vectorized particles: leading sample dims pass through.
    assert q.rsample((4,)).shape == (4, 5, 3)
    assert q.log_prob(q.sample((4,))).shape == (4, 5)


def test_diagonal_encoder_scale_is_positive_and_bounded_below():
    enc = DiagonalNormalEncoder(4, 2, hidden=())
    with torch.no_grad():
        enc.net[0].weight.zero_()
        enc.net[0].bias.fill_(-1e4)  # softplus underflows to 0
    scale = enc(torch.zeros(3, 4)).base_dist.scale
    assert torch.all(scale == enc.min_scale)
    assert torch.isfinite(enc(torch.zeros(3, 4)).log_prob(torch.zeros(3, 2))).all()


def test_registry():
    assert GUIDES["diagonal"] is DiagonalNormalEncoder


GUIDE_NAMES = ["diagonal", "fullrank", "iaf"]


def _guide(name, x_dim=10, z_dim=3, **kw):
    return GUIDES[name](x_dim, z_dim, hidden=(16,), **kw)


@pytest.mark.parametrize("name", GUIDE_NAMES)
def test_guide_shapes_and_reparameterized_gradients(name):
    torch.manual_seed(0)
    enc = _guide(name)
    x = torch.rand(5, 10)
    q = enc(x)
    assert q.batch_shape == (5,) and q.event_shape == (3,) and q.has_rsample
    z = q.rsample((4,))  # vectorized particles: leading sample dims pass through
    assert z.shape == (4, 5, 3) and q.log_prob(z).shape == (4, 5)
    # Every parameter of the family gets a gradient through the sample itself.
    z.pow(2).sum().backward()
    used = [p for n, p in enc.named_parameters() if not n.startswith("offdiag")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)
    if name == "fullrank":  # off-diagonal outputs start at 0 but are live
        assert enc.offdiag.weight.grad.abs().sum() > 0


def test_fullrank_log_prob_is_the_gaussian_density_of_its_covariance():
    torch.manual_seed(1)
    enc = _guide("fullrank").double()
    with torch.no_grad():  # make the off-diagonal part non-trivial
        enc.offdiag.weight.normal_(0, 0.5)
        enc.offdiag.bias.normal_(0, 0.5)
    x = torch.rand(6, 10, dtype=torch.float64)
    q = enc(x)
    z = q.sample((3,))
    L = q.scale_tril
    assert torch.all(L.triu(1) == 0) and torch.all(L.diagonal(dim1=-2, dim2=-1) > 0)
    assert L.tril(-1).abs().sum() > 0
    cov = L @ L.transpose(-1, -2)
    diff = (z - q.loc).unsqueeze(-1)  # (3, 6, 3, 1)
    maha = (diff.transpose(-1, -2) @ torch.linalg.inv(cov) @ diff).squeeze(-1).squeeze(-1)
    expected = -0.5 * (maha + torch.logdet(cov) + 3 * math.log(2 * math.pi))
    # Its own sample (density from the noise that made it) and any other value.
    assert torch.allclose(q.log_prob(z), expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose(q.log_prob(z.clone()), expected, rtol=1e-10, atol=1e-10)


def test_fullrank_density_of_own_samples_survives_ill_conditioning():
    """With off-diagonal entries 100x the diagonal, the triangular solve in float32 is
    far off; the density of the guide's own samples stays exact (float64 reference)."""
    torch.manual_seed(5)
    enc = _guide("fullrank", scale="softplus", min_scale=1e-4)
    with torch.no_grad():
        enc.net[-1].bias[3:].fill_(-6.0)  # diagonal of L ~ 2.5e-3
        enc.offdiag.bias.fill_(0.5)
    q = enc(torch.zeros(4, 10))
    torch.manual_seed(6)
    z = q.rsample()
    torch.manual_seed(6)
    eps = torch.randn(4, 3, dtype=torch.float64)  # the same draw, then z in float64
    loc, tril = q.loc.double(), q.scale_tril.double()
    z64 = loc + (tril @ eps.unsqueeze(-1)).squeeze(-1)
    exact = dist.MultivariateNormal(loc, scale_tril=tril).log_prob(z64)
    assert torch.allclose(q.log_prob(z).double(), exact, rtol=1e-5)
    assert not torch.allclose(q.log_prob(z.clone()).double(), exact, rtol=1e-3)


def test_iaf_log_prob_is_the_change_of_variables_formula():
    """log q(z) = log N(eps; mu, sigma) - log|det dz/deps|, with the Jacobian of the whole
    flow taken by autograd on the forward map (not Pyro's log-det formula), and eps
    recovered by inverting a fresh copy of the flow (no cached values)."""
    torch.manual_seed(2)
    enc = _guide("iaf", flow_steps=3).double()
    x = torch.rand(4, 10, dtype=torch.float64)
    q = enc(x)
    z = q.rsample()
    cached = q.log_prob(z)  # Pyro's path: cached eps and log-scales
    base = enc(x).base_dist
    fresh = enc(x).transforms  # new transform objects: nothing cached
    eps = z
    for t in reversed(fresh):
        eps = t.inv(eps)
    for b in range(len(x)):
        def forward(e, b=b):
            h = e.unsqueeze(0).expand(len(x), -1).clone()
            for t in enc(x).transforms:
                h = t(h)
            return h[b]
        jac = torch.autograd.functional.jacobian(forward, eps[b])
        expected = base.log_prob(eps)[b] - torch.linalg.slogdet(jac)[1]
        assert torch.allclose(cached[b], expected, rtol=1e-9, atol=1e-9)
    # The recomputed density at z (no cache) agrees too.
    assert torch.allclose(enc(x).log_prob(z.detach().clone()), cached, rtol=1e-8)


def test_fullrank_diagonal_kl_is_closed_form_and_only_for_diagonal_normals():
    torch.manual_seed(3)
    enc = _guide("fullrank").double()
    with torch.no_grad():
        enc.offdiag.weight.normal_(0, 0.5)
    q = enc(torch.rand(5, 10, dtype=torch.float64))
    loc, scale = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + .5
    p = dist.Normal(loc, scale).to_event(1).expand([5])
    reference = kl_divergence(q, dist.MultivariateNormal(loc, scale_tril=torch.diag(scale)))
    assert torch.allclose(kl_divergence(q, p), reference, rtol=1e-10)
    with pytest.raises(NotImplementedError):
        kl_divergence(q, dist.Laplace(loc, scale).to_event(1).expand([5]))


@pytest.mark.parametrize("model", ["vae", "hvae"])
@pytest.mark.parametrize("prior", ["normal", "mog", "vamp"])
@pytest.mark.parametrize("name", GUIDE_NAMES)
def test_every_guide_and_prior_agree_between_estimator_and_pyro_elbo(name, prior, model):
    """With one sample and the same seed, the log-likelihood estimator's log weight is
    exactly Pyro's one-particle Trace_ELBO: both trace the same guide draw and replay the
    model, for every guide family, prior and model. IWAE and TraceMeanField run too."""
    torch.manual_seed(4)
    x = torch.bernoulli(torch.full((6, 12), 0.4))
    options = {"components": 3} if prior != "normal" else None
    vae = MODELS[model](12, 3, (8,), prior=prior, encoder=name, prior_options=options)
    data = TensorDataset(x, "toy", "test", (3, 4))
    pyro.set_rng_seed(0)
    trace_elbo = -make_elbo("trace").loss(vae.model, vae.guide, x)
    one_sample = log_likelihood(vae, data, num_samples=1, chunk=1, batch_size=6, seed=0)
    assert one_sample.sum().item() == pytest.approx(trace_elbo, rel=1e-5)
    for loss in ("meanfield", "iwae"):
        assert math.isfinite(make_elbo(loss, 2).loss(vae.model, vae.guide, x))


def _train_guide(vae, x, guide, steps=800, lr=0.03, particles=256):
    """Fit ``guide`` to the fixed model: many particles keep the gradient noise, and so
    the distance left to the optimum, small; the step size drops 10x for the last third."""
    vae.encoder = guide
    pyro.clear_param_store()
    svi = SVI(poutine.block(vae.model, hide_types=["param"]), vae.guide,
              pyro.optim.Adam({"lr": lr}), make_elbo("meanfield", particles))
    for step in range(steps):
        if step == steps * 2 // 3:
            svi.optim = pyro.optim.Adam({"lr": lr / 10})
        svi.step(x)


def test_fullrank_guide_reaches_exact_log_px_on_correlated_posterior_and_diagonal_does_not():
    """The linear-Gaussian model with non-orthogonal W has a correlated posterior, with
    mean linear in x and a constant covariance: a one-layer full-rank encoder can
    represent it exactly, a diagonal one cannot. Trained to convergence (fixed seeds),
    the full-rank ELBO meets log p(x) within 1e-2 nats per point (3e-3 here); the
    diagonal one stays below by KL(q || p(z|x)) > 0.1 nats per point (0.34 here)."""
    vae, x, W, b, sigma, log_px = _linear_gaussian()
    cos = (W[:, 0] @ W[:, 1]) / (W[:, 0].norm() * W[:, 1].norm())
    assert cos.abs() > 0.2  # non-orthogonal columns
    gaps = {}
    for name in ("fullrank", "diagonal"):
        torch.manual_seed(0)
        pyro.set_rng_seed(0)
        guide = GUIDES[name](5, 3, hidden=()).double()
        _train_guide(vae, x, guide)
        # Exact ELBO: log p(x) - KL(q || p(z|x)), both Gaussians in closed form.
        q = guide(x)
        q_full = q if name == "fullrank" else dist.MultivariateNormal(
            q.base_dist.loc, scale_tril=torch.diag_embed(q.base_dist.scale))
        gaps[name] = kl_divergence(q_full, ExactPosterior(W, b, sigma)(x)).mean().item()
        # Pyro's estimate of that ELBO agrees (many particles).
        with torch.no_grad():
            estimate = -make_elbo("trace", 20000).loss(vae.model, vae.guide, x) / len(x)
        assert estimate == pytest.approx(log_px.mean().item() - gaps[name], abs=0.02)
    assert gaps["fullrank"] < 1e-2
    assert gaps["diagonal"] > 0.1


def test_flow_guide_beats_diagonal_on_a_frozen_mnist_model(mnist):
    """A small VAE trained on MNIST, then frozen; a fresh diagonal guide and a fresh IAF
    guide (same encoder network, 2 flow steps) are each fitted to it for the same steps
    with the same seeds. The flow's test ELBO is at least the diagonal's."""
    train, _, test = mnist
    train, test = train.subset(2000), test.subset(500)
    pyro.set_rng_seed(0)
    vae = VAE(784, 16, hidden=(200,))
    fit(vae, train, epochs=3, progress=False, seed=0)
    results = {}
    for name in ("diagonal", "iaf"):
        pyro.set_rng_seed(1)
        options = {"flow_steps": 2} if name == "iaf" else {}
        vae.swap_guide(GUIDES[name](784, 16, hidden=(200,), **options))
        fit(vae, train, epochs=6, loss="trace", progress=False, seed=1, freeze_model=True)
        results[name] = elbo(vae, test, loss="trace", num_particles=20, seed=0)
    assert results["iaf"] >= results["diagonal"], results


@pytest.mark.parametrize("name", ["diagonal", "fullrank"])
def test_meanfield_loss_is_reconstruction_minus_closed_form_kl(name):
    """Against the N(0, I) prior the diagonal and full-rank guides have a closed-form KL,
    and TraceMeanField_ELBO uses it: with the guide's own draw z, its loss is
    -(log p(x|z) - KL(q(z|x) || N(0, I))), the KL from torch's Normal/Normal or
    MultivariateNormal/MultivariateNormal formula (not this package's registration),
    to 1e-10 relative in float64. The one-sample Monte Carlo KL,
    log q(z|x) - log p(z), gives a loss more than 0.1 nats away."""
    torch.manual_seed(0)
    vae = VAE(12, 3, (8,), encoder=name).double()
    if name == "fullrank":  # make the off-diagonal part of L(x) non-trivial
        with torch.no_grad():
            vae.encoder.offdiag.weight.normal_(0, 0.5)
            vae.encoder.offdiag.bias.normal_(0, 0.5)
    x = torch.bernoulli(torch.full((4, 12), 0.5, dtype=torch.float64))
    draws = []

    def guide(x, num_data=None):  # the model's guide, recording its draw
        z = vae.guide(x, num_data)
        draws.append(z.detach())
        return z

    loss = make_elbo("meanfield").loss(vae.model, guide, x)
    (z,) = draws
    with torch.no_grad():
        q = vae.encode(x)
        recon = vae.decode(z).log_prob(x).sum().item()
        zeros, eye = torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
        if name == "fullrank":
            rows, cols = torch.tril_indices(3, 3, -1)
            assert q.scale_tril[..., rows, cols].abs().min() > 1e-3
            kl = kl_divergence(dist.MultivariateNormal(q.loc, scale_tril=q.scale_tril),
                               dist.MultivariateNormal(zeros, scale_tril=eye)).sum().item()
        else:
            kl = kl_divergence(q.base_dist, dist.Normal(zeros, 1.0)).sum().item()
        monte_carlo_kl = (q.log_prob(z) - dist.Normal(zeros, 1.0).to_event(1).log_prob(z)
                          ).sum().item()
    assert kl > 0
    assert loss == pytest.approx(-(recon - kl), rel=1e-10)
    assert abs(loss + recon - monte_carlo_kl) > 0.1


def test_meanfield_logs_the_flow_guides_monte_carlo_kl_exactly_once(caplog, monkeypatch):
    """Against the N(0, I) prior, diagonal and full-rank guides log nothing; the flow
    guide (no closed-form KL) logs exactly one warning naming the pair and the site,
    however often it is checked."""
    import logging

    from pyro_vae import objectives
    from pyro_vae.objectives import warn_if_monte_carlo_kl

    monkeypatch.setattr(objectives, "_warned", set())  # a fresh session's state
    x = torch.bernoulli(torch.full((4, 12), 0.5))
    found = {}
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        for name in ("diagonal", "fullrank"):
            vae = VAE(12, 3, (8,), encoder=name)
            found[name] = warn_if_monte_carlo_kl("meanfield", vae.model, vae.guide, x)
        assert caplog.records == []
        for _ in range(2):
            vae = VAE(12, 3, (8,), encoder="iaf")
            found["iaf"] = warn_if_monte_carlo_kl("meanfield", vae.model, vae.guide, x)
    assert found == {"diagonal": [], "fullrank": [], "iaf": ["z"]}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert messages[0].startswith(
        "TraceMeanField_ELBO has no closed-form KL(TransformedDistribution(Independent("
        "Normal)) || Independent(Normal)) at site 'z': Pyro uses a one-sample Monte Carlo "
        "estimate of the KL instead"), messages[0]
    assert caplog.records[0].levelno == logging.WARNING

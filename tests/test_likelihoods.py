import math

import pytest
import torch
import torch.nn.functional as F

from pyro_vae.likelihoods import LIKELIHOODS, BernoulliLikelihood, GaussianLikelihood


def test_bernoulli_log_prob_is_negative_bce_on_logits():
    torch.manual_seed(0)
    logits = 30 * torch.randn(4, 6)  # large logits: a sigmoid-then-log would overflow
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    d = BernoulliLikelihood(6)(logits)
    assert d.batch_shape == (4,) and d.event_shape == (6,)
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    assert torch.allclose(d.log_prob(x), expected)
    assert torch.isfinite(d.log_prob(x)).all()
    assert torch.allclose(d.mean, torch.sigmoid(logits))


def test_bernoulli_rejects_gray_values():
    head = BernoulliLikelihood(3)
    head.check(torch.tensor([[0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"train data has other values \(e.g. 0.5\)"):
        head.check(torch.tensor([[0.0, 0.5, 0.25]]), "train data")


def test_gaussian_log_prob_with_fixed_scale():
    loc, x = torch.zeros(2, 3), torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.5, 0.5]])
    d = GaussianLikelihood(3, scale=2.0)(loc)
    expected = (-0.5 * (x / 2.0) ** 2 - math.log(2.0) - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(d.log_prob(x), expected)
    assert not list(GaussianLikelihood(3, scale=2.0).parameters())
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        GaussianLikelihood(3, scale=0.0)


def test_gaussian_learned_scale_starts_at_one_and_stays_above_minimum():
    head = GaussianLikelihood(3)
    assert torch.allclose(head.scale, torch.ones(3), atol=1e-3)
    with torch.no_grad():
        head.raw_scale.fill_(-1e4)
    assert torch.allclose(head.scale, torch.full((3,), head.min_scale))
    with pytest.raises(ValueError, match="finite"):
        head.check(torch.tensor([[float("nan"), 0.0, 0.0]]))


def test_registry():
    assert LIKELIHOODS == {"bernoulli": BernoulliLikelihood, "gaussian": GaussianLikelihood}


def test_bernoulli_in_a_plate_and_particles_matches_pyro_bernoulli():
    """Pyro expands the likelihood over particle and data plates; the summed form must
    give Pyro's own Bernoulli density there, and sample with mean sigmoid(logits)."""
    import pyro
    import pyro.distributions as dist
    from pyro import poutine

    torch.manual_seed(1)
    logits = 4 * torch.randn(3, 5)
    x = torch.bernoulli(torch.full((3, 5), 0.5))

    def model(head):
        with pyro.plate("particles", 7, dim=-2), pyro.plate("data", 3, dim=-1):
            pyro.sample("x", head(logits), obs=x)

    ours = poutine.trace(model).get_trace(BernoulliLikelihood(5))
    pyros = poutine.trace(model).get_trace(lambda l: dist.Bernoulli(logits=l).to_event(1))
    lp, ref = ours.nodes["x"]["fn"].log_prob(x), pyros.nodes["x"]["fn"].log_prob(x)
    assert lp.shape == ref.shape == (7, 3)
    assert torch.allclose(lp, ref, rtol=1e-6, atol=1e-5)
    draws = BernoulliLikelihood(5)(logits).sample((20000,))
    assert draws.shape == (20000, 3, 5) and set(draws.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(draws.mean(0), torch.sigmoid(logits), atol=0.015)  # ~4.5 sd

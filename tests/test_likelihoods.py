import math

import pytest
import torch
import torch.nn.functional as F

from pyro_vae.likelihoods import (
    LIKELIHOODS, BernoulliLikelihood, ContinuousBernoulliLikelihood,
    ContinuousBernoulliLogits, DiscretizedLogistic, DiscretizedLogisticLikelihood,
    GaussianDecodedLikelihood, GaussianLikelihood)


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


def test_gaussian_learned_scale_starts_at_init_scale_and_stays_above_minimum():
    head = GaussianLikelihood(3)
    assert torch.allclose(head.scale, torch.full((3,), 0.1), atol=1e-6)  # data in [0, 1]
    assert torch.allclose(GaussianLikelihood(3, init_scale=1.0).scale, torch.ones(3))
    with torch.no_grad():
        head.raw_scale.fill_(-1e4)
    assert torch.allclose(head.scale, torch.full((3,), head.min_scale))
    with pytest.raises(ValueError, match="finite"):
        head.check(torch.tensor([[float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="init_scale must be finite and > min_scale"):
        GaussianLikelihood(3, init_scale=1e-4)


def test_registry():
    assert LIKELIHOODS == {"bernoulli": BernoulliLikelihood, "gaussian": GaussianLikelihood,
                           "gaussian_decoded": GaussianDecodedLikelihood,
                           "discretized_logistic": DiscretizedLogisticLikelihood,
                           "continuous_bernoulli": ContinuousBernoulliLikelihood}
    outputs = {name: cls.outputs_per_feature for name, cls in LIKELIHOODS.items()}
    assert outputs == {"bernoulli": 1, "gaussian": 1, "gaussian_decoded": 2,
                       "discretized_logistic": 2, "continuous_bernoulli": 1}
    assert {n for n, cls in LIKELIHOODS.items() if cls.discrete} == {
        "bernoulli", "discretized_logistic"}


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


# ---- heads for continuous and gray data: log_prob against densities written by hand, in
# float64, by other formulas than the package's (tolerance 1e-5 on float32 results).

GRID = torch.arange(256, dtype=torch.float64) / 255  # every 8-bit value / 255


def _features(loc, raw_scale):
    """Decoder features of a k = 2 head: all locations, then all raw scales."""
    return torch.cat([loc, raw_scale], dim=-1).float()


def test_gaussian_decoded_is_a_normal_with_the_decoded_scale():
    torch.manual_seed(0)
    loc, raw = torch.randn(4, 5), 3 * torch.randn(4, 5)
    head = GaussianDecodedLikelihood(5)
    d = head(_features(loc, raw))
    assert d.batch_shape == (4,) and d.event_shape == (5,)
    sigma = (1e-3 + F.softplus(raw.double() + math.log(math.expm1(0.1 - 1e-3))))
    x = torch.cat([torch.zeros(2, 5), torch.ones(2, 5)]) + 0.3 * torch.randn(4, 5)
    z = (x.double() - loc.double()) / sigma
    expected = (-0.5 * z ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(d.log_prob(x).double(), expected, atol=1e-5, rtol=1e-6)
    # sigma starts at 0.1 for zero features, and never goes below min_scale
    assert torch.allclose(head(torch.zeros(1, 10)).base_dist.scale, torch.full((1, 5), 0.1))
    assert head(torch.full((1, 10), -1e4)).base_dist.scale.min() == pytest.approx(1e-3)


def _logistic_pmf(x, loc, scale):
    """The 256-value discretized logistic by hand: CDF differences, edge bins the tails.
    Above loc the same difference is taken of survival functions 1 - F, which keeps
    float64's precision in the upper tail (where 1 - F(v) is tiny)."""
    cdf = lambda v: torch.sigmoid((v - loc) / scale)  # noqa: E731
    sf = lambda v: torch.sigmoid((loc - v) / scale)  # noqa: E731
    h = 0.5 / 255
    first, last = x <= 0, x >= 1
    below = (torch.where(last, torch.ones_like(x), cdf(x + h))
             - torch.where(first, torch.zeros_like(x), cdf(x - h)))
    above = (torch.where(first, torch.ones_like(x), sf(x - h))
             - torch.where(last, torch.zeros_like(x), sf(x + h)))
    return torch.where(x > loc, above, below)


@pytest.mark.parametrize("loc,scale", [(0.5, 0.1), (0.02, 0.03), (0.97, 0.2), (-0.4, 0.05),
                                       (1.3, 0.5), (0.6, 0.002)])
def test_discretized_logistic_log_prob_is_the_hand_summed_pmf(loc, scale):
    d = DiscretizedLogistic(torch.tensor(loc), torch.tensor(scale))
    lp = d.log_prob(GRID.float()).double()
    ref = _logistic_pmf(GRID, torch.tensor(loc, dtype=torch.float64),
                        torch.tensor(scale, dtype=torch.float64))
    mass = ref > 1e-30  # where float64 still holds the hand-written probability
    assert torch.allclose(lp[mass], ref[mass].log(), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lp).all()  # also far in the tails, where the difference underflows
    # the edge bins hold the tails: the 256 float32 probabilities sum to one
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=5e-5)
    assert d.mean.item() == pytest.approx((ref * GRID).sum().item(), abs=1e-5)


def test_discretized_logistic_head_edges_samples_and_support():
    head = DiscretizedLogisticLikelihood(3)
    loc = torch.tensor([[0.0, 0.5, 1.0]])
    raw = torch.tensor([[0.0, -2.0, 1.0]])
    d = head(_features(loc, raw))
    assert d.batch_shape == (1,) and d.event_shape == (3,)
    scale = 1e-3 + F.softplus(raw.double() + math.log(math.expm1(0.1 - 1e-3)))
    x = torch.tensor([[0.0, 128 / 255, 1.0]])  # both edge bins and an inner one
    expected = _logistic_pmf(x.double(), loc.double(), scale).log().sum(-1)
    assert torch.allclose(d.log_prob(x).double(), expected, atol=1e-5)
    torch.manual_seed(0)
    draws = d.sample((40000,))
    assert ((draws * 255 - (draws * 255).round()).abs() < 1e-4).all()  # on the grid
    assert torch.allclose(draws.mean(0), d.mean, atol=0.01)  # ~5 sd of 40 000 draws
    head.check(x)
    with pytest.raises(ValueError, match=r"needs x in \{0, 1/255, ..., 1\} .* train has 0.5002"):
        head.check(torch.tensor([[0.5002, 0.0, 1.0]]), "train")
    with pytest.raises(ValueError, match=r"needs x in \[0, 1\] but valid has 1.5"):
        head.check(torch.tensor([[1.5, 0.0, 1.0]]), "valid")


def _cb_log_normalizer(lam):
    """log C(lambda), C = 2 atanh(1 - 2 lambda) / (1 - 2 lambda) (Loaiza-Ganem &
    Cunningham 2019), with their Taylor expansion log 2 + 4/3 d^2 + 104/45 d^4, d =
    lambda - 1/2, where 1 - 2 lambda is near 0."""
    d = lam - 0.5
    near = d.abs() < 1e-3
    safe = torch.where(near, torch.full_like(lam, 0.1), lam)
    exact = torch.log(2 * torch.atanh(1 - 2 * safe) / (1 - 2 * safe))
    return torch.where(near, math.log(2) + 4 / 3 * d ** 2 + 104 / 45 * d ** 4, exact)


def test_continuous_bernoulli_log_prob_against_the_paper_formula():
    logits = torch.tensor([-12.0, -4.0, -0.3, -0.08, -1e-3, 0.0, 1e-6, 0.004, 0.099, 0.101,
                           2.5, 9.0], dtype=torch.float64)
    lam = torch.sigmoid(logits)
    x = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.99, 1e-3])
    for xv in x.tolist():  # including the support's edges 0 and 1
        value = torch.full_like(logits, xv)
        ref = (xv * lam.log() + (1 - xv) * (1 - lam).log() + _cb_log_normalizer(lam))
        ours = ContinuousBernoulliLogits(logits.float()).log_prob(value.float()).double()
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-6), xv
    # the density integrates to one and its mean is the integral of x p(x), at every logit
    xs = torch.linspace(0, 1, 200001, dtype=torch.float64)[:, None]
    dens = ContinuousBernoulliLogits(logits).log_prob(xs).exp()
    assert torch.allclose(torch.trapezoid(dens, xs[:, 0], dim=0),
                          torch.ones_like(logits), atol=1e-6)
    mean = torch.trapezoid(dens * xs, xs[:, 0], dim=0)
    assert torch.allclose(ContinuousBernoulliLogits(logits).mean, mean, atol=1e-6)


def test_continuous_bernoulli_is_exact_where_torchs_clamped_form_is_not():
    """At logit -30, lambda ~ 1e-13: log p(0) = log C - softplus(-30) ~ log 30."""
    lp = ContinuousBernoulliLogits(torch.tensor([-30.0])).log_prob(torch.tensor([0.0]))
    assert lp.item() == pytest.approx(math.log(30.0 / math.tanh(15.0)), abs=1e-5)


def test_continuous_bernoulli_head_samples_and_support():
    torch.manual_seed(0)
    head = ContinuousBernoulliLikelihood(6)
    logits = torch.tensor([[-8.0, -1.0, -1e-5, 0.05, 2.0, 20.0]])
    d = head(logits)
    assert d.batch_shape == (1,) and d.event_shape == (6,)
    draws = d.sample((50000,))
    assert draws.min() >= 0 and draws.max() <= 1
    # sd of a CB draw is at most 0.29: 5 sd of the mean of 50 000 draws is 0.0065
    assert torch.allclose(draws.mean(0), d.mean, atol=0.0065)
    head.check(torch.tensor([[0.0, 0.3, 1.0, 0.5, 0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"'continuous_bernoulli' needs x in \[0, 1\] but "
                                         r"test has -0.1"):
        head.check(torch.tensor([[-0.1, 0.3, 1.0, 0.5, 0.5, 0.5]]), "test")

import torch

from pyro_vae.guides import GUIDES, DiagonalNormalEncoder


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

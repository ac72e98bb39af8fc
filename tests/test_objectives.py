import logging

import pytest
import torch

import pyro.distributions as dist
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import objectives
from pyro_vae.objectives import make_elbo, warn_if_monte_carlo_kl


def test_make_elbo():
    e = make_elbo("meanfield", 3)
    assert type(e) is TraceMeanField_ELBO
    # One "data" plate, plus the particle plate Pyro adds when vectorizing.
    assert e.num_particles == 3 and e.vectorize_particles and e.max_plate_nesting == 2
    assert type(make_elbo("trace")) is Trace_ELBO and not make_elbo("trace").vectorize_particles
    with pytest.raises(ValueError, match="unknown loss 'iwa'"):
        make_elbo("iwa")
    with pytest.raises(ValueError, match="num_particles must be >= 1"):
        make_elbo("trace", 0)


def test_monte_carlo_kl_fallback_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(objectives, "_warned", set())
    q = dist.Normal(torch.zeros(5, 2), 1.0).to_event(1)
    normal = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    mixture = dist.MixtureSameFamily(dist.Categorical(torch.ones(3)),
                                     dist.Normal(torch.zeros(3, 2), 1.0).to_event(1))
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        assert not warn_if_monte_carlo_kl("meanfield", q, normal)
        assert not warn_if_monte_carlo_kl("trace", q, mixture)  # trace is always MC
        assert warn_if_monte_carlo_kl("meanfield", q, mixture)
        assert warn_if_monte_carlo_kl("meanfield", q, mixture)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "one-sample Monte Carlo" in messages[0] and "MixtureSameFamily" in messages[0]

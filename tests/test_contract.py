"""The model contract: a model of the user's own, written from scratch in Pyro (no package
base class, no beta argument), gets what the package's models get: training, exact
resume, beta, any ELBO object, the log-likelihood, Pyro's own idioms."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import (Predictive, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO,
                        TraceMeanField_ELBO)
from pyro.nn import PyroModule

import pyro_vae as pv
from pyro_vae.distributed import World
from pyro_vae.train import Step, TrainingDiverged, _check_distributed, make_optimizer

X, Z = 6, 2


class Plain(PyroModule):
    """A VAE as a new user writes it: a Bernoulli decoder, a Normal encoder."""

    guide_modules = ("enc",)

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(X, hidden), nn.Tanh(), nn.Linear(hidden, 2 * Z))
        self.dec = nn.Sequential(nn.Linear(Z, hidden), nn.Tanh(), nn.Linear(hidden, X))

    def q(self, x):
        loc, s = self.enc(x).chunk(2, -1)
        return dist.Normal(loc, F.softplus(s) + 1e-3).to_event(1)

    def model(self, x=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            pyro.sample("z", self.q(x))


class Clustered(Plain):
    """A discrete latent summed out by enumeration: c ~ Cat(softmax(w)),
    z | c ~ N(mu_c, I), x | z ~ Bernoulli(dec(z)); the guide samples z alone."""

    K = 3

    def __init__(self):
        super().__init__()
        self.mu = nn.Parameter(torch.randn(self.K, Z))
        self.w = nn.Parameter(torch.zeros(self.K))

    def model(self, x=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            c = pyro.sample("c", dist.Categorical(logits=self.w),
                            infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(self.mu[c], 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)


def _data(n=240, seed=0):
    """Binary points near two prototypes: a latent code pays."""
    g = torch.Generator().manual_seed(seed)
    proto = torch.tensor([[0.9] * 3 + [0.1] * 3, [0.1] * 3 + [0.9] * 3])
    return torch.bernoulli(proto[torch.randint(2, (n,), generator=g)], generator=g)


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_plain_module_trains_with_fit_from_a_tensor():
    torch.manual_seed(0)
    model, x, valid = Plain(), _data(), _data(100, seed=1)
    before = pv.elbo(model, valid, seed=0)
    history = pv.fit(model, x, valid, epochs=15, batch_size=40, lr=1e-2, progress=False)
    after = pv.elbo(model, valid, seed=0)
    assert history[-1]["valid_elbo"] == pytest.approx(after, abs=0.3)
    # 6 bits of two noisy prototypes: from ~-4.8 nats to near the data's entropy (~3.3).
    assert after > before + 0.7, (before, after)


def _interrupted(at, checkpoint_every, tmp_path, x):
    """Train a fresh Plain, stop it (an exception, as a kill would) before step ``at``;
    rebuild it from its checkpoint file alone and resume."""
    path = tmp_path / f"ckpt{at}.pt"
    torch.manual_seed(0)
    model = Plain()
    calls, step_call = [0], Step.__call__

    def dying(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return step_call(self, *args, **kwargs)

    Step.__call__ = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            pv.fit(model, x, epochs=4, batch_size=50, progress=False,
                   checkpoint_every=checkpoint_every, hooks=[pv.Checkpointer(path, model)])
    finally:
        Step.__call__ = step_call
    torch.manual_seed(123)  # a new process: nothing of the old state survives
    resumed = Plain()
    saved = pv.read_checkpoint(path)
    resumed.load_state_dict(saved["model"])
    history = pv.fit(resumed, x, epochs=4, batch_size=50, progress=False,
                     resume=saved["training"])
    return resumed, history


def test_a_plain_module_stopped_at_a_random_step_resumes_bitwise(tmp_path):
    x = _data(230)  # 5 steps per epoch, the last of 30 points
    torch.manual_seed(0)
    reference = Plain()
    history = pv.fit(reference, x, epochs=4, batch_size=50, progress=False)
    for at in random.Random(7).sample(range(2, 20), 3):
        resumed, resumed_history = _interrupted(at, 3, tmp_path, x)
        for k, v in _params(reference).items():
            assert torch.equal(v, resumed.state_dict()[k]), (at, k)
        strip = [{k: v for k, v in r.items() if k != "seconds"} for r in history]
        assert [{k: v for k, v in r.items() if k != "seconds"}
                for r in resumed_history] == strip


def test_log_likelihood_is_renyi_alpha_zero_on_the_same_samples():
    """pv.log_likelihood with S samples is log (1/S) sum_s p(x, z_s) / q(z_s|x) per
    point: summed, it equals -RenyiELBO(alpha=0, S particles).loss on the same draws."""
    torch.manual_seed(0)
    model, x = Plain(), _data(7)
    s = 64
    ll = pv.log_likelihood(model, x, num_samples=s, chunk=s, batch_size=7, seed=3)
    torch.manual_seed(3)
    renyi = RenyiELBO(alpha=0, num_particles=s, vectorize_particles=True,
                      max_plate_nesting=1).loss(model.model, model.guide, x)
    assert ll.shape == (7,)
    assert ll.sum().item() == pytest.approx(-renyi, rel=1e-5)


@pytest.mark.parametrize("objective", [Trace_ELBO(), TraceMeanField_ELBO()],
                         ids=["Trace_ELBO", "TraceMeanField_ELBO"])
def test_beta_on_a_model_without_beta_is_reconstruction_minus_beta_kl(objective):
    """The trainer's step with beta = 4 on a model that never heard of beta: its loss is
    -(E log p(x|z) - 4 KL) with the KL in closed form (TraceMeanField_ELBO) or as
    log q(z|x) - log p(z) at the same draw (Trace_ELBO), computed here by hand."""
    torch.manual_seed(0)
    model, x = Plain(), _data(9)
    params = dict(model.named_parameters())
    step = Step(model, objective, params, make_optimizer("adam", params.values(), lr=0.0))
    torch.manual_seed(5)
    loss, finite, bad = step((x,), beta=4.0)
    q = model.q(x)
    p = dist.Normal(torch.zeros(Z), 1.0).to_event(1)
    torch.manual_seed(5)
    z = q.rsample()
    recon = dist.Bernoulli(logits=model.dec(z)).to_event(1).log_prob(x)
    kl = (torch.distributions.kl_divergence(q, p.expand([9]))
          if isinstance(objective, TraceMeanField_ELBO) else q.log_prob(z) - p.log_prob(z))
    assert bool(finite) and bad is None
    assert loss.item() == pytest.approx((-recon.sum() + 4.0 * kl.sum()).item(), rel=1e-5)
    # The same through pv.elbo: beta weights the latent site, beta = 0 leaves log p(x|z).
    torch.manual_seed(5)
    z = model.q(x).rsample()
    recon0 = dist.Bernoulli(logits=model.dec(z)).to_event(1).log_prob(x).mean().item()
    assert pv.elbo(model, x, loss=objective, seed=5, beta=0.0) == pytest.approx(recon0,
                                                                                rel=1e-5)


def _hand_summed_elbo(model, x, z):
    """E_q[log sum_c p(c) p(z|c) + log p(x|z) - log q(z|x)] at one draw z per point."""
    log_pc = torch.log_softmax(model.w, -1)                                  # (K,)
    log_pz_c = dist.Normal(model.mu, 1.0).to_event(1).log_prob(z.unsqueeze(-2))  # (N, K)
    log_pz = torch.logsumexp(log_pc + log_pz_c, -1)
    log_px_z = dist.Bernoulli(logits=model.dec(z)).to_event(1).log_prob(x)
    return (log_pz + log_px_z - model.q(x).log_prob(z)).sum()


def test_an_enumerated_discrete_latent_trains_and_its_loss_is_the_hand_summed_one():
    torch.manual_seed(0)
    model, x = Clustered(), _data(11)
    enum = TraceEnum_ELBO(max_plate_nesting=1)
    torch.manual_seed(2)
    loss = enum.differentiable_loss(model.model, model.guide, x)
    torch.manual_seed(2)
    z = model.q(x).rsample()
    assert loss.item() == pytest.approx(-_hand_summed_elbo(model, x, z).item(), rel=1e-5)
    # The training path gives the same loss, and trains every parameter, mu and w too.
    params = dict(model.named_parameters())
    step = Step(model, enum, params, make_optimizer("adam", params.values(), lr=0.0))
    torch.manual_seed(2)
    assert step((x,))[0].item() == pytest.approx(loss.item(), rel=1e-6)
    data, valid = _data(), _data(100, seed=1)
    before = pv.elbo(model, valid, loss=enum, seed=0)
    start = _params(model)
    history = pv.fit(model, data, valid, epochs=10, batch_size=40, lr=1e-2, progress=False,
                     loss=enum)
    assert all(not torch.equal(start[k], v) for k, v in model.state_dict().items())
    assert history[-1]["valid_elbo"] > before + 0.5


def test_beta_on_an_enumerated_site_is_refused_in_one_line():
    enum = TraceEnum_ELBO(max_plate_nesting=1)
    for sites in (None, ("z",)):  # Pyro needs one scale for every site c touches
        with pytest.raises(ValueError, match="beta and warm-up cannot weight a model's "
                                             "sites under TraceEnum_ELBO") as e:
            pv.fit(Clustered(), _data(40), epochs=1, loss=enum, beta=2.0, beta_sites=sites,
                   batch_size=20, progress=False)
        assert "\n" not in str(e.value)
    # The handler itself refuses to weight a site that is summed out.
    with pytest.raises(ValueError, match="beta weights latent site 'c', which is "
                                         "enumerated"):
        with pv.scale_latents(2.0):
            enum.loss(Clustered().model, Clustered().guide, _data(5))
    with pytest.raises(ValueError, match="beta_sites the guide has no latent site 'zz'"):
        pv.fit(Plain(), _data(40), epochs=1, beta=2.0, beta_sites=("zz",), batch_size=20,
               progress=False)


@pytest.mark.parametrize("objective", [
    TraceGraph_ELBO(), RenyiELBO(alpha=0.5, num_particles=3, vectorize_particles=True,
                                 max_plate_nesting=1)], ids=["TraceGraph", "Renyi0.5"])
def test_any_elbo_object_trains(objective):
    torch.manual_seed(0)
    model, x = Plain(), _data()
    start = _params(model)
    history = pv.fit(model, x, epochs=2, batch_size=40, lr=1e-2, loss=objective,
                     progress=False)
    assert [k for k, v in model.state_dict().items() if torch.equal(start[k], v)] == []
    # A Renyi bound runs unscaled: its running value is per data point, like pv.elbo's.
    fresh = pv.elbo(model, x, loss=objective, seed=0)
    assert history[-1]["train_elbo"] == pytest.approx(fresh, abs=0.5)


def test_a_user_elbo_subclass_is_what_trains():
    calls = []

    class Counted(Trace_ELBO):
        def differentiable_loss(self, model, guide, *args, **kwargs):
            calls.append(len(args[0]))
            return super().differentiable_loss(model, guide, *args, **kwargs)

    pv.fit(Plain(), _data(100), epochs=1, batch_size=40, loss=Counted(), progress=False)
    assert calls[-3:] == [40, 40, 20]  # the three steps of the epoch, then validation none


def test_objectives_without_differentiable_loss_are_refused_on_several_processes():
    with pytest.raises(ValueError, match="loss TraceGraph_ELBO cannot train on several "
                                         "processes"):
        _check_distributed(TraceGraph_ELBO(), 100, 10, World(0, 2))
    _check_distributed(TraceEnum_ELBO(), 100, 10, World(0, 2))  # has one: accepted


def test_freeze_model_trains_the_declared_guide_only():
    torch.manual_seed(0)
    model = Plain()
    start = _params(model)
    pv.fit(model, _data(), epochs=2, lr=1e-2, freeze_model=True, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(start[k], v) == (not k.startswith("enc.")), k

    class Undeclared(Plain):
        guide_modules = ()

    with pytest.raises(ValueError, match="does not say which modules make its guide"):
        pv.fit(Undeclared(), _data(), epochs=1, freeze_model=True, progress=False)


def test_pyro_idioms_generate_and_uncondition():
    torch.manual_seed(0)
    vae = pv.VAE(X, Z, (8,))
    x = _data(4)
    trace = poutine.trace(vae.model).get_trace(None, num_data=5)
    assert trace.nodes["x"]["value"].shape == (5, X) and not trace.nodes["x"]["is_observed"]
    samples = Predictive(vae.model, num_samples=3)(None, num_data=4)
    assert samples["x"].shape == (3, 4, X) and samples["z"].shape == (3, 4, Z)
    free = poutine.trace(poutine.uncondition(vae.model)).get_trace(x)
    assert not torch.equal(free.nodes["x"]["value"], x)
    with pytest.raises(ValueError, match=r"model\(None\) generates data: give num_data"):
        vae.model(None)
    for model in (vae, pv.HierarchicalVAE(X, Z, (8,), arch="mlp")):
        assert set(Predictive(model.model, num_samples=2)(None, num_data=3)) >= {"x"}


def _param_names(fn, *args):
    with poutine.trace(param_only=True) as capture:
        fn(*args)
    return set(capture.trace.nodes)


def test_the_models_trace_shows_encoder_parameters_only_when_the_prior_uses_them():
    x = _data(3)
    normal = pv.VAE(X, Z, (8,))
    vamp = pv.VAE(X, Z, (8,), prior="vamp", prior_options={"components": 4})
    assert not any(n.startswith("encoder") for n in _param_names(normal.model, x))
    assert any(n.startswith("encoder") for n in _param_names(vamp.model, x))


def test_swap_guide_refuses_a_guide_of_another_z_dim_in_one_line():
    vae = pv.VAE(X, Z, (8,))
    with pytest.raises(ValueError, match=r"event shape \(3,\); this model's z has 2 "
                                         r"dimensions") as e:
        vae.swap_guide(pv.DiagonalNormalEncoder(X, Z + 1, (8,)))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cannot take points of 6 features"):
        vae.swap_guide(pv.DiagonalNormalEncoder(X + 1, Z, (8,)))


def test_the_hvae_guide_is_both_encoders():
    """freeze_model trains q(z2|x) and q(z1|x, z2), and nothing of the model; swap_guide
    starts both afresh."""
    torch.manual_seed(0)
    hvae = pv.HierarchicalVAE(X, Z, (8,), arch="mlp")
    start = _params(hvae)
    pv.fit(hvae, _data(), epochs=1, lr=1e-2, freeze_model=True, progress=False)
    changed = {k.split(".")[0] for k, v in hvae.state_dict().items()
               if not torch.equal(start[k], v)}
    assert changed == {"encoder", "encoder_z1"}
    old_z1 = _params(hvae.encoder_z1)
    hvae.swap_guide(pv.DiagonalNormalEncoder(X, Z, (8,)))
    assert not any(torch.equal(old_z1[k], v) for k, v in hvae.encoder_z1.state_dict().items()
                   if k.endswith("weight"))


def test_evaluation_leaves_the_callers_random_state_alone():
    torch.manual_seed(0)
    vae, x = pv.VAE(X, Z, (8,)), _data(20)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    pv.elbo(vae, x, seed=1)
    pv.log_likelihood(vae, x, num_samples=8, seed=1)
    pv.elbo_surgery(vae, x, seed=1)
    pv.evaluation.active_units(vae, x)
    assert torch.equal(torch.rand(3), expected)
    # and a seed is a seed: the same number twice
    assert pv.elbo(vae, x, seed=4) == pv.elbo(vae, x, seed=4)


def test_a_non_finite_step_of_a_plain_model_stops_with_one_line():
    torch.manual_seed(0)
    model = Plain()
    with torch.no_grad():
        model.dec[0].weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="non-finite .* at epoch 1, step 1;"):
        pv.fit(model, _data(), epochs=1, progress=False)


class GuideWithoutZ(Plain):
    """A guide that forgets the model's latent site."""

    def guide(self, x, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            pyro.sample("w", self.q(x))


class NoGuide(nn.Module):
    def model(self, x=None, num_data=None):
        pass


def _plain_function(x=None, num_data=None):
    pass


@pytest.mark.parametrize("call, message", [
    (lambda: pv.fit(GuideWithoutZ(), _data(), epochs=1, progress=False),
     "the model's latent site 'z' has no site in the guide (it samples ['w']): sample 'z' "
     "in the guide, or mark it for enumeration in the model"),
    (lambda: pv.fit(Plain(), _data().double(), epochs=1, progress=False),
     "x has dtype torch.float64; the model's parameters are torch.float32"),
    (lambda: pv.elbo(GuideWithoutZ(), _data()), "the model's latent site 'z' has no site"),
    (lambda: pv.fit(NoGuide(), _data(), epochs=1, progress=False),
     "model NoGuide has no guide method"),
    (lambda: pv.fit(_plain_function, _data(), epochs=1, progress=False),
     "model must be a torch.nn.Module with model and guide methods"),
    (lambda: pv.log_likelihood(_plain_function, _data(), 10),
     "model must be a torch.nn.Module with model and guide methods"),
], ids=["guide-without-z", "float64", "elbo-guide-without-z", "no-guide", "function",
        "log-likelihood-function"])
def test_a_model_guide_pair_that_does_not_fit_is_one_line(call, message):
    """Checked on the first batch, before any step: not a KeyError from inside Pyro."""
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_pair_check_draws_from_a_stream_of_its_own():
    from pyro_vae.contract import check_model_guide

    model, data = Plain(), _data()
    before = torch.get_rng_state()
    check_model_guide(model, data)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_pair_check_neither_reads_nor_changes_pyros_parameter_store():
    """A PyroModule takes a same-named entry left in Pyro's store over its own parameter:
    checked before fit clears the store, a model would have started from an earlier
    model's weights (a resumed run was then no longer bitwise)."""
    from pyro.nn import PyroParam
    from pyro_vae.contract import check_model_guide

    class WithPrior(Plain):
        def __init__(self):
            super().__init__()
            self.prior_loc = PyroParam(torch.zeros(Z))

        @pyro.nn.pyro_method
        def model(self, x=None, num_data=None):
            with pyro.plate("data", num_data or len(x), subsample=x):
                z = pyro.sample("z", dist.Normal(self.prior_loc, 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    model = WithPrior()
    pyro.param("prior_loc", torch.ones(Z))  # left by an earlier model
    check_model_guide(model, _data())
    assert torch.equal(model.prior_loc, torch.zeros(Z))
    assert torch.equal(pyro.param("prior_loc"), torch.ones(Z))

"""A Pyro user's own model: it trains the same under ``pv.fit`` and plain
``pyro.infer.SVI``, the ELBO is chosen for it (and evaluated with the same rule), and
the mistakes a Pyro user makes are caught in one line."""

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyro
import pyro.distributions as dist
from pyro.infer import (SVI, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO,
                        config_enumerate)
from pyro.nn import PyroModule, pyro_method

import pyro_vae as pv
from pyro_vae.objectives import choose_elbo

X, Z, K = 6, 2, 3


class Documented(PyroModule):
    """The pattern the package teaches (README, docs, contract): plain ``nn`` networks
    in a ``PyroModule``, ``model`` and ``guide`` decorated with ``@pyro_method``."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(X, hidden), nn.Tanh(), nn.Linear(hidden, 2 * Z))
        self.decoder = nn.Sequential(nn.Linear(Z, hidden), nn.Tanh(), nn.Linear(hidden, X))

    @pyro_method
    def model(self, x=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    @pyro_method
    def guide(self, x, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            loc, s = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, F.softplus(s) + 1e-3).to_event(1))


class Undecorated(Documented):
    """The same without ``@pyro_method``: Pyro sees none of its parameters."""

    def model(self, x=None, num_data=None):
        return Documented.model.__wrapped__(self, x, num_data)

    def guide(self, x, num_data=None):
        return Documented.guide.__wrapped__(self, x, num_data)


class TwoLayer(Documented):
    """A guide that is not mean-field: it samples z1, then z2 | z1, while the model
    draws z2 first (z2 ~ N(0, I), z1 | z2, x | z1)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(Z, 2 * Z)      # q(z2 | z1)
        self.down = nn.Linear(Z, 2 * Z)    # p(z1 | z2)

    @staticmethod
    def _normal(out):
        loc, s = out.chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(s) + 1e-3).to_event(1)

    @pyro_method
    def model(self, x=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            z1 = pyro.sample("z1", self._normal(self.down(z2)))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z1)).to_event(1), obs=x)

    @pyro_method
    def guide(self, x, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            z1 = pyro.sample("z1", self._normal(self.encoder(x)))
            pyro.sample("z2", self._normal(self.up(z1)))


class Clusters(Documented):
    """A guide-enumerated cluster model: c ~ Cat(w), z | c ~ N(mu_c, I), x | z; the guide
    enumerates q(c | x) and draws z | x, c."""

    def __init__(self):
        super().__init__()
        self.classify = nn.Linear(X, K)
        self.mu = nn.Parameter(torch.randn(K, Z))
        self.w = nn.Parameter(torch.zeros(K))

    @pyro_method
    def model(self, x=None, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            c = pyro.sample("c", dist.Categorical(logits=self.w))
            z = pyro.sample("z", dist.Normal(self.mu[c], 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    @pyro_method
    @config_enumerate
    def guide(self, x, num_data=None):
        with pyro.plate("data", num_data or len(x), subsample=x):
            c = pyro.sample("c", dist.Categorical(logits=self.classify(x)))
            loc, s = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc + self.mu[c], F.softplus(s) + 1e-3).to_event(1))


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    proto = torch.tensor([[0.9] * 3 + [0.1] * 3, [0.1] * 3 + [0.9] * 3])
    return torch.bernoulli(proto[torch.randint(2, (n,), generator=g)], generator=g)


def _train_with_svi(model, x, epochs, batch_size, lr, seed=0):
    """Plain Pyro: SVI with pyro.optim.Adam, the batches fit takes (an order drawn per
    epoch from a generator seeded with ``seed``), the ELBO fit chooses."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    order_stream = torch.Generator().manual_seed(seed)
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": lr}),
              TraceMeanField_ELBO(max_plate_nesting=1))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=order_stream)
        for start in range(0, len(x), batch_size):
            svi.step(x[order[start:start + batch_size]], num_data=len(x))
    return len(pyro.get_param_store())


def test_the_documented_pattern_trains_the_same_under_fit_and_plain_svi(caplog):
    """From the same weights, with the same batches and the same draws, pv.fit (one fused
    Adam, differentiable_loss) and pyro.infer.SVI (Pyro's per-parameter Adam,
    loss_and_grads) end at the same parameters: float32 rounding apart, within 1e-5
    after 30 steps (measured: 6e-8 at most)."""
    torch.manual_seed(0)
    ours, theirs, x = Documented(), Documented(), _data()
    theirs.load_state_dict(ours.state_dict())
    start = copy.deepcopy(ours.state_dict())
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        history = pv.fit(ours, x, epochs=6, batch_size=40, lr=1e-2, seed=0, progress=False)
    assert history[-1]["loss"] == "TraceMeanField_ELBO"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert _train_with_svi(theirs, x, epochs=6, batch_size=40, lr=1e-2) == 8
    for name, value in ours.state_dict().items():
        assert not torch.equal(value, start[name]), name  # it trained
        assert torch.allclose(value, theirs.state_dict()[name], rtol=0, atol=1e-5), name


def _documented_class(path):
    """The model class of the "your own model" example in ``path`` (README.md, the
    docs' own-model page), defined as printed there: the block's code up to its first
    line after the class."""
    import re

    from conftest import REPO

    text = (REPO / path).read_text()
    block = next(b for b in re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
                 if "class MyVAE(PyroModule)" in b)
    code = block[:block.index("\ntrain, valid, test")]
    namespace = {}
    exec(compile(code, str(path), "exec"), namespace)
    return namespace["MyVAE"]


@pytest.mark.parametrize("path", ["README.md", "docs/guide/own-model.md"])
def test_the_readme_and_docs_own_model_trains_the_same_under_fit_and_plain_svi(path):
    """The example as printed: pv.fit and plain SVI from the same weights, batches and
    draws end at the same parameters (within 1e-5; measured 6e-8 on the test's own
    copy of the pattern)."""
    cls = _documented_class(path)
    data = (pv.datasets.load("digits")[0].x[:400] > 0.5).float()  # binary, fixed
    torch.manual_seed(0)
    ours, theirs = cls(), cls()
    theirs.load_state_dict(ours.state_dict())
    start = copy.deepcopy(ours.state_dict())
    pv.fit(ours, data, epochs=3, batch_size=100, lr=1e-2, seed=0, progress=False)
    assert _train_with_svi(theirs, data, epochs=3, batch_size=100, lr=1e-2) == 8
    for name, value in ours.state_dict().items():
        assert not torch.equal(value, start[name]), name
        assert torch.allclose(value, theirs.state_dict()[name], rtol=0, atol=1e-5), name


def test_a_model_pyro_cannot_see_is_trained_by_fit_with_one_line_saying_what_to_add(caplog):
    torch.manual_seed(0)
    model, x = Undecorated(), _data()
    assert _train_with_svi(copy.deepcopy(model), x, 1, 40, 1e-2) == 0  # SVI trains nothing
    start = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        pv.fit(model, x, epochs=1, batch_size=40, lr=1e-2, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("Pyro sees no param site for 8 of the 8 parameters trained "
                               "(encoder.0.weight, encoder.0.bias, encoder.2.weight, ...)")
    assert "@pyro.nn.pyro_method" in lines[0] and "fit trains them all the same" in lines[0]
    assert all(not torch.equal(v, start[k]) for k, v in model.state_dict().items())

    class Module(nn.Module):  # a plain nn.Module: the fix is pyro.module
        def __init__(self):
            super().__init__()
            self.inner = Undecorated()

        def model(self, *args, **kwargs):
            return self.inner.model(*args, **kwargs)

        def guide(self, *args, **kwargs):
            return self.inner.guide(*args, **kwargs)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        pv.fit(Module(), x, epochs=1, batch_size=40, progress=False)
    assert "call pyro.module('module', self) at the start of model and guide" in \
        caplog.records[-1].getMessage()


def _pyro_warnings(run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    return result, [str(w.message).splitlines()[0] for w in caught
                    if "pyro" in w.filename or "mean field" in str(w.message)]


@pytest.mark.parametrize("cls,chosen,explicit", [
    (TwoLayer, "Trace_ELBO", lambda: Trace_ELBO(max_plate_nesting=1)),
    (Clusters, "TraceEnum_ELBO", lambda: TraceEnum_ELBO(max_plate_nesting=1)),
], ids=["not-mean-field", "guide-enumerated"])
def test_a_model_trains_and_evaluates_with_its_elbo_without_loss_and_without_warnings(
        cls, chosen, explicit, caplog):
    """No loss= anywhere: fit chooses the ELBO from the guide, says so in one line,
    records it, and no Pyro warning reaches the user; pv.elbo then evaluates with the
    same ELBO: equal to the explicit loss= call on the same draws (exactly)."""
    torch.manual_seed(0)
    model, x, valid = cls(), _data(), _data(100, seed=1)
    before = pv.elbo(model, valid, seed=0)
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        history, caught = _pyro_warnings(lambda: pv.fit(
            model, x, valid, epochs=10, batch_size=40, lr=2e-2, progress=False))
    assert caught == []
    assert [r.getMessage().split("(")[0] for r in caplog.records
            if r.getMessage().startswith("loss: ")] == [f"loss: {chosen}"]
    assert {r["loss"] for r in history} == {chosen}
    after, caught = _pyro_warnings(lambda: pv.elbo(model, valid, seed=0))
    assert caught == []
    assert after == pv.elbo(model, valid, loss=explicit(), seed=0)
    assert history[-1]["valid_elbo"] == pytest.approx(after, abs=0.3)
    assert after > before + 0.5  # it trained
    ll = pv.log_likelihood(model, valid, num_samples=50, seed=0)
    assert ll.mean().item() > after - 0.05  # log p(x) >= ELBO, less Monte Carlo noise


def test_the_mean_field_elbo_on_a_guide_that_is_not_mean_field_is_what_auto_avoids():
    """Why the rule matters: on the two-layer model, TraceMeanField_ELBO's closed-form
    KL of z1 is conditioned on a z2 drawn after z1: its value is not the ELBO. Six
    estimates of 500 particles each: Trace_ELBO (the choice) and the mean-field estimate
    differ by more than 5 standard errors (measured: -17.53 against -18.66, 8.5 of
    them); on the mean-field model they agree within 3."""
    def estimates(model, loss):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pyro's: failed to verify mean field
            return torch.tensor([pv.elbo(model, x, loss=loss, num_particles=500, seed=s)
                                 for s in range(6)])

    x = _data(50)
    for cls, differ in ((TwoLayer, True), (Documented, False)):
        torch.manual_seed(0)
        model = cls()
        t, f = estimates(model, "auto"), estimates(model, "meanfield")
        stderr = ((t.var() + f.var()) / 6).sqrt()
        gap = (t.mean() - f.mean()).abs()
        assert (gap > 5 * stderr if differ else gap < 3 * stderr), (cls, t.mean(),
                                                                   f.mean(), stderr)


def test_the_rule_and_a_models_own_default():
    x = (_data(4),)
    assert type(choose_elbo("auto", 1, Documented(), x)[0]) is TraceMeanField_ELBO
    assert type(choose_elbo("auto", 1, TwoLayer(), x)[0]) is Trace_ELBO
    objective, why = choose_elbo("auto", 3, Clusters(), x)
    assert type(objective) is TraceEnum_ELBO and why == "the guide marks site 'c' for " \
                                                        "enumeration"
    # Pyro adds the particles' plate to max_plate_nesting itself.
    assert (objective.num_particles, objective.vectorize_particles,
            objective.max_plate_nesting) == (3, True, 2)

    class Declared(Documented):
        default_loss = "trace"

    objective, why = choose_elbo("auto", 1, Declared(), x)
    assert type(objective) is Trace_ELBO and why == "Declared.default_loss"
    assert type(choose_elbo("meanfield", 1, TwoLayer(), x)[0]) is TraceMeanField_ELBO
    history = pv.fit(Declared(), _data(), epochs=1, batch_size=50, progress=False)
    assert history[0]["loss"] == "Trace_ELBO"

    class Nested(Documented):  # a plate of features inside the data plate
        @pyro_method
        def model(self, x=None, num_data=None):
            with pyro.plate("data", num_data or len(x), subsample=x, dim=-2):
                z = pyro.sample("z", dist.Normal(torch.zeros(1, Z), 1.0).to_event(1))
                with pyro.plate("features", X, dim=-1):
                    pyro.sample("x", dist.Bernoulli(logits=self.decoder(z).squeeze(-2)),
                                obs=x)

        @pyro_method
        def guide(self, x, num_data=None):
            with pyro.plate("data", num_data or len(x), subsample=x, dim=-2):
                loc, s = self.encoder(x).unsqueeze(-2).chunk(2, dim=-1)
                pyro.sample("z", dist.Normal(loc, F.softplus(s) + 1e-3).to_event(1))

    assert choose_elbo("auto", 1, Nested(), x)[0].max_plate_nesting == 2


def test_pytorchs_own_tensor_dataset_is_taken_where_the_packages_is():
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model, x = Documented(), _data()
    assert pv.elbo(model, TensorDataset(x), seed=0) == pv.elbo(model, x, seed=0)
    assert pv.log_likelihood(model, TensorDataset(x), num_samples=5).shape == (len(x),)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    pv.fit(a, TensorDataset(x), TensorDataset(x[:50]), epochs=1, progress=False)
    pv.fit(b, x, x[:50], epochs=1, progress=False)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    import numpy as np
    with pytest.raises(TypeError, match=r"expected a pyro_vae.datasets.TensorDataset, a "
                                        r"torch.utils.data.TensorDataset, a torch.Tensor or "
                                        r"a tuple of tensors, got numpy.ndarray$"):
        pv.elbo(model, np.zeros((3, X)))
    with pytest.raises(TypeError, match=r"got list of \[numpy.ndarray\]$"):
        pv.fit(model, [np.zeros((3, X))], progress=False)


def _trained_state(model, x, **options):
    states = []

    class Keep(pv.Hook):
        def on_checkpoint(self, state):
            states.append(state.to_dict())

    pv.fit(model, x, epochs=1, batch_size=40, progress=False, hooks=[Keep()], **options)
    return states[-1]


def test_resume_refuses_weights_it_was_not_saved_with_and_a_changed_loss():
    torch.manual_seed(0)
    model, x = Documented(), _data()
    state = _trained_state(model, x)
    assert state["objective"]["class"] == "pyro.infer.trace_mean_field_elbo." \
                                          "TraceMeanField_ELBO"
    with pytest.raises(ValueError, match=r"^resume: the model's weights are not those "
                                         r"saved with this training state; load them "
                                         r"first") as e:
        pv.fit(Documented(), x, epochs=2, batch_size=40, progress=False, resume=state)
    assert "\n" not in str(e.value)
    trained = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^resume: the state was trained with another "
                                         r"objective \(class pyro.infer.trace_mean_field_"
                                         r"elbo.TraceMeanField_ELBO -> pyro.infer.trace_elbo"
                                         r".Trace_ELBO\); pass the same loss, or "
                                         r"allow_loss_change=True if the change is meant$"):
        pv.fit(model, x, epochs=2, batch_size=40, progress=False, resume=state,
               loss="trace")
    with pytest.raises(ValueError, match=r"another objective \(max_plate_nesting 1 -> 2, "
                                         r"num_particles 1 -> 2, vectorize_particles False "
                                         r"-> True\)"):
        pv.fit(model, x, epochs=2, batch_size=40, progress=False, resume=state,
               num_particles=2)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    history = pv.fit(model, x, epochs=2, batch_size=40, progress=False, resume=state,
                     loss="trace", allow_loss_change=True)
    assert [r["loss"] for r in history] == ["TraceMeanField_ELBO", "Trace_ELBO"]


def test_a_model_that_ignores_num_data_is_refused_in_one_line():
    class Ignores(Documented):
        @pyro_method
        def model(self, x=None, num_data=None):
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

        @pyro_method
        def guide(self, x, num_data=None):
            with pyro.plate("data", len(x)):
                loc, s = self.encoder(x).chunk(2, dim=-1)
                pyro.sample("z", dist.Normal(loc, F.softplus(s) + 1e-3).to_event(1))

    with pytest.raises(ValueError, match=r"^Ignores ignores num_data: its loss is the same "
                                         r"for N = 200 and 2N, so a minibatch is not scaled "
                                         r"to the data set; put each data point's sites in "
                                         r"pyro.plate\('data', num_data or len\(x\), "
                                         r"subsample=x\)$"):
        pv.fit(Ignores(), _data(), epochs=1, batch_size=40, progress=False)
    # One batch of the whole set: the numbers are right, nothing to refuse.
    assert pv.fit(Ignores(), _data(), epochs=1, batch_size=200, progress=False)

    class NoNumData(Documented):  # Pyro's own examples' signature
        @pyro_method
        def model(self, x):
            return Documented.model.__wrapped__(self, x)

    with pytest.raises(TypeError, match=r"^NoNumData: model and guide must take "
                                        r"num_data=None"):
        pv.fit(NoNumData(), _data(), epochs=1, batch_size=40, progress=False)

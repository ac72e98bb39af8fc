"""The whole step as one compiled graph (``pyro_vae.fused``): the update, the finite check
and the batch draw in the graph do what the eager step does.

Tiny models only: every compiled graph costs seconds of C++ compilation."""

import copy
import logging

import pytest
import torch

import pyro

from pyro_vae import VAE, Hook, fit
from pyro_vae.compiled import cxx_compiler
from pyro_vae.datasets import TensorDataset, load
from pyro_vae.fused import TracedStep, functional_update
from pyro_vae.objectives import make_elbo
from pyro_vae.step import Step, make_optimizer

needs_cxx = pytest.mark.skipif(cxx_compiler() is None,
                               reason="no C++ compiler for torch.compile's CPU code")


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _steps(optimizer_name, compiled, vae, draws, lr=0.01):
    """Three training steps of ``vae`` on ``draws`` with noise seeded per step, eager
    (``Step`` as ``fit`` runs it) or as one recorded graph; the step's outputs."""
    params = dict(vae.named_parameters())
    step = Step(vae, make_elbo("meanfield", 1), params,
                make_optimizer(optimizer_name, params.values(), lr=lr))
    if compiled:
        update = functional_update(step.optimizer, list(params.values()))
        step.traced = TracedStep(step.loss, list(params), "cpu", update)
    out = []
    with pyro.validation_enabled(False):
        for i, draw in enumerate(draws):
            pyro.set_rng_seed(i)
            out.append(step(draw, num_data=1000))
    return step, out


def _draws(n=3, size=50):
    """Batches as training draws them: rows of a permutation, binarized with uniforms
    from the data generator."""
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(400, 64), dynamic_binarize=True)
    generator = torch.Generator().manual_seed(1)
    order = torch.randperm(len(data), generator=generator)
    return [d for _, d in zip(range(n), data.draws(size, order=order,
                                                    generator=generator))]


@needs_cxx
def test_the_batch_gathered_and_binarized_in_a_graph_is_the_eager_batch():
    """Two epochs of batches as training draws them (MNIST-like gray values: many exact
    0s and 1s), each gathered and binarized by a compiled graph (the inputs and code
    ``TracedStep`` records: every value hashed) and eagerly (``Draw.batch``: the values
    strictly between 0 and 1 hashed): bitwise the same, the last, smaller batch too."""
    from pyro_vae.fused import _batch, _data_inputs

    torch.manual_seed(0)
    x = torch.rand(300, 64)
    x[x < 0.4], x[x > 0.9] = 0, 1
    data = TensorDataset(x, dynamic_binarize=True, extras=(torch.arange(300),))
    compiled = torch.compile(_batch, backend="inductor", fullgraph=True, dynamic=False)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        draws = list(data.draws(128, generator=generator))
        assert [d.size for d in draws] == [128, 128, 44]
        for draw in draws:
            inputs, binarize = _data_inputs(draw)
            assert binarize is True
            xb, rows = compiled(inputs, binarize)
            assert torch.equal(rows, draw.batch[1]) and torch.equal(xb, draw.batch[0])
            assert 0 < float(xb.mean()) < 1


@needs_cxx
@pytest.mark.parametrize("optimizer", ["adam", "clipped_adam"])
def test_the_update_in_the_graph_is_the_eager_optimizers(optimizer):
    """Three steps of the VampPrior VAE, the batch draw inside the compiled graph and the
    update (PyTorch's fused Adam right after it, or Pyro's ClippedAdam in it too),
    against the eager step
    on the same batches and noise: the weights within 1e-6 (Adam steps of size about
    lr = 0.01 on values of about 1, from gradients equal to float32 rounding: measured at
    most 4.8e-8), the losses within 1e-6 relative (measured 1.7e-7), and the
    optimizer's state with the eager optimizer's layout (keys, dtypes, shapes) and its
    moments within 1e-5 of their largest entry, the gradients' tolerance in
    test_compiled (measured 3.5e-6)."""
    draws = _draws()
    torch.manual_seed(0)
    eager_vae = VAE(64, 4, (16,), prior="vamp", prior_options={"components": 5})
    fused_vae = copy.deepcopy(eager_vae)
    eager, eager_out = _steps(optimizer, False, eager_vae, draws)
    fused, fused_out = _steps(optimizer, True, fused_vae, draws)
    assert len(fused.traced.graphs) == 1  # the steps ran compiled
    for (a, ok_a, _), (b, ok_b, _) in zip(eager_out, fused_out):
        assert bool(ok_a) and bool(ok_b)
        assert abs(a - b) <= 1e-6 * abs(a)
    for (name, p), q in zip(eager_vae.named_parameters(), fused_vae.parameters()):
        assert (p - q).abs().max() <= 1e-6, name
    a, b = eager.optimizer.state_dict(), fused.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, s in a["state"].items():
        t = b["state"][i]
        assert s.keys() == t.keys()
        for k, v in s.items():
            if torch.is_tensor(v):
                assert (v.dtype, v.shape) == (t[k].dtype, t[k].shape)
                assert (v - t[k]).abs().max() <= 1e-5 * v.abs().max().clamp(min=1e-30), k
            else:
                assert v == t[k]


@needs_cxx
def test_a_nonfinite_step_in_the_graph_changes_nothing_and_is_named():
    """A NaN in one weight makes its gradient (and the loss) NaN: the compiled step
    changes no weight and no optimizer state, says it was not finite, and names the
    first non-finite quantity as the eager step does."""
    draws = _draws(2)
    torch.manual_seed(0)
    vae = VAE(64, 4, (16,))
    step, _ = _steps("adam", True, vae, draws[:1])
    with torch.no_grad():
        vae.decoder[-1].weight[0, 0] = float("nan")
    before = copy.deepcopy((vae.state_dict(), step.optimizer.state_dict()))
    with pyro.validation_enabled(False):
        loss, finite, bad = step(draws[1], num_data=1000)
    assert not bool(finite) and bad == "loss"
    after = (vae.state_dict(), step.optimizer.state_dict())
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]) or (v.isnan() == after[0][k].isnan()).all()
    for i, s in before[1]["state"].items():
        assert all(torch.equal(v, after[1]["state"][i][k]) for k, v in s.items())


@needs_cxx
def test_a_flipped_branch_in_the_graph_updates_once_from_the_branch_taken():
    """The VampPrior's density branches on its scales (float64 below 0.1). When the
    weights move across, the compiled step's first graph reads the other branch: it
    changes nothing, the step is recorded for the branch taken and run from the same
    noise, and the update is made once, from eager's gradients: every step count is 2
    after two steps, the first moments (0.09 g1 + 0.1 g2) are eager's within 1e-5 of
    their largest entry (a skipped or doubled update, or the other branch's gradients,
    would be far off), and the weights within a tenth of a step (lr). (Scales of about
    0.02, softplus(-4): far smaller ones, softplus(-12), make gradients of 1e8 whose
    float32 cancellations leave some entries at rounding noise, which Adam's step turns
    into a whole step of either sign.)"""
    draws = _draws(2)
    torch.manual_seed(0)
    eager_vae = VAE(64, 4, (16,), prior="vamp", prior_options={"components": 5})
    fused_vae = copy.deepcopy(eager_vae)
    eager, _ = _steps("adam", False, eager_vae, draws[:1])
    fused, _ = _steps("adam", True, fused_vae, draws[:1])
    for vae in (eager_vae, fused_vae):
        with torch.no_grad():
            vae.encoder.net[-1].bias[4:] = -4.0  # scales below 0.1: the other branch
    for step in (eager, fused):
        with pyro.validation_enabled(False):
            pyro.set_rng_seed(5)
            step(draws[1], num_data=1000)
    [graphs] = fused.traced.graphs.values()
    assert [g.expected.tolist() for g in graphs] == [[1.0], [0.0]]
    a, b = eager.optimizer.state_dict()["state"], fused.optimizer.state_dict()["state"]
    for i, s in a.items():
        assert float(s["step"]) == float(b[i]["step"]) == 2.0
        assert (s["exp_avg"] - b[i]["exp_avg"]).abs().max() <= \
            1e-5 * s["exp_avg"].abs().max()
    for p, q in zip(eager_vae.parameters(), fused_vae.parameters()):
        assert (p - q).abs().max() <= 0.1 * 0.01


class _States(Hook):
    """A copy of every checkpointed training state, with the model's weights."""

    def __init__(self, model):
        self.model, self.states = model, []

    def on_checkpoint(self, state):
        self.states.append(copy.deepcopy(state.to_dict()))
        self.states[-1]["_model"] = {k: v.clone() for k, v in self.model.state_dict().items()}


@needs_cxx
@pytest.mark.parametrize("where", [(1, 3), (2, 7)])
def test_compiled_fit_resumes_bitwise_from_any_step(digits, where):
    """A compiled run with a checkpoint after every step, resumed in a new fit from the
    state after step ``where`` (mid-epoch: the data order, the binarization stream and
    the optimizer's state all continue), is bitwise the uninterrupted run. The last,
    smaller batch of each epoch runs eagerly on the same optimizer state."""
    train = digits[0].subset(1250)  # batches of 100 and a last one of 50
    options = dict(epochs=3, batch_size=100, compile=True, checkpoint_every=1,
                   progress=False)
    torch.manual_seed(0)
    whole = VAE(64, 4, (16,))
    hook = _States(whole)
    history = fit(whole, train, hooks=[hook], **options)
    state = next(s for s in hook.states if (s["position"]["epoch"],
                                            s["position"]["step"]) == where)
    resumed = VAE(64, 4, (16,))
    resumed.load_state_dict(state.pop("_model"))
    history_resumed = fit(resumed, train, resume=state, **options)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(),
                                                 resumed.state_dict().values()))
    assert [r["train_elbo"] for r in history_resumed] == [r["train_elbo"] for r in history]


@needs_cxx
def test_compiled_fit_logs_what_compiling_costs_and_when_it_pays(digits, caplog):
    """One line after the first compiled epoch: compile seconds, what an epoch saves
    against eager steps, and the epoch from which compiling has paid (or that it saves
    nothing); the record keeps compile_seconds."""
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        history = fit(VAE(64, 4, (16,)), digits[0].subset(600), epochs=2, batch_size=100,
                      compile=True, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(
        "compiling took")]
    assert len(lines) == 1
    assert f"compiling took {history[0]['compile_seconds']:.1f} s and saves " in lines[0]
    assert "it has paid for itself after epoch " in lines[0] or "saves nothing" in lines[0]


def _adam_pair(lr=0.01):
    """Two copies of three parameters, each with a fused Adam."""
    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True),
         torch.randn(7, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    return (a, torch.optim.Adam(a, lr=lr, fused=True)), (b, torch.optim.Adam(b, lr=lr,
                                                                            fused=True))


def test_the_adam_update_after_the_graph_is_the_eager_optimizers_bitwise():
    """From the same gradients, AdamUpdate (PyTorch's fused kernel, called as the
    compiled step calls it) and ``Adam.step`` give bitwise the same weights and state,
    over three steps; a step that is not ok changes nothing, its step count included."""
    (a, eager), (b, opt) = _adam_pair()
    update = functional_update(opt, b)
    assert type(update).__name__ == "AdamUpdate" and not update.in_graph
    for i in range(4):
        grads = [torch.randn_like(p) for p in a]
        ok = torch.tensor(i != 2)
        if bool(ok):
            for p, g in zip(a, grads):
                p.grad = g.clone()
            eager.step()
        update.apply(b, grads, update.state(), update.scalars(), ok)
        for p, q in zip(a, b):
            assert torch.equal(p, q)
        for p, q in zip(a, b):
            s, t = eager.state[p], opt.state[q]
            assert all(torch.equal(s[k], t[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert float(opt.state[b[0]]["step"]) == 3


@pytest.mark.parametrize("steps_before, flushed", [(62, False), (63, True)])
def test_adam_moments_below_tiny_are_flushed_every_64_steps(steps_before, flushed):
    """Moments below 1e-30 (after the update) are set to 0 at step 64, not at step 63;
    moments above stay as the kernel left them."""
    from pyro_vae.fused import TINY
    (_, _), (b, opt) = _adam_pair()
    update = functional_update(opt, b)
    state = update.state()
    for i in range(len(b)):
        state[3 * i].fill_(steps_before)
        state[3 * i + 1].fill_(1e-29)
        state[3 * i + 2].fill_(1e-29)
        state[3 * i + 1].view(-1)[0] = 1e-31
        state[3 * i + 2].view(-1)[0] = 1e-31
    update.apply(b, [torch.zeros_like(p) for p in b], state, update.scalars(),
                 torch.tensor(True))
    for i in range(len(b)):
        for m in state[3 * i + 1:3 * i + 3]:
            small, rest = m.view(-1)[0], m.view(-1)[1:]
            assert float(small) == 0 if flushed else 0 < float(small) < TINY
            assert bool((rest > TINY).all())

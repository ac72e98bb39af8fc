"""Compiled networks and bfloat16 (``pyro_vae.compiled``): the same maths as eager.

Tiny models only: every compiled graph costs a second or more of C++ compilation."""

import copy
import logging

import pytest
import torch

import pyro

from pyro_vae import HierarchicalVAE, Hook, VAE, compiled as compiled_module, fit
from pyro_vae.compiled import TracedLoss, check_precision, compiled, cxx_compiler, networks
from pyro_vae.distributed import World
from pyro_vae.datasets import load
from pyro_vae.errors import ArgumentError
from pyro_vae.evaluation import _log_weights, elbo_surgery, log_likelihood
from pyro_vae.likelihoods import BernoulliLikelihood
from pyro_vae.objectives import make_elbo
from pyro_vae.step import Step, _Loss, make_optimizer
from pyro_vae.train import TrainingDiverged

from conftest import requires_cuda
from test_train import cuda_step


needs_cxx = pytest.mark.skipif(cxx_compiler() is None,
                               reason="no C++ compiler for torch.compile's CPU code")


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _loss_and_grads(vae, x, seed=1, objective=None):
    """The ELBO's loss (meanfield unless told) and its gradients, with fixed noise."""
    loss = _Loss(vae, vae.model, objective or make_elbo("meanfield", 1))
    pyro.set_rng_seed(seed)
    value = loss(x, num_data=1000)
    grads = torch.autograd.grad(value, list(vae.parameters()))
    return value.detach(), grads


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def test_networks_are_the_largest_tensor_modules_of_model_and_guide():
    vae = HierarchicalVAE(64, 4, (16,), prior="vamp", prior_options={"components": 5})
    x = torch.rand(2, 64).round()
    assert sorted(networks(vae, (x,))) == ["decoder", "encoder.net", "encoder_z1.net",
                                           "p_z1.net"]


@needs_cxx
def test_compiled_loss_and_gradients_equal_eager_on_fixed_weights_and_noise():
    """The VampPrior VAE (networks, the mixture's logsumexp and the Bernoulli density all
    compiled): the loss to float32 rounding (relative 1e-6), every gradient to 1e-5 of
    its largest entry; and the model runs eagerly again after the block."""
    torch.manual_seed(0)
    vae = VAE(64, 4, (16,), prior="vamp", prior_options={"components": 5})
    x = torch.rand(50, 64).round()
    eager_loss, eager_grads = _loss_and_grads(vae, x)
    graphs = _graphs_compiled()
    with compiled(vae, (x[:2],)) as names:
        assert names == ["encoder.net", "decoder"]
        loss, grads = _loss_and_grads(vae, x)
    # encoder (data, pseudo-inputs), decoder, Bernoulli log-prob, logsumexp: compiled
    assert _graphs_compiled() - graphs >= 5
    assert abs(loss - eager_loss) <= 1e-6 * abs(eager_loss)
    for g, e in zip(grads, eager_grads):
        assert (g - e).abs().max() <= 1e-5 * e.abs().max()
    assert vae.decoder._compiled_call_impl is None
    assert compiled_module._active is None


@needs_cxx
@pytest.mark.parametrize("loss", ["meanfield", "trace"])
def test_the_recorded_step_equals_eager_and_follows_the_weights(loss):
    """The whole step recorded once (``TracedLoss``) and compiled, on the VampPrior VAE:
    the loss and every gradient as eager's on fixed weights and noise (relative 1e-6 and
    1e-5 of the largest entry). Then the weights change in place, so far that the
    VampPrior's density takes its other branch (float64 for scales below 0.1): the
    guard sees it, the step is recorded once more, and it is eager's again. Back on the
    first branch, the first graph runs again (nothing is recorded)."""
    torch.manual_seed(0)
    vae = VAE(64, 4, (16,), prior="vamp", prior_options={"components": 5})
    x = torch.rand(50, 64).round()
    objective = make_elbo(loss, 1)
    traced = TracedLoss(_Loss(vae, vae.model, objective), [n for n, _ in
                                                            vae.named_parameters()], "cpu")
    for scale_bias in (None, -12.0, 0.0):  # as initialized; tiny scales; back to large
        if scale_bias is not None:
            with torch.no_grad():
                vae.encoder.net[-1].bias[4:] = scale_bias  # the scales' half
        eager_loss, eager_grads = _loss_and_grads(vae, x, objective=objective)
        pyro.set_rng_seed(1)
        value, grads = traced((x,), num_data=1000)
        assert abs(value - eager_loss) <= 1e-6 * abs(eager_loss)
        for g, e in zip(grads, eager_grads):
            assert (g - e).abs().max() <= 1e-5 * e.abs().max()
    # Two graphs, one per branch (guard: was a scale below 0.1), the last one run first.
    [graphs] = traced.graphs.values()
    assert [g.expected.tolist() for g in graphs] == [[0.0], [1.0]]


@needs_cxx
def test_a_users_enumerated_model_is_recorded_with_its_sum_over_the_discrete_latent():
    """test_contract's model of your own with a discrete latent c summed out by
    ``TraceEnum_ELBO`` (and ``mu[c]`` indexed by the enumerated values): recorded whole,
    its loss and gradients are eager's (relative 1e-6; 1e-5 of the largest entry)."""
    from pyro.infer import TraceEnum_ELBO
    from test_contract import Clustered, _data
    torch.manual_seed(0)
    model, x = Clustered(), _data(40)
    loss = _Loss(model, model.model, TraceEnum_ELBO(max_plate_nesting=1))
    names = [n for n, _ in model.named_parameters()]
    pyro.set_rng_seed(2)
    eager = loss(x, num_data=240)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    traced = TracedLoss(loss, names, "cpu")
    pyro.set_rng_seed(2)
    value, grads = traced((x,), num_data=240)
    assert abs(value - eager.detach()) <= 1e-6 * abs(eager.detach())
    for g, e in zip(grads, eager_grads):
        assert (g - e).abs().max() <= 1e-5 * e.abs().max()


class _ModelState(Hook):
    """A copy of each checkpointed training state (the optimizer's moments change in
    place as training goes on), with the model's weights."""

    def __init__(self, states, model):
        self.states, self.model = states, model

    def on_checkpoint(self, state):
        self.states.append(copy.deepcopy(state.to_dict()))
        self.states[-1]["_model"] = {k: v.clone() for k, v in self.model.state_dict().items()}


@needs_cxx
def test_compiled_fit_resumes_bitwise_as_the_compiled_uninterrupted_run(digits):
    """Three compiled epochs in one go, and the same run resumed (in a new fit, which
    compiles again) from the checkpoint after epoch 1: bitwise the same weights and
    losses. Compiled from the start, the run stays within 1e-3 nats of the eager one.
    With one epoch of KL warm-up: beta is 0, then 1, and each is recorded."""
    train, valid, _ = digits
    train = train.subset(1200)  # one batch size: fewer graphs to compile
    options = dict(epochs=3, batch_size=100, warmup_epochs=1, progress=False)

    def run(compile, resume=None, model=None, hooks=()):
        torch.manual_seed(0)
        model = model or VAE(64, 4, (16,))
        return model, fit(model, train, valid, compile=compile, resume=resume,
                          hooks=hooks, **options)

    states = []
    torch.manual_seed(0)
    whole = VAE(64, 4, (16,))
    _, history = run(True, model=whole, hooks=[_ModelState(states, whole)])
    assert history[0]["compile_seconds"] > 0 and "compile_seconds" not in history[1]
    after_1 = next(s for s in states if s["position"]["epoch"] == 2
                   and s["position"]["step"] == 0)
    resumed = VAE(64, 4, (16,))
    resumed.load_state_dict(after_1.pop("_model"))
    _, history_resumed = run(True, resume=after_1, model=resumed)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(),
                                                 resumed.state_dict().values()))
    assert [r["train_elbo"] for r in history_resumed] == [r["train_elbo"] for r in history]
    assert [r["valid_elbo"] for r in history_resumed] == [r["valid_elbo"] for r in history]
    _, eager = run(False)
    assert abs(eager[-1]["valid_elbo"] - history[-1]["valid_elbo"]) < 1e-3


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (a tensor) backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.saved_tensors[0], None


class _PoisonedHead(BernoulliLikelihood):
    """The Bernoulli head, whose logits' gradient is multiplied by the buffer
    ``poison``: 1, or NaN from the step the ``_Poison`` hook says. (A recorded step runs
    no Python: a fault has to come through the graph's inputs.)"""

    def __init__(self, x_dim):
        super().__init__(x_dim)
        self.register_buffer("poison", torch.ones(()))

    def forward(self, logits):
        return super().forward(_ScaledGradient.apply(logits, self.poison))


class _Poison(Hook):
    """Poisons the head after ``step`` steps of ``epoch`` (a mid-epoch checkpoint is
    taken after every step), keeping the model's state as it was then."""

    def __init__(self, model, head, epoch, step):
        self.model, self.head, self.at, self.before = model, head, (epoch, step), None

    def on_checkpoint(self, state):
        if (state.position.epoch, state.position.step) == self.at:
            self.before = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.head.poison.fill_(float("nan"))


@needs_cxx
def test_the_nonfinite_guard_is_unchanged_under_compilation(digits, caplog):
    """A NaN gradient (under a finite loss) at step 5 of epoch 2, the whole step
    compiled: training stops naming the quantity, and no parameter changed (as
    test_train checks eagerly)."""
    train = digits[0].subset(1280)  # one batch size: fewer graphs to compile
    head = _PoisonedHead(64)
    vae = VAE(64, 4, (16,), likelihood=head)
    poison = _Poison(vae, head, epoch=2, step=4)
    with caplog.at_level(logging.INFO, logger="pyro_vae"), \
            pytest.raises(TrainingDiverged, match=r"non-finite gradient of (encoder|decoder)"
                                                  r"\.\S+ \(loss -?[0-9.]+\) at epoch 2, "
                                                  r"step 5;"):
        fit(vae, train, epochs=3, batch_size=64, compile=True, checkpoint_every=1,
            hooks=[poison], progress=False)
    assert any(r.getMessage().startswith("compiled the whole step") for r in caplog.records)
    after = vae.state_dict()
    assert poison.before is not None
    assert all(torch.equal(after[k], v) for k, v in poison.before.items()
               if not k.endswith("poison"))


def test_without_a_cxx_compiler_fit_runs_eagerly_after_one_line(digits, monkeypatch, caplog):
    train, _, _ = digits
    monkeypatch.setattr(compiled_module, "cxx_compiler", lambda: None)
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        vae = VAE(64, 4, (16,))
        with caplog.at_level(logging.INFO, logger="pyro_vae"):
            caplog.clear()
            results.append(fit(vae, train.subset(300), epochs=1, compile=compile,
                               progress=False)[0]["train_elbo"])
        lines = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert lines == ["no C++ compiler (g++, c++ or clang++; or $CXX) for torch.compile: "
                     "the model runs eagerly"]
    assert results[0] == results[1]


class _Unsupported(torch.nn.Module):
    """A network Dynamo cannot capture whole: it reads a tensor's value in Python."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(64, 8)

    def forward(self, x):
        h = self.net(x)
        return h if h.sum().item() < 1e30 else -h


@needs_cxx
def test_a_network_that_cannot_compile_runs_eagerly_after_one_line(caplog):
    torch.manual_seed(0)
    from pyro_vae.guides import DiagonalNormalEncoder
    encoder = DiagonalNormalEncoder(64, 4, (16,))
    encoder.net = _Unsupported()
    vae = VAE(64, 4, (16,), encoder=encoder)
    x = torch.rand(20, 64).round()
    eager_loss, _ = _loss_and_grads(vae, x)
    with caplog.at_level(logging.WARNING, logger="pyro_vae"), compiled(vae, (x[:2],)):
        loss, _ = _loss_and_grads(vae, x)
        loss_again, _ = _loss_and_grads(vae, x)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("could not compile network "
                                                         "encoder.net (")
    assert warnings[0].endswith("it runs eagerly") and "\n" not in warnings[0]
    assert torch.equal(loss, eager_loss) and torch.equal(loss_again, eager_loss)


@needs_cxx
def test_a_model_that_reads_a_value_compiles_its_networks_or_runs_eagerly(digits, caplog):
    """A network that reads a float on the host: the step cannot be recorded (the value
    would be frozen into the graph), nor that network compiled whole; one line each,
    and the run is eager's to float rounding."""
    from pyro_vae.guides import DiagonalNormalEncoder
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        encoder = DiagonalNormalEncoder(64, 4, (16,))
        encoder.net = _Unsupported()
        vae = VAE(64, 4, (16,), encoder=encoder)
        with caplog.at_level(logging.WARNING, logger="pyro_vae"):
            caplog.clear()
            results.append(fit(vae, digits[0].subset(300), epochs=1, compile=compile,
                               progress=False)[0]["train_elbo"])
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("the step cannot be compiled whole (the step reads a floating-point "
                        "value on the host): its networks are compiled alone")
    assert lines[1].startswith("could not compile network encoder.net (")
    assert abs(results[1] - results[0]) < 1e-4 * abs(results[0])


@needs_cxx
def test_a_step_whose_branches_keep_changing_runs_eagerly_after_one_line(caplog):
    """Recorded at most ``max_records`` times per batch shape (here 1): when the
    VampPrior's branch flips, the step says so in one line and is eager's from then on."""
    torch.manual_seed(0)
    vae = VAE(64, 4, (16,), prior="vamp", prior_options={"components": 5})
    x = torch.rand(50, 64).round()
    params = dict(vae.named_parameters())
    step = Step(vae, make_elbo("meanfield", 1), params,
                make_optimizer("adam", params.values(), lr=0.0))
    step.traced = TracedLoss(step.loss, list(params), "cpu", max_records=1)
    with pyro.validation_enabled(False), caplog.at_level(logging.WARNING, "pyro_vae"):
        step((x,), num_data=1000)
        with torch.no_grad():
            vae.encoder.net[-1].bias[4:] = -12.0  # tiny scales: the other branch
        eager_loss, _ = _loss_and_grads(vae, x)
        pyro.set_rng_seed(1)
        loss, finite, _ = step((x,), num_data=1000)
    assert [r.getMessage() for r in caplog.records] == [
        "the step runs eagerly from here: the step read different values in 1 recordings"]
    assert step.traced is None and bool(finite) and torch.equal(loss, eager_loss)


def test_bf16_is_refused_in_one_line_where_it_is_not_fast(monkeypatch, digits):
    monkeypatch.setattr(compiled_module, "fast_bf16", lambda device: False)
    with pytest.raises(ArgumentError, match=r"^precision 'bf16' would be slower than "
                                            r"float32 here: this CPU has neither "
                                            r"AVX512-BF16 nor AMX; use 'float32'$"):
        check_precision("bf16", "cpu")
    with pytest.raises(ArgumentError, match="^precision must be one of"):
        fit(VAE(64, 4, (16,)), digits[0], precision="fp8", progress=False)
    with pytest.raises(ArgumentError, match="^precision 'bf16' would be slower"):
        fit(VAE(64, 4, (16,)), digits[0], precision="bf16", progress=False)


def _trained(digits, epochs, precision="float32"):
    torch.manual_seed(0)
    vae = VAE(64, 8, (64,))
    history = fit(vae, digits[0], digits[1], epochs=epochs, batch_size=50,
                  precision=precision, progress=False)
    return vae, history


def test_bf16_elbo_of_fixed_weights_agrees_with_float32(digits, monkeypatch):
    """The same trained weights and the same z ~ q(z|x) per point: each point's
    log p(x, z) - log q(z|x) with bfloat16 matrix products within 0.1 nats of float32's
    (measured: at most 0.03, 0.006 on average, on the 250 validation digits), and not
    equal to it (the products did run in bfloat16). Here the CPU may emulate bfloat16."""
    monkeypatch.setattr(compiled_module, "fast_bf16", lambda device: True)
    vae, _ = _trained(digits, 5)
    x = digits[1].x
    vae.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        full = _log_weights(vae, (x,), 1)
        with compiled(vae, (x[:2],), compile=False, precision="bf16") as names:
            assert names == ["encoder.net", "decoder"]
            torch.manual_seed(0)
            half = _log_weights(vae, (x,), 1)
    assert half.dtype == torch.float32
    difference = (half - full).abs()
    assert difference.max() < 0.1 and difference.max() > 1e-3, difference.max()


def test_bf16_training_reaches_the_float32_validation_elbo(digits, monkeypatch):
    """Trained from the same start with bfloat16 matrix products (emulated on a CPU
    without them), the validation ELBO ends within 1 nat of float32 training's."""
    monkeypatch.setattr(compiled_module, "fast_bf16", lambda device: True)
    _, full = _trained(digits, 15)
    _, half = _trained(digits, 15, precision="bf16")
    assert abs(half[-1]["valid_elbo"] - full[-1]["valid_elbo"]) < 1.0
    assert half[-1]["valid_elbo"] != full[-1]["valid_elbo"]


@needs_cxx
def test_compiled_log_likelihood_and_surgery_equal_eager(digits):
    """S = 300 importance samples on 30 points of a VampPrior VAE, and ELBO surgery on
    200: compiled, the same numbers to float32 rounding."""
    torch.manual_seed(0)
    vae = VAE(64, 4, (16,), prior="vamp", prior_options={"components": 5})
    x = digits[2].x[:30]
    eager = log_likelihood(vae, x, num_samples=300)
    graphs = _graphs_compiled()
    fast = log_likelihood(vae, x, num_samples=300, compile=True)
    assert _graphs_compiled() - graphs >= 3  # encoder, decoder, Bernoulli log-prob
    assert torch.allclose(fast, eager, rtol=1e-5, atol=1e-4)
    eager = elbo_surgery(vae, digits[2].x[:200])
    fast = elbo_surgery(vae, digits[2].x[:200], compile=True)
    assert all(abs(fast[k] - eager[k]) <= 1e-4 * max(1, abs(eager[k])) for k in eager)


@requires_cuda
def test_a_compiled_step_on_cuda_never_waits_for_the_device(digits):
    """As test_train's eager check, with the networks and densities compiled (CUDA
    graphs): after the compiling steps, the package's part of a step and the compiled
    networks make no host-device synchronization."""
    vae = VAE(64, 4, (16,)).cuda()
    step, batches = cuda_step(vae, digits[0].to("cuda"))
    batches = list(batches)[:-1]  # one batch size
    with compiled(vae, (batches[0][0][:2],)) as names:
        assert names == ["encoder.net", "decoder"]
        for batch in batches[:3]:  # compiling and recording the graphs may sync
            step(batch, check=False)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pyro.validation_enabled(False):
                results = [step(x, check=False) for x in batches[3:]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(bool(finite) for _, finite, _ in results)


@requires_cuda
def test_the_recorded_step_on_cuda_never_waits_for_the_device(digits):
    """The whole step recorded, with Pyro's own meanfield ELBO (whose .item() calls are
    left out of the record) and CUDA graphs: after the recording steps, a step makes no
    host-device synchronization, and its loss equals eager's on the same noise."""
    torch.manual_seed(0)
    vae = VAE(64, 4, (16,)).cuda()
    params = dict(vae.named_parameters())
    step = Step(vae, make_elbo("meanfield", 1), params,
                make_optimizer("adam", params.values()), World(device=torch.device("cuda")))
    step.traced = TracedLoss(step.loss, list(params), "cuda", "reduce-overhead")
    batches = [b for b in digits[0].to("cuda").batches(64, shuffle=False)][:-1]
    with pyro.validation_enabled(False):
        for batch in batches[:3]:  # recording, compiling, CUDA graph capture may sync
            step(batch, check=False)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            results = [step(batch, check=False) for batch in batches[3:]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(bool(finite) for _, finite, _ in results)
        pyro.set_rng_seed(3)
        eager = step.loss(*batches[0], num_data=None).detach()
        pyro.set_rng_seed(3)
        recorded, _ = step.traced(batches[0])
    assert torch.allclose(recorded, eager, rtol=1e-5)

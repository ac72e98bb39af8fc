"""Compiled training and evaluation, and bfloat16 matrix products.

``fit(..., compile=True)`` compiles the **whole step** (``TracedLoss``): Pyro's ELBO is
Python around tensor operations, so ``make_fx`` runs model, guide, the ELBO's sums and the
backward pass once per batch shape and records the tensor operations alone, and inductor
compiles that record (directly: the record is one graph already, so Dynamo's guards would
only cost time at each call; on CUDA through ``torch.compile``, for CUDA graphs). Later
steps run the compiled graph; no Pyro Python runs again. On the CPU the optimizer's update
and the batch draw are recorded into the same graph (``pyro_vae.fused.TracedStep``).
(``torch.compile`` of the ELBO itself does not pay: Dynamo breaks the graph at every
``pyro.sample``, 10 times in the tutorial MLP's meanfield loss, and that step took about
1.1 times as long as eager, ``benchmarks/compile_parts.py``.)

Where the step cannot be recorded (several processes, an ELBO without
``differentiable_loss``, a model that reads a float's value on the host), and in the
estimators, ``compiled(model, batch, ...)`` compiles the parts that are plain tensor
code and leaves Pyro's tracing as it is:

- the model's **networks**: the largest submodules that take tensors and return a tensor
  (or a tuple of tensors) when the model and guide run once on ``batch``, found by that
  probe, so a model of your own needs nothing declared. Each is compiled whole
  (``fullgraph=True``) in the slot ``nn.Module.compile`` uses, so parameter names and
  checkpoints do not change;
- the package's **densities** marked with ``kernel``: the Bernoulli log-probability and
  the mixture prior's log-density (one fused pass each instead of several).

``precision="bf16"`` runs the networks under ``torch.autocast`` with bfloat16 (their
matrix products; their outputs are cast back to float32), so log-densities, KL terms and
the ELBO's sums stay in float32: bfloat16 keeps 8 bits of mantissa, and a sum over 784
pixels in it would lose nats. It is refused on devices without fast bfloat16
(``fast_bf16``), where it would only be slower. A recorded step records the networks so.

Where compilation is not possible (no C++ compiler for the CPU, a network Dynamo cannot
capture whole), that part runs eagerly, and one line is logged saying so.
"""

import contextlib
import functools
import logging
import os
import shutil
import statistics
import sys
import time
import types
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from unittest import mock

import torch
import torch._inductor
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pyro
from pyro import poutine
from pyro.infer.util import torch_item
from pyro.nn import PyroModule
from pyro.util import warn_if_nan

from .datasets import Draw
from .errors import ArgumentError

logger = logging.getLogger("pyro_vae")

PRECISIONS = ("float32", "bf16")


def fast_bf16(device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: a CUDA GPU of compute
    capability 8.0 or more, or a CPU with AVX512-BF16 or AMX (the check PyTorch's
    oneDNN kernels use)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def check_precision(precision: str, device) -> None:
    """One-line refusal of an unknown precision, or of bf16 where it is not fast."""
    if precision not in PRECISIONS:
        raise ArgumentError("precision", f"must be one of {list(PRECISIONS)}, got "
                            f"{precision!r}")
    device = torch.device(device)
    if precision == "bf16" and not fast_bf16(device):
        what = ("this CPU has neither AVX512-BF16 nor AMX" if device.type == "cpu" else
                f"device {device} has no native bfloat16 matrix products")
        raise ArgumentError("precision", f"'bf16' would be slower than float32 here: {what}"
                            f"; use 'float32'")


def cxx_compiler() -> Optional[str]:
    """The C++ compiler ``torch.compile`` would use for CPU code, or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    return next((found for name in names + ["g++", "c++", "clang++"]
                 if (found := shutil.which(name))), None)


# Inside ``compiled(...)``: {"densities": whether kernels run compiled, "mode": the
# compile mode}; None outside.
_active: Optional[dict] = None
# Inside ``eagerly()``: compiled networks and densities run eagerly.
_eager_only = False


def kernel(fn: Callable) -> Callable:
    """Mark a pure tensor function (tensors in, a tensor out) as one to compile: inside
    ``compiled(...)`` it runs compiled, elsewhere as written."""
    compiled_by_mode = {}

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if _active is None or not _active["densities"] or _eager_only:
            return fn(*args, **kwargs)
        mode = _active["mode"]
        if mode not in compiled_by_mode:
            compiled_by_mode[mode] = _Fallback(fn.__qualname__, fn, torch.compile(
                fn, fullgraph=True, dynamic=False, mode=mode))
        return compiled_by_mode[mode](*args, **kwargs)
    return run


class _Fallback:
    """A compiled callable that runs ``eager`` instead, for good, after compilation
    fails (one warning line)."""

    def __init__(self, name: str, eager: Callable, compiled: Callable):
        self.name, self.eager, self.compiled, self.failed = name, eager, compiled, False

    def __call__(self, *args, **kwargs):
        if self.failed or _eager_only:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - only compiler errors are swallowed
            if not _is_compile_error(e):
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            logger.warning("could not compile %s (%s: %s); it runs eagerly", self.name,
                           type(e).__name__, reason[:200])
            self.failed = True
            return self.eager(*args, **kwargs)


def _is_compile_error(e: Exception) -> bool:
    from torch._dynamo import exc
    errors = (exc.TorchDynamoException,)
    try:
        from torch._inductor.exc import InductorError
        errors += (InductorError,)
    except ImportError:  # older torch
        pass
    return isinstance(e, errors)


# network -> {(bf16, device type, compile mode): its call}: kept for the module's life, so
# that fitting or evaluating it again (resuming, say) reuses what was compiled.
_calls: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _network_call(name: str, module: nn.Module, bf16: bool, device_type: str,
                  mode: Optional[str]) -> Callable:
    """The call of one network, under bfloat16 autocast when asked, its output back in
    float32, compiled unless ``mode`` is ``"eager"``. Each network gets a function with a
    code object of its own: Dynamo keeps compiled graphs, and counts recompilations, per
    code object, so each network's graphs stay apart from the others'."""
    key = (bf16, device_type, mode)
    calls = _calls.setdefault(module, {})
    if key not in calls:
        def forward(network, *args, **kwargs):
            if not bf16:
                return network._call_impl(*args, **kwargs)
            with torch.autocast(device_type, dtype=torch.bfloat16):
                out = network._call_impl(*args, **kwargs)
            if isinstance(out, tuple):
                return tuple(o.float() for o in out)
            return out.float()
        forward = types.FunctionType(forward.__code__.replace(), forward.__globals__,
                                     f"forward_{type(module).__name__}", None,
                                     forward.__closure__)
        calls[key] = forward if mode == "eager" else _Fallback(
            f"network {name}", forward,
            torch.compile(forward, fullgraph=True, dynamic=False, mode=mode))
    return functools.partial(calls[key], module)


def networks(model: nn.Module, batch: Sequence[torch.Tensor]) -> Dict[str, nn.Module]:
    """The largest submodules of ``model`` that map tensors to a tensor (or a tuple of
    tensors) when its model and guide run once on ``batch``, by name. PyroModules (they
    make Pyro sites) and modules without parameters are not counted."""
    called = {}

    def record(module, args, kwargs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        if all(torch.is_tensor(a) for a in list(args) + list(kwargs.values())) and \
                outputs and all(torch.is_tensor(o) for o in outputs):
            called[id(module)] = True
        else:
            called[id(module)] = called.get(id(module), False)
    handle = nn.modules.module.register_module_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad(), pyro.validation_enabled(False), rng_untouched(batch[0].device):
            guide_trace = poutine.trace(model.guide).get_trace(*batch)
            poutine.replay(model.model, trace=guide_trace)(*batch)
    finally:
        handle.remove()
    found = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, PyroModule) or not called.get(id(module)):
            continue
        if any(name.startswith(outer + ".") for outer in found):
            continue
        if next(module.parameters(), None) is not None:
            found[name] = module
    return found


@contextlib.contextmanager
def compiled(model: nn.Module, batch: Sequence[torch.Tensor], compile: bool = True,
             precision: str = "float32", device=None):
    """Inside the block, ``model``'s networks run compiled (``compile``) and/or with
    bfloat16 matrix products (``precision="bf16"``), and the package's densities run
    compiled; after it, as before. Yields the names of the networks it changed (none
    when neither is asked for). On CUDA the networks compile with CUDA graphs
    (``mode="reduce-overhead"``)."""
    global _active
    device = torch.device(device) if device is not None else batch[0].device
    check_precision(precision, device)
    bf16 = precision == "bf16"
    if compile and device.type == "cpu" and cxx_compiler() is None:
        logger.warning("no C++ compiler (g++, c++ or clang++; or $CXX) for torch.compile: "
                       "the model runs eagerly")
        compile = False
    if not (compile or bf16) or _active is not None:
        yield []
        return
    found = networks(model, batch)
    mode = compile_mode(device)
    before = {name: m._compiled_call_impl for name, m in found.items()}
    for name, module in found.items():
        module._compiled_call_impl = _network_call(name, module, bf16, device.type,
                                                   mode if compile else "eager")
    _active = {"densities": compile, "mode": mode}
    try:
        # Each network compiles once per input shape, grad mode and requires_grad of its
        # input: training, the last batch, validation, the VampPrior's pseudo-inputs, ...
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        with config.patch(**{limit: max(64, getattr(config, limit))}):
            yield list(found)
    finally:
        _active = None
        for name, module in found.items():
            module._compiled_call_impl = before[name]


def compile_mode(device) -> Optional[str]:
    """``torch.compile``'s mode on ``device``: CUDA graphs on CUDA, the default elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def rng_untouched(device):
    """A block whose draws leave the random state (CPU, and ``device``'s) as it was."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _timed(run: Callable[[], None], device) -> float:
    """Seconds of ``run()``, waiting for the device before and after."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def warm_up(run: Callable[[], None], device) -> float:
    """Seconds taken by ``run()`` (called to compile), leaving the random state as it was."""
    with rng_untouched(device):
        return _timed(run, device)


def compare_speed(compiled: Callable[[], None], eager: Callable[[], None], device,
                  repeats: int = 5) -> Tuple[float, float]:
    """Median seconds of ``compiled()`` and of ``eager()``, interleaved, leaving the
    random state as it was."""
    compiled_s, eager_s = [], []
    with rng_untouched(device):
        for _ in range(repeats):
            compiled_s.append(_timed(compiled, device))
            eager_s.append(_timed(eager, device))
    return statistics.median(compiled_s), statistics.median(eager_s)


class TraceError(RuntimeError):
    """The step could not be recorded as one graph (see ``TracedLoss``)."""


class _Graph:
    """One recorded step: the compiled graph, and the values the recording read on the
    host (its guards; the graph returns what it reads as its last output): a later run
    whose reads differ took another branch."""

    def __init__(self, run: Callable, expected: Optional[torch.Tensor]):
        self.run, self.expected = run, expected


class TracedLoss:
    """The training loss and the gradients of ``trained`` as one compiled graph.

    Pyro's ELBO is Python around tensor operations: handlers, traces, site dictionaries.
    ``make_fx`` runs it once (model, guide, the ELBO's sums and the backward pass) and
    records the tensor operations alone; ``torch.compile`` compiles that record. Every
    later step runs the compiled graph, and no Pyro Python runs again: on the tutorial
    MLP that is what makes a compiled step faster than an eager one
    (``benchmarks/train_speed.py``).

    The graph takes every parameter and buffer of ``loss`` (so it sees each update) and
    the batch; it returns the loss and the gradients. What is Python in the step is
    fixed in the record: the batch's shape, ``num_data``, ``beta`` and the loss's
    weight, so one graph is kept for each (``batch_size``: batches of that size alone are
    recorded; an epoch's last, smaller batch is then left to the eager step, which saves
    compiling a second graph for one step per epoch). Its random draws are eager PyTorch's
    (inductor's ``fallback_random``), so a seed gives the noise it gives eagerly.

    Branches on values the step reads on the host (``if scale.min() < 0.1:`` in the
    VampPrior's density, a branch of your own model) become guards: the graph also
    returns what was read, and a step whose reads differ from its graph's runs again,
    from the same random state, with the graph recorded for what it read (recorded
    then, if no graph has been). Each key keeps up to ``max_records`` graphs, one per
    branch; a step that needs more raises ``TraceError`` (it then runs eagerly).
    Pyro's own reads, the loss's ``torch_item`` and ``warn_if_nan``, are left out while
    recording. Recording fails with ``TraceError`` for a step that reads a float's value
    (it would be frozen into the graph), an operation whose output's shape depends on
    values, or a loss that does not reach a trained parameter through the inputs.

    ``loss`` is ``pyro_vae.step``'s loss module (its ``forward`` is the ELBO's
    ``differentiable_loss``, its ``module`` the model); ``trained`` names the
    parameters of ``loss.module`` whose gradients are returned, in that order.
    (``pyro_vae.fused.TracedStep`` records the optimizer's update too.)"""

    def __init__(self, loss: nn.Module, trained: Sequence[str], device, mode=None,
                 max_records: int = 8, batch_size: Optional[int] = None):
        self.loss, self.trained, self.device = loss, [f"module.{n}" for n in trained], device
        self.batch_size = batch_size
        self.options = {"fallback_random": True}
        if mode == "reduce-overhead":  # CUDA graphs (mode and options do not combine)
            self.options["triton.cudagraphs"] = True
        elif torch.device(device).type == "cpu":
            # The graph's calls from C++, not Python: about 0.4 ms less per MLP step. Its
            # kernels are compiled optimized, the calls apart with fewer optimizations:
            # 3 s of C++ compilation against 4-5 s for the MLP in one file.
            self.options["cpp_wrapper"] = True
            self.options["cpp_wrapper_build_separate"] = True
        self.max_records = max_records
        self.graphs: Dict[tuple, List[_Graph]] = {}  # per key, one per branch taken
        self._slots = None  # where each parameter and buffer lives (_inputs)

    def _inputs(self) -> Dict[str, torch.Tensor]:
        """Every parameter and buffer of the loss, by name: as they are where inductor
        compiled the graph (it runs without autograd), detached for ``torch.compile``
        (CUDA graphs). Their names and modules are found once (``named_parameters``,
        ``named_buffers``); each call reads the tensors from their modules' slots, so a
        tensor set anew in its slot is seen, without walking the modules at every step."""
        if self._slots is None:
            named = [(n, "_parameters") for n, _ in self.loss.named_parameters()]
            named += [(n, "_buffers") for n, _ in self.loss.named_buffers()]
            self._slots = [(name, getattr(self.loss.get_submodule(name.rpartition(".")[0]),
                                          kind), name.rpartition(".")[2])
                           for name, kind in named]
        state = {name: slots[attr] for name, slots, attr in self._slots}
        if "triton.cudagraphs" in self.options:
            return {name: t.detach() for name, t in state.items()}
        return state

    def takes(self, batch: Sequence[torch.Tensor]) -> bool:
        """Whether ``batch`` is of the size recorded (``batch_size``; None: any size)."""
        size = batch.size if isinstance(batch, Draw) else len(batch[0])
        return self.batch_size is None or size == self.batch_size

    def __call__(self, batch: Sequence[torch.Tensor], weight: float = 1.0,
                 num_data: Optional[int] = None, beta: float = 1.0
                 ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The loss (times ``weight``) and the gradients of the trained parameters."""
        batch = tuple(batch)
        key = (tuple((t.shape, t.dtype) for t in batch), weight, num_data, beta)
        state = self._inputs()
        out = self._run(key, list(state.values()) + list(batch),
                        lambda: self._record(state, batch, weight, num_data, beta))
        n = 1 + len(self.trained)
        # CUDA graphs write each run's outputs where the last run's were: the loss is
        # kept until the steps are settled, the gradients only until the update.
        loss = out[0].clone() if "triton.cudagraphs" in self.options else out[0]
        return loss, list(out[1:n])

    def _run(self, key, inputs: List[torch.Tensor], record: Callable[[], _Graph]):
        """Run the graph of ``key`` for the branch the step takes (see the class), on
        ``inputs``; its outputs."""
        graphs = self.graphs.setdefault(key, [])  # the last one that ran first
        rng = _rng_state(self.device) if not graphs or graphs[0].expected is not None \
            else None
        tried, read = [], None
        while True:
            graph = next((g for g in graphs if g not in tried and (read is None or (
                g.expected is not None and torch.equal(g.expected, read)))), None)
            if graph is None:  # a branch not recorded yet: record it from the same noise
                if len(graphs) == self.max_records:
                    raise TraceError(f"the step read different values in {self.max_records}"
                                     f" recordings")
                graph = record()
                graphs.append(graph)
            tried.append(graph)
            with torch.no_grad():
                out = graph.run(*inputs)
            if graph.expected is None:
                break
            read = out[-1]
            if torch.equal(read, graph.expected):
                break
            _set_rng_state(rng, self.device)  # another branch: run it on the same noise
        graphs.remove(graph)
        graphs.insert(0, graph)
        return out

    def _loss_and_grads(self, names: List[str], state, data, weight, num_data, beta):
        """The loss (times ``weight``) and the gradients of ``self.trained``, from the
        state tensors (named ``names``) and the batch ``data``: the function recorded."""
        value = torch.func.functional_call(self.loss, dict(zip(names, state)),
                                           tuple(data), {"num_data": num_data, "beta": beta})
        if weight != 1:
            value = value * weight
        trained = [state[names.index(n)] for n in self.trained]
        grads = torch.autograd.grad(value, trained, allow_unused=True)
        missing = [n for n, g in zip(self.trained, grads) if g is None]
        if missing:
            raise TraceError(f"the loss does not reach {missing[0][len('module.'):]} "
                             f"through its inputs")
        return value.detach(), list(grads)

    def _record(self, state: Dict[str, torch.Tensor], batch, weight, num_data, beta
                ) -> _Graph:
        names, n = list(state), len(state)
        trained = set(self.trained)

        def loss_and_grads(*flat):
            value, grads = self._loss_and_grads(names, flat[:n], flat[n:], weight,
                                                num_data, beta)
            return (value,) + tuple(grads)

        inputs = [t.detach().requires_grad_(name in trained) for name, t in state.items()]
        inputs += list(batch)
        return self._compile(*record(loss_and_grads, inputs, self.device), inputs)

    def _compile(self, graph, expected: Optional[torch.Tensor], inputs) -> _Graph:
        """``graph`` compiled by inductor for ``inputs`` of these shapes and strides,
        without Dynamo (the graph is already whole: Dynamo's guards would only cost
        time at each call). With CUDA graphs, through ``torch.compile``."""
        if "triton.cudagraphs" in self.options:
            return _Graph(torch.compile(graph.forward, fullgraph=True, dynamic=False,
                                        options=self.options), expected)
        # Fake inputs with a shape environment, as Dynamo would give: without one,
        # inductor does not use its on-disk graph cache.
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        fake = FakeTensorMode(shape_env=ShapeEnv())
        inputs = [fake.from_tensor(t.detach(), static_shapes=True) for t in inputs]
        for node, value in zip((n for n in graph.graph.nodes if n.op == "placeholder"),
                               inputs):
            node.meta["val"] = value
        try:
            with torch.no_grad():
                try:  # the CPU's vector instructions as the CPU lists them (_trusted_vector_isa)
                    with _trusted_vector_isa():
                        run = torch._inductor.compile(graph, inputs, self.options)
                except Exception as e:  # noqa: BLE001 - retried as torch would compile it
                    if not _is_compile_error(e):
                        raise
                    run = torch._inductor.compile(graph, inputs, self.options)
        except Exception as e:  # noqa: BLE001 - a step that cannot compile runs eagerly
            if not _is_compile_error(e):
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise TraceError(f"could not compile it ({type(e).__name__}: {reason[:200]})")
        return _Graph(run, expected)


def _trusted_vector_isa():
    """Inductor checks, once per process, which vector instruction sets the C++ compiler
    can build and load, by compiling a test program for each and loading it in a new
    Python process: 6-7 s per process on a busy 2-core machine, and about 20 s in an
    empty compile cache, for what the CPU's flags already say. Inside this block it
    takes the flags' word (``cpp.vec_isa_ok``); a compiler that cannot build them then
    fails, and the graph is compiled again with the checks."""
    return torch._inductor.config.patch({"cpp.vec_isa_ok": True})


class _HostReads(TorchDispatchMode):
    """While a step is recorded: the tensors whose values it reads on the host
    (``bool(t)``, ``int(t)``, ``t.item()``), and the values read; and whether it read a
    float's value (which would be frozen into the graph: ``record`` refuses it)."""

    def __init__(self):
        super().__init__()
        self.tensors, self.values, self.float_read = [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.float_read |= args[0].dtype.is_floating_point
            self.tensors.append(args[0])
            self.values.append(out)
        return out

    def unchanged(self) -> torch.Tensor:
        """Whether the tensors read still hold the values read so far (a recorded
        boolean tensor)."""
        read = torch.stack([t.double() for t in self.tensors])
        return (read == _as_tensor(self.values, read.device)).all()


def _as_tensor(values, device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)


def record(step: Callable, inputs: List[torch.Tensor], device, pass_reads: bool = False):
    """``make_fx``'s record of ``step(*inputs)`` (a tuple of tensors), with what it read
    on the host as one more output, last (a float64 vector; the values read become
    ``expected``, else None): ``(graph, expected)``. The inputs' values are used as
    they are (real tensors: the step runs), the random state is left as it was, and
    Pyro's own reads are left out. ``pass_reads``: ``step(reads, *inputs)``, where
    ``reads.unchanged()`` says whether the values read so far still hold. ``TraceError``
    for a step that cannot be recorded as one graph."""
    from torch.fx.experimental.proxy_tensor import make_fx
    reads = _HostReads()

    def guarded(*flat):
        with reads:
            out = tuple(step(reads, *flat) if pass_reads else step(*flat))
        if reads.tensors:
            out += (torch.stack([t.double() for t in reads.tensors]),)
        return out
    try:
        with rng_untouched(device), pyro.validation_enabled(False), eagerly(), \
                _pyro_value_reads_left_out():
            graph = make_fx(guarded, _error_on_data_dependent_ops=False)(*inputs)
        if reads.float_read:  # raised here: Pyro would add its trace to the message
            raise TraceError("the step reads a floating-point value on the host")
        _drop_reads(graph)
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to record means: run eagerly
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TraceError(f"{type(e).__name__}: {reason[:200]}") from e
    return graph, _as_tensor(reads.values, device) if reads.values else None


def _drop_reads(graph) -> None:
    """Remove the host reads from ``graph`` (their values were used as Python constants
    while recording; ``record`` returns the tensors read). An operation whose output's
    shape depends on values (``nonzero``, ...) cannot be guarded: ``TraceError``."""
    read = torch.ops.aten._local_scalar_dense.default
    dropped = False
    for node in list(graph.graph.nodes):
        target = node.target
        if node.op != "call_function" or not hasattr(target, "tags"):
            continue
        if target is read:
            graph.graph.erase_node(node)
            dropped = True
        elif (torch.Tag.dynamic_output_shape in target.tags and not _integer_index(node)) \
                or torch.Tag.data_dependent_output in target.tags:
            raise TraceError(f"the step's {target.__name__} depends on values")
    if dropped:
        graph.graph.lint()
        graph.recompile()


def _integer_index(node) -> bool:
    """``x[i]`` with integer index tensors (``mu[c]`` of an enumerated ``c``): its
    output's shape is the indices', whatever their values (a boolean mask's is not)."""
    if node.target is not torch.ops.aten.index.Tensor:
        return False
    return all(i.meta["val"].dtype in (torch.int32, torch.int64)
               for i in node.args[1] if i is not None)


def _rng_state(device) -> tuple:
    device = torch.device(device)
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], torch.device(device))


@contextlib.contextmanager
def eagerly():
    """A block in which compiled networks and densities run eagerly: while a step is
    recorded, and in a ``fit`` whose step was recorded (its last, smaller batch and the
    validation then need no compiled networks of their own)."""
    global _eager_only
    before, _eager_only = _eager_only, True
    try:
        yield
    finally:
        _eager_only = before


@contextlib.contextmanager
def _pyro_value_reads_left_out():
    """While recording, Pyro's host reads in its ELBOs (``torch_item`` of the loss,
    ``warn_if_nan``'s check) keep the tensor or do nothing: a recorded graph cannot
    read values. Any other read still stops the recording."""
    with contextlib.ExitStack() as stack:
        for module in list(sys.modules.values()):
            if not getattr(module, "__name__", "").startswith("pyro."):
                continue
            if getattr(module, "torch_item", None) is torch_item:
                stack.enter_context(mock.patch.object(
                    module, "torch_item", lambda x: x.detach() if torch.is_tensor(x) else x))
            if getattr(module, "warn_if_nan", None) is warn_if_nan:
                stack.enter_context(mock.patch.object(module, "warn_if_nan",
                                                      lambda x, *a, **k: x))
        yield

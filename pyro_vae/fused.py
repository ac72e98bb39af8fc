"""The whole training step as one compiled program: ``fit(compile=True)`` on the CPU.

``pyro_vae.compiled.TracedLoss`` records Pyro's ELBO and its backward pass as one graph.
``TracedStep`` records the rest of ``Step`` into the same graph, so that one compiled call
takes a whole step:

- **the optimizer's update**: Pyro's ``ClippedAdam`` written as tensor operations
  (``ClippedAdamUpdate``) on the optimizer's own state tensors, which the graph updates
  in place; PyTorch's fused ``Adam`` (the default) right after the graph, by its own
  kernel on the gradients the graph returns (``AdamUpdate``: in the graph, the update's
  code took longer to compile than the loss's). The optimizer's ``state_dict`` keeps
  its layout, so checkpoints, resume and an eager step (the last, smaller batch of an
  epoch) all see the same state;
- **the finite check**: the update applies only where the loss and the sum of every
  gradient are finite (the test ``Step`` makes eagerly); the graph returns the sums, so a
  non-finite step is named;
- **the batch draw**: the batch's rows are gathered from the whole training tensors
  inside the graph, and dynamic binarization compares with counter-based uniforms
  (``pyro_vae.datasets.uniforms``: an integer hash of the batch's key, drawn from the
  data generator, and each value's position), computed in the graph's kernels: bit for
  bit the eager run's, so a compiled run takes the eager run's noise and resumes
  exactly.

It runs on the CPU. On CUDA the step stays a ``TracedLoss`` (with CUDA graphs) and the
update eager, as before.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch._inductor.inductor_prims  # noqa: F401 - prims.inductor_force_stride_order
from torch import nn

from pyro.optim.clipped_adam import ClippedAdam

from .compiled import TracedLoss, _Graph, record
from .datasets import Draw, gather


class AdamUpdate:
    """``torch.optim.Adam(fused=True)``'s step, made right after the recorded graph, which
    returns the gradients: PyTorch's own fused Adam kernel (``torch._fused_adam_``) on the
    optimizer's own state: from the same gradients, the weights and moments are bitwise
    the eager optimizer's (but for moments flushed to 0, see ``_adam_``).
    (Written into the graph as tensor operations, the update took inductor longer to
    compile than the whole loss, and the step ran no faster.) The state: per parameter
    ``step`` (a float32 scalar tensor), ``exp_avg`` and ``exp_avg_sq``, created as Adam
    creates them on its first step. Adam without amsgrad, weight decay or maximize only
    (``supports``)."""

    #: Made by ``TracedStep.step`` after the graph, not recorded in it.
    in_graph = False
    per_parameter = 3

    def __init__(self, optimizer: torch.optim.Adam, params: Sequence[torch.Tensor]):
        self.optimizer, self.params = optimizer, list(params)
        self.group = optimizer.param_groups[0]

    @staticmethod
    def supports(optimizer) -> bool:
        if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
            return False
        g = optimizer.param_groups[0]
        return bool(g.get("fused")) and not (g["amsgrad"] or g["weight_decay"] or
                                             g["maximize"] or g.get("differentiable") or
                                             g.get("decoupled_weight_decay")) and \
            all(isinstance(b, float) for b in g["betas"]) and isinstance(g["eps"], float)

    def key(self) -> tuple:
        """What the recorded update holds as constants."""
        return (type(self).__name__, tuple(self.group["betas"]), self.group["eps"])

    def state(self) -> List[torch.Tensor]:
        """Each parameter's state tensors, in order (created if the optimizer has not
        stepped yet, as it would create them)."""
        out = []
        for p in self.params:
            s = self.optimizer.state[p]
            if not s:
                s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out += [s["step"], s["exp_avg"], s["exp_avg_sq"]]
        return out

    def scalars(self) -> List[torch.Tensor]:
        """The graph's scalar inputs for the update: none (it is not in the graph)."""
        return []

    def apply(self, params, grads, state, scalars, ok: torch.Tensor) -> None:
        """Update ``params`` and ``state`` (``state()``'s layout) in place if ``ok``."""
        beta1, beta2 = self.group["betas"]
        with torch.no_grad():
            _adam_(params, list(grads), state[1::3], state[2::3], state[0::3],
                   float(self.group["lr"]), ok, beta1, beta2, self.group["eps"])

    def commit(self, finite: torch.Tensor) -> None:
        """Host bookkeeping after a step: none (the step count is a tensor)."""


#: Moments below this are set to 0 (see ``_adam_``).
TINY = 1e-30
#: Every this many steps (of a parameter's step count).
FLUSH_EVERY = 64


def _adam_(params: List[torch.Tensor], grads: List[torch.Tensor],
           exp_avgs: List[torch.Tensor], exp_avg_sqs: List[torch.Tensor],
           steps: List[torch.Tensor], lr: float, ok: torch.Tensor, beta1: float,
           beta2: float, eps: float) -> None:
    """One step of ``torch.optim.Adam(fused=True)`` where ``ok`` (a bool scalar), as
    ``Adam.step`` takes it: the step counts advanced, then PyTorch's fused kernel.

    Every ``FLUSH_EVERY`` steps the moments below ``TINY`` in size are set to 0. A
    weight whose gradient has been 0 for a while (a network's weights for MNIST's nearly
    always black border pixels) sees its first moment decay by beta1 = 0.9 per step, into
    float32's subnormal range (below 1.2e-38) within a thousand steps; arithmetic on
    subnormals takes the CPU a hundred times longer, and after two epochs of MNIST such
    steps took a quarter longer (measured). A moment below 1e-30 moves its weight by at
    most lr * 1e-30 / eps = 1e-25 per step, and from 1e-30 it needs more than 150 steps
    to decay into the subnormals. (Eager PyTorch keeps the subnormals; XLA, and so
    NumPyro, flushes them to zero.)"""
    if not bool(ok):
        return
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr,
                       beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
                       amsgrad=False, maximize=False)
    if steps and int(steps[0]) % FLUSH_EVERY == 0:
        for m, v in zip(exp_avgs, exp_avg_sqs):
            m.masked_fill_(m.abs() < TINY, 0)
            v.masked_fill_(v < TINY, 0)


class ClippedAdamUpdate:
    """Pyro's ``ClippedAdam`` step as tensor operations, as its eager ``step`` computes
    it: each gradient clipped to +-clip_norm, m <- beta1 m + (1 - beta1) g,
    v <- beta2 v + (1 - beta2) g^2, p <- p - s m / (sqrt(v) + eps) with
    s = lr sqrt(1 - beta2^t) / (1 - beta1^t) computed on the host (its step count ``t``
    and the decayed ``lr`` are Python numbers of the optimizer's state, updated by
    ``commit`` after each finite step). Without weight decay or centered variance only
    (``supports``)."""

    per_parameter = 2
    #: Recorded in the graph (``apply`` is tensor operations).
    in_graph = True

    def __init__(self, optimizer: ClippedAdam, params: Sequence[torch.Tensor]):
        self.optimizer, self.params = optimizer, list(params)
        self.group = optimizer.param_groups[0]
        self._next: Optional[Tuple[float, int]] = None

    @staticmethod
    def supports(optimizer) -> bool:
        if type(optimizer) is not ClippedAdam or len(optimizer.param_groups) != 1:
            return False
        g = optimizer.param_groups[0]
        return not (g["weight_decay"] or g["centered_variance"]) and \
            all(isinstance(b, float) for b in g["betas"]) and isinstance(g["eps"], float)

    def key(self) -> tuple:
        return (type(self).__name__, tuple(self.group["betas"]), self.group["eps"])

    def state(self) -> List[torch.Tensor]:
        out = []
        for p in self.params:
            s = self.optimizer.state[p]
            if not s:
                s["step"] = 0
                s["exp_avg"] = torch.zeros_like(p)
                s["exp_avg_sq"] = torch.zeros_like(p)
            out += [s["exp_avg"], s["exp_avg_sq"]]
        return out

    def scalars(self) -> List[torch.Tensor]:
        """-s (see the class) and the clipping bound, for the step about to be taken."""
        beta1, beta2 = self.group["betas"]
        lr = self.group["lr"] * self.group["lrd"]
        t = self.optimizer.state[self.params[0]]["step"] + 1
        self._next = (lr, t)
        step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        device = self.params[0].device
        return [torch.tensor(-step_size, dtype=torch.float64, device=device),
                torch.tensor(float(self.group["clip_norm"]), device=device)]

    def apply(self, params, grads, state, scalars, ok: torch.Tensor) -> None:
        beta1, beta2 = self.group["betas"]
        eps = self.group["eps"]
        minus_step_size, clip = scalars
        for i, (p, g) in enumerate(zip(params, grads)):
            m, v = state[2 * i:2 * i + 2]
            g = torch.minimum(torch.maximum(g, -clip), clip)
            m_new = _flushed(m * beta1 + (1 - beta1) * g)
            v_new = _flushed(v * beta2 + (1 - beta2) * g * g)
            p_new = p + minus_step_size.to(p.dtype) * m_new / (v_new.sqrt() + eps)
            _assign(ok, (p, p_new), (m, m_new), (v, v_new))

    def commit(self, finite: torch.Tensor) -> None:
        """After the step: a finite one advances the step count and decays the learning
        rate, as ``ClippedAdam.step`` does (a host read of ``finite``)."""
        if bool(finite):
            lr, t = self._next
            self.group["lr"] = lr
            for p in self.params:
                self.optimizer.state[p]["step"] = t


UPDATES = (AdamUpdate, ClippedAdamUpdate)


def functional_update(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]):
    """The update of ``optimizer`` (over ``params``, in that order) as tensor operations
    a recorded step can hold, or None where it has none (another optimizer, or an
    option these do not write)."""
    return next((u(optimizer, params) for u in UPDATES if u.supports(optimizer)), None)


def _flushed(moment: torch.Tensor) -> torch.Tensor:
    """``moment`` with entries below ``TINY`` in size set to 0 (why: ``_adam_``), as
    tensor operations, at every step."""
    return torch.where(moment.abs() < TINY, torch.zeros_like(moment), moment)


def _assign(ok: torch.Tensor, *pairs) -> None:
    """``old`` <- ``new`` where ``ok``, in place, for each (old, new)."""
    with torch.no_grad():
        for old, new in pairs:
            old.copy_(torch.where(ok, new, old))


class TracedStep(TracedLoss):
    """The whole step as one compiled graph: loss and gradients (``TracedLoss``), the
    finite check, the optimizer's ``update`` in place (in the graph, or right after it:
    the update's ``in_graph``), and the batch's gather and binarization from a ``Draw``
    (see the module). ``step`` returns the loss, whether it and every gradient's sum
    were finite, and those sums (loss first), as tensors.

    Guards are those of ``TracedLoss``; a run whose reads differ from its graph's
    changes nothing (the update also waits on the reads), and runs again as there."""

    updates = True

    def __init__(self, loss: nn.Module, trained: Sequence[str], device, update,
                 max_records: int = 8, batch_size: Optional[int] = None):
        super().__init__(loss, trained, device, None, max_records, batch_size)
        self.update = update
        self._copies = None  # of the trained parameters and the optimizer's state

    def step(self, batch, weight: float = 1.0, num_data: Optional[int] = None,
             beta: float = 1.0, dry: bool = False
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step on ``batch`` (a ``Draw``, or a tuple of tensors); ``dry``: on copies
        of the trained parameters and the optimizer's state (made at the first dry step
        and kept), changing nothing (to compile, or to time)."""
        data, binarize = _data_inputs(batch)
        key = (binarize, tuple((t.shape, t.dtype) for t in data), weight, num_data, beta,
               self.update.key())
        state, moments = self._inputs(), self.update.state()
        scalars = self.update.scalars()
        if dry:
            if self._copies is None:
                trained = set(self.trained)
                self._copies = ({k: t.detach().clone() for k, t in state.items()
                                 if k in trained}, [t.clone() for t in moments])
            state = {k: self._copies[0].get(k, t) for k, t in state.items()}
            moments = self._copies[1]
        inputs = list(state.values()) + moments + scalars + data
        out = self._run(key, inputs, lambda: self._record_step(
            state, moments, scalars, data, binarize, weight, num_data, beta))
        if not self.update.in_graph:  # the graph returned whether to, and the gradients
            trained = [state[name] for name in self.trained]
            self.update.apply(trained, out[4:4 + len(trained)], moments, scalars, out[3])
        return out[0], out[1], out[2]

    def _record_step(self, state, moments, scalars, data, binarize, weight, num_data,
                     beta) -> _Graph:
        names, trained = list(state), set(self.trained)
        sizes = [len(state), len(moments), len(scalars)]
        which = [names.index(n) for n in self.trained]

        def whole_step(reads, *flat):
            state, moments, scalars, data = _split(flat, sizes)
            value, grads = self._loss_and_grads(names, state, _batch(data, binarize),
                                                weight, num_data, beta)
            sums = torch.stack([value.float()] + [g.sum().float() for g in grads])
            finite = torch.isfinite(sums.sum())
            ok = finite if not reads.tensors else finite & reads.unchanged()
            if not self.update.in_graph:
                return (value, finite, sums, ok, *grads)
            self.update.apply([state[i] for i in which], grads, moments, scalars, ok)
            return value, finite, sums

        # Recorded on copies: recording runs the step, update included.
        inputs = [t.detach().clone().requires_grad_(n in trained) for n, t in state.items()]
        inputs += [t.clone() for t in moments] + scalars + data
        return self._compile(*record(whole_step, inputs, self.device, pass_reads=True),
                             inputs)


def _data_inputs(batch) -> Tuple[List[torch.Tensor], Optional[bool]]:
    """The graph's data inputs for ``batch`` and how it gathers them: a ``Draw`` with an
    index tensor gives the whole training tensors, the index (and the noise's key, when
    binarized: True; else False); anything else its tensors as they are (None)."""
    if isinstance(batch, Draw) and torch.is_tensor(batch.index):
        data = list(batch.data.tensors) + [batch.index]
        if batch.data.dynamic_binarize and batch.key is not None:
            return data + [batch.key], True
        if not batch.data.dynamic_binarize:
            return data, False
    return list(batch), None


def _batch(data: List[torch.Tensor], binarize: Optional[bool]):
    """The batch, from the graph's data inputs (``_data_inputs``): gathered (and
    binarized) inside the graph, or as given."""
    if binarize is None:
        return data
    if binarize:
        x, *rest = gather(tuple(data[:-2]), data[-2], True, data[-1], every_value=True)
        # One buffer of the binary batch: else inductor would hash in every kernel
        # that reads it (the encoder's input, the likelihood, its gradient).
        x = torch.ops.prims.inductor_force_stride_order(x, x.stride())
        return [x] + rest
    return gather(tuple(data[:-1]), data[-1])


def _split(flat, sizes: Sequence[int]) -> List[list]:
    """``flat`` cut into consecutive pieces of ``sizes``, and the rest."""
    out, i = [], 0
    for n in sizes:
        out.append(list(flat[i:i + n]))
        i += n
    return out + [list(flat[i:])]

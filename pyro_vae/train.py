"""fit(): the training loop (Pyro's ELBO, one PyTorch optimizer), epoch callbacks, safe
checkpoints and exact resume."""

import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

import pyro
from pyro import poutine
from pyro.infer.util import torch_item
from pyro.optim.clipped_adam import ClippedAdam

from .distributed import World
from .evaluation import elbo as evaluate_elbo
from .objectives import (beta_at, check_objective, make_elbo, plain_elbo_loss,
                         scales_with_data_size, warn_if_monte_carlo_kl)

OPTIMIZERS = ("adam", "clipped_adam")

Callback = Callable[[Dict, torch.nn.Module], None]


logger = logging.getLogger("pyro_vae")


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN or infinite."""


class _Loss(torch.nn.Module):
    """Pyro's ELBO as a module: ``forward`` returns its ``differentiable_loss`` (what
    Pyro's ``ELBOModule`` does), so that ``DistributedDataParallel`` can wrap it. The
    networks are used without ``param`` sites (``VAE.unregistered``) where the model
    offers it: the parameters were found once, by ``trained_parameters``."""

    def __init__(self, vae, model, guide, objective):
        super().__init__()
        self.vae = vae
        self.model, self.guide, self.objective = model, guide, objective

    def forward(self, *args, **kwargs) -> torch.Tensor:
        unregistered = getattr(self.vae, "unregistered", contextlib.nullcontext)
        with unregistered():
            return self.objective.differentiable_loss(self.model, self.guide, *args, **kwargs)


class _Step:
    """One training step: Pyro's ELBO gives the loss and its gradients; one PyTorch
    optimizer updates every trained parameter, unless the loss or a gradient is not
    finite, in which case nothing changes.

    This is ``SVI.step`` with two changes. Pyro's ``PyroOptim`` keeps one optimizer per
    parameter tensor and traces the step to find them; here the parameters are found
    once, and a single fused Adam updates them all (``make_optimizer``). The loss is the
    ELBO's ``differentiable_loss`` (``_Loss``, under ``DistributedDataParallel`` when
    several processes train), or for the IWAE bound, which has none in Pyro, its
    ``loss_and_grads``.

    The finite check never waits for the device unless asked (``check``): the fused Adam
    kernel skips the update on the device itself when told the step was not finite.
    """

    def __init__(self, vae, model, guide, objective, params: Dict[str, torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, world: World):
        self.model, self.guide, self.objective = model, guide, objective
        self.params, self.optimizer, self.world = params, optimizer, world
        self.differentiable = hasattr(objective, "differentiable_loss")
        if self.differentiable:
            self.loss = _Loss(vae, model, guide, objective)
            if world.size > 1:
                trained = {id(p) for p in params.values()}
                self.loss = world.wrap(self.loss, ignore=[
                    "vae." + name for name, p in vae.named_parameters()
                    if id(p) not in trained])
        self.device_skip = (isinstance(optimizer, torch.optim.Adam)
                            and bool(optimizer.defaults.get("fused")))

    def __call__(self, x: torch.Tensor, weight: float = 1.0, check: bool = True, **kwargs
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[str]]:
        """Returns the loss (times ``weight``) and whether it and every gradient were
        finite, both as tensors on the device; and, if the step was checked on the host
        (``check``, or an optimizer that cannot skip on the device), the first
        non-finite quantity ("loss", "gradient of decoder.0.weight") or None."""
        if self.differentiable:
            loss = self.loss(x, **kwargs)
            if weight != 1:
                loss = loss * weight
            loss.backward()
            loss = loss.detach()
        else:
            loss = torch_item(self.objective.loss_and_grads(self.model, self.guide, x,
                                                            **kwargs))
            loss = torch.tensor(loss, device=x.device)
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        # One sum per gradient: a NaN or an infinity anywhere makes the total non-finite
        # (so does a sum beyond the float range, which a norm's squares reach far sooner).
        finite = torch.isfinite(torch.stack([loss.float()] + [g.sum().float() for g in grads])
                                .sum())
        finite = self.world.all_true(finite)  # every process takes the same decision
        bad = None
        if check or not self.device_skip:
            if not finite:  # waits for the device
                bad = "loss" if not torch.isfinite(loss) else next(
                    (f"gradient of {name}" for name, p in self.params.items()
                     if p.grad is not None and not torch.isfinite(p.grad).all()),
                    "sum of the gradients" if self.world.size == 1 else
                    "loss of another process")
            else:
                self.optimizer.step()
        else:
            self.optimizer.found_inf = (~finite).float()  # read by the fused Adam kernel
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        return loss, finite, bad


def trained_parameters(vae, model, guide, x: torch.Tensor) -> Dict[str, torch.nn.Parameter]:
    """The parameters that ``model`` and ``guide`` register with Pyro on data ``x`` (the
    ``param`` sites of their traces), by name in ``vae``, in ``vae``'s order."""
    with poutine.trace(param_only=True) as capture, torch.no_grad(), \
            pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(x)
        poutine.replay(model, trace=guide_trace)(x)
    seen = {id(_unconstrained(site["value"])) for site in capture.trace.nodes.values()}
    named = {name: p for name, p in vae.named_parameters() if id(p) in seen}
    if len(named) != len(seen):
        raise ValueError("the model or guide has Pyro parameters outside the module "
                         "(pyro.param); fit trains module parameters only")
    return named


def _unconstrained(value: torch.Tensor) -> torch.Tensor:
    """The leaf tensor behind a ``param`` site's value."""
    return value.unconstrained() if hasattr(value, "unconstrained") else value


def make_optimizer(name: str, params, lr: float = 1e-3,
                   clip_norm: float = 10.0) -> torch.optim.Optimizer:
    """One optimizer over ``params``: PyTorch's ``Adam`` (fused kernel), or Pyro's
    ``ClippedAdam`` (each gradient clipped to ``clip_norm`` elementwise, as
    ``pyro.optim.ClippedAdam`` does)."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "clipped_adam":
        return ClippedAdam(params, lr=lr, clip_norm=clip_norm)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")


def fit(vae, train, valid=None, *, epochs: int = 10, loss: str = "meanfield",
        num_particles: int = 1, beta: float = 1.0, warmup_epochs: int = 0,
        batch_size: int = 128, lr: float = 1e-3,
        optimizer: str = "adam", clip_norm: float = 10.0, seed: int = 0,
        device=None, callbacks: Sequence[Callback] = (), progress: bool = True,
        validate: bool = True, freeze_model: bool = False,
        skip_nonfinite: int = 0, checkpoint: Optional[Callable[[Dict], None]] = None,
        checkpoint_every: int = 0, resume: Optional[Dict] = None,
        check_every: Optional[int] = None, early_stopping: int = 0) -> List[Dict]:
    """Train ``vae`` on ``train`` by stochastic variational inference and return the
    per-epoch history: each step is ``pyro.infer.SVI``'s (Pyro's ELBO for the loss and
    its gradients) with one PyTorch optimizer for all parameters (see ``_Step``).

    Each step estimates the objective of the whole training set from one minibatch (the
    ``"data"`` plate scales it by N / B) and takes one optimizer step. ``loss`` is
    ``"trace"``, ``"meanfield"`` or ``"iwae"`` (see ``pyro_vae.objectives``).

    ``beta`` weights the KL term (beta-VAE, Higgins et al. 2017); with ``warmup_epochs``
    W it rises linearly from 0 at epoch 1 to ``beta`` at epoch W + 1.

    After each epoch a record ``{"epoch", "beta", "train_elbo", "valid_elbo", "seconds"}``
    is appended to the history and passed to every ``callback(record, vae)``. Values are
    per data point, in nats: ``train_elbo`` is the training objective (the beta-weighted
    ELBO, or the IWAE bound) averaged over the epoch's minibatches; ``valid_elbo`` is the
    plain ELBO (beta = 1) of ``valid``; ``seconds`` excludes validation and checkpoints.

    ``device``: move the model and data there; by default the model's device is used.
    The whole data set is held on the device, and a step never waits for it except to
    check for non-finite values: every ``check_every`` steps (default: every step on the
    CPU, where checking costs nothing; every 50 on a GPU).
    ``validate``: check distribution arguments and supports on the first step.
    A step whose loss or gradient is not finite changes no parameter (with the default
    ``adam`` the fused kernel skips it on the device). At the next check, training stops
    with ``TrainingDiverged`` naming the epoch, the step and, when checked at that step,
    the quantity; ``skip_nonfinite`` such steps are skipped (and logged) first. Skipped
    steps do not count in ``train_elbo``.
    ``freeze_model``: train the guide's parameters only; the decoder, the likelihood and
    the prior stay as they are (to fit a new guide to a trained model, see
    ``VAE.swap_guide``; a prior built on the guide's own encoder would move, and is
    refused).

    Checkpoints and exact resume: ``checkpoint(state)`` is called with the training state
    (everything but ``vae``'s weights: optimizer state, position in the run, the epoch's
    data order, the random number generators, the history so far; plain tensors and
    containers) before the first step, after every epoch, every ``checkpoint_every``
    steps, and before ``TrainingDiverged`` is raised (when the failed step was the last
    one taken, the state before it: resuming retries that batch with fresh noise).
    ``fit(..., resume=state)`` with ``vae`` holding the weights saved with ``state``
    continues exactly where it was taken: on the CPU the result is bitwise that of the
    uninterrupted run. ``lr`` and ``clip_norm`` given on resume replace the saved ones.

    ``early_stopping`` P: stop after P epochs in a row without a better ``valid_elbo``
    than the best so far (a function of the history, so it resumes too); the history
    then ends there, and its best epoch is the one to keep (``best_epoch(history)``).

    Several processes (``torch.distributed`` initialized, e.g. by ``torchrun``; see
    ``pyro_vae.distributed``): each trains on its shard of every global batch of
    ``batch_size`` points under ``DistributedDataParallel``, and the result is that of
    one process with the same batches. Process ``r`` draws its noise from ``seed + r``.
    Process 0 alone validates, calls ``callbacks`` and ``checkpoint``, and shows
    progress. The IWAE bound is not supported there (Pyro computes its gradients
    outside a module's forward).

    Clears Pyro's parameter store first: PyroModule registers parameters by name, and a
    stale entry from an earlier model of the same shape would be optimized instead.
    """
    for name, value in (("skip_nonfinite", skip_nonfinite),
                        ("checkpoint_every", checkpoint_every),
                        ("early_stopping", early_stopping)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if epochs < 0 or batch_size < 1 or (check_every is not None and check_every < 1):
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and check_every >= 1, got "
                         f"{epochs}, {batch_size}, {check_every}")
    check_objective(loss, beta, warmup_epochs)
    device = torch.device(device) if device is not None else _module_device(vae)
    world = World.current(device)
    vae.to(device)
    train = train.to(device)
    valid = valid.to(device) if valid is not None else None
    check_data(vae, train, valid, batch_size=batch_size)
    n = len(train)
    steps = math.ceil(n / batch_size)
    if world.size > 1:
        _check_distributed(loss, n, batch_size, world)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 50
    pos = _Position(num_data=n, batch_size=batch_size)
    if resume is not None:
        pos = _Position.restore(resume["position"], n, batch_size)
        pos.order = pos.order.to(device) if pos.order is not None else None

    pyro.clear_param_store()
    pyro.set_rng_seed(seed + world.rank)  # the model's noise: independent per process
    generator = torch.Generator(device=device).manual_seed(seed)  # the data: shared
    objective = make_elbo(loss, num_particles)
    probe = next(train.batches(2, False))  # two points to trace the model and guide on
    guide_only = _guide_only(vae, probe) if freeze_model else None
    with guide_only or contextlib.nullcontext(vae.model) as model:
        params = trained_parameters(vae, model, vae.guide, probe)
        step_fn = _Step(vae, model, vae.guide, objective, params,
                        make_optimizer(optimizer, params.values(), lr, clip_norm), world)
        if world.main:
            with torch.no_grad(), pyro.validation_enabled(False):  # a diagnostic only
                warn_if_monte_carlo_kl(loss, vae.model, vae.guide, probe)
        # The IWAE bound runs unscaled (see pyro_vae.objectives); the rest see N / B.
        num_data = n if scales_with_data_size(loss) else None
        valid_loss = plain_elbo_loss(loss)
        progress = progress and world.main

        history = []
        if resume is not None:  # after all set-up that draws random numbers
            history = [dict(r) for r in resume["history"]]
            _load_optimizer_state(step_fn, resume["optimizer"], lr, clip_norm)
            set_rng_state(resume["rng"], generator, world)

        def save():
            rng = get_rng_state(generator, world)  # every process takes part
            if checkpoint is not None and world.main:
                checkpoint({"position": pos.state(), "history": history,
                            "optimizer": {"parameters": list(params),
                                          "state": step_fn.optimizer.state_dict()},
                            "rng": rng})

        # Steps since the last check: (step, points, loss, finite, quantity or None).
        pending = []

        def settle(bar=None):
            """Read the pending steps' losses and finite flags (one wait for the device),
            add them to the epoch's totals, and deal with non-finite steps."""
            if not pending:
                return
            losses = world.sum(torch.stack([p[2].double() for p in pending])) / world.size
            flags = torch.stack([p[3] for p in pending]).tolist()
            taken, last = list(pending), pending[-1][0]
            pending.clear()
            failed = None  # the first non-finite step beyond those allowed
            for (step, size, _, _, bad), batch_loss, ok in zip(taken, losses.tolist(), flags):
                if ok:
                    # -ELBO of the batch: the step's loss estimates it for the whole set
                    # if scaled.
                    pos.total += batch_loss * size / n if num_data else batch_loss
                    pos.seen += size
                    continue
                where = f"epoch {pos.epoch}, step {step + 1}"
                bad = bad or ("loss or a gradient (steps are checked every "
                              f"{check_every}; found at step {last + 1})")
                if failed is None and pos.skipped < skip_nonfinite:
                    pos.skipped += 1
                    logger.warning("non-finite %s at %s: step skipped, no parameter "
                                   "changed (%d of %d allowed)", bad, where, pos.skipped,
                                   skip_nonfinite)
                elif failed is None:
                    failed = (step, bad, batch_loss, where)
            if failed is not None:
                step, bad, batch_loss, where = failed
                if bar is not None:
                    bar.close()
                pos.seconds += time.perf_counter() - clock
                if step == last:  # nothing ran after it: resuming retries this batch
                    pos.step = step
                save()
                raise TrainingDiverged(
                    f"non-finite {bad} (loss {batch_loss}) at {where}; this step changed "
                    f"no parameter; lower --lr, use --optimizer clipped_adam, or allow "
                    f"a few with --skip-nonfinite")
            if bar is not None and progress:
                bar.set_postfix(elbo=f"{-pos.total / max(pos.seen, 1):.2f}", refresh=False)

        if resume is None:
            save()
        vae.train()
        while pos.epoch <= epochs:
            epoch = pos.epoch
            beta_e = beta_at(epoch, beta, warmup_epochs)
            if pos.order is None:
                pos.order = torch.randperm(n, device=device, generator=generator)
            clock = time.perf_counter()
            bar = tqdm(train.batches(batch_size, order=pos.order, start=pos.step,
                                     generator=generator),
                       total=steps, initial=pos.step, desc=f"epoch {epoch}/{epochs}",
                       disable=not progress, leave=False, dynamic_ncols=True)
            for xb in bar:
                step = pos.step  # steps of this epoch done before this one
                x = world.shard(xb)
                # The loss averaged over processes must be the global batch's (N / B).
                weight = world.size * len(x) / len(xb)
                done = (epoch - 1) * steps + step + 1
                due = checkpoint_every and done % checkpoint_every == 0 and step + 1 < steps
                check = due or (step + 1) % check_every == 0 or step + 1 == steps
                try:
                    # Distribution checks run on the very first step, where a model or guide
                    # bug shows, and are then switched off: they cost ~15% of a step.
                    with pyro.validation_enabled(validate and epoch == 1 and step == 0):
                        pending.append((step, len(xb)) + step_fn(
                            x, weight, check, num_data=num_data, beta=beta_e))
                except ValueError:
                    # With validation on, NaN weights fail a distribution's argument check.
                    bad = next((f"parameter {name}" for name, p in vae.named_parameters()
                                if not torch.isfinite(p).all()), None)
                    if bad is None:
                        raise
                    step_fn.optimizer.zero_grad(set_to_none=True)
                    pending.append((step, len(xb), torch.tensor(math.nan, device=device),
                                    torch.tensor(False, device=device), bad))
                pos.step += 1
                if check or pending[-1][4] is not None:
                    settle(bar)
                if due:
                    pos.seconds += time.perf_counter() - clock
                    save()
                    clock = time.perf_counter()
            bar.close()
            settle()
            record = {"epoch": epoch, "beta": beta_e,
                      "train_elbo": -pos.total / max(pos.seen, 1), "valid_elbo": None,
                      "seconds": pos.seconds + time.perf_counter() - clock}
            if world.main:
                if valid is not None:
                    record["valid_elbo"] = evaluate_elbo(vae, valid, valid_loss,
                                                         num_particles)
                if progress:
                    tqdm.write(_format(record))
                for callback in callbacks:
                    callback(record, vae)
            history.append(record)
            pos = _Position(num_data=n, batch_size=batch_size, epoch=epoch + 1,
                            skipped=pos.skipped)
            save()
            if early_stopping and valid is not None:
                # Process 0 alone validated: its decision is everyone's.
                stale = world.main and stopped_early(history, early_stopping)
                stop = world.sum(torch.tensor([float(stale)], device=device)).item() > 0
                if stop:
                    if progress:
                        tqdm.write(f"early stopping: no better validation ELBO in "
                                   f"{early_stopping} epochs; best epoch "
                                   f"{best_epoch(history)}")
                    break
        return history


def stopped_early(history: Sequence[Dict], patience: int) -> bool:
    """Whether ``patience`` epochs have passed since the best ``valid_elbo``."""
    return bool(patience) and len(history) - best_epoch(history) >= patience


def best_epoch(history: Sequence[Dict]) -> int:
    """The epoch (1-based) of the best ``valid_elbo`` in ``history`` (the first, on a
    tie); 0 when no epoch was validated."""
    scored = [(r["valid_elbo"], -r["epoch"]) for r in history if r.get("valid_elbo") is not None]
    return -max(scored)[1] if scored else 0


def _check_distributed(loss: str, n: int, batch_size: int, world: World) -> None:
    if loss == "iwae":
        raise ValueError("loss 'iwae' cannot train on several processes (Pyro computes "
                         "its gradients outside a module's forward); use one process")
    smallest = min(batch_size, n - (math.ceil(n / batch_size) - 1) * batch_size)
    if smallest < world.size:
        raise ValueError(f"--batch-size {batch_size}: a batch of {smallest} points cannot "
                         f"be shared by {world.size} processes (the last batch of {n} "
                         f"points); choose a batch size that leaves at least {world.size}")


@dataclasses.dataclass
class _Position:
    """Where a run stands: ``step`` steps of epoch ``epoch`` done, visiting the data in
    ``order``; the epoch's running totals; non-finite steps skipped so far."""

    num_data: int
    batch_size: int
    epoch: int = 1
    step: int = 0
    order: Optional[torch.Tensor] = None
    total: float = 0.0
    seen: int = 0
    seconds: float = 0.0
    skipped: int = 0

    def state(self) -> Dict:
        state = dataclasses.asdict(self)
        if self.order is not None:
            state["order"] = self.order.cpu()
        return state

    @classmethod
    def restore(cls, state: Dict, num_data: int, batch_size: int) -> "_Position":
        if (state["num_data"], state["batch_size"]) != (num_data, batch_size):
            raise ValueError(f"resume: the state was saved training on {state['num_data']} "
                             f"points in batches of {state['batch_size']}, not {num_data} "
                             f"in batches of {batch_size}")
        return cls(**state)


def _load_optimizer_state(step: _Step, saved: Dict, lr: float, clip_norm: float) -> None:
    """Load a saved optimizer state, with the learning rate (and clipping bound) of this
    call: a resumed run may lower them."""
    if saved["parameters"] != list(step.params):
        raise ValueError("resume: the saved optimizer state is for other parameters "
                         f"({len(saved['parameters'])} saved, {len(step.params)} now)")
    state = copy.deepcopy(saved["state"])
    for group in state["param_groups"]:
        group["lr"] = lr
        if "clip_norm" in group:
            group["clip_norm"] = clip_norm
    step.optimizer.load_state_dict(state)


def get_rng_state(generator: torch.Generator, world: Optional[World] = None) -> Dict:
    """Every random number generator training draws from, as tensors and plain values:
    torch's (CPU, and CUDA where initialized), Python's, NumPy's, and ``generator`` (the
    data order and dynamic binarization). With several processes, each one's torch
    streams are gathered too (``"ranks"``); all must call this."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "generator": generator.get_state(), "generator_device": generator.device.type}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if world is not None and world.size > 1:
        streams = {"torch": world.gather(torch.get_rng_state())}
        if world.device.type == "cuda":
            streams["cuda"] = world.gather(torch.cuda.get_rng_state(world.device))
        state["ranks"] = [{k: v[r] for k, v in streams.items()} for r in range(world.size)]
    return state


def set_rng_state(state: Dict, generator: torch.Generator,
                  world: Optional[World] = None) -> None:
    """Restore what ``get_rng_state`` saved. Across devices (a CPU run resumed on a GPU or
    back), or with another number of processes, the device streams (or the processes'
    own) cannot carry over: they restart, and a warning says so."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    if state["generator_device"] == generator.device.type:
        generator.set_state(state["generator"])
    else:
        logger.warning("resumed on %s, saved on %s: the data-order stream restarts from "
                       "the seed, so this run is not bitwise the uninterrupted one",
                       generator.device.type, state["generator_device"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("saved with %d CUDA devices, resumed with %d: CUDA random "
                           "streams restart", len(cuda), torch.cuda.device_count())
    world = world or World()
    ranks = state.get("ranks", [None])
    if len(ranks) != world.size:
        if world.main:
            logger.warning("saved by %d processes, resumed by %d: the processes' noise "
                           "streams restart", len(ranks), world.size)
        if world.rank > 0:  # a stream of its own, drawn from the restored one
            torch.manual_seed(int(torch.randint(2 ** 62, (1,))) + world.rank)
    elif world.size > 1:
        torch.set_rng_state(ranks[world.rank]["torch"])
        if "cuda" in ranks[world.rank] and world.device.type == "cuda":
            torch.cuda.set_rng_state(ranks[world.rank]["cuda"], world.device)


def check_data(vae, *splits, batch_size: Optional[int] = None) -> None:
    """One-line errors for data the model cannot take (empty, not floating-point, the
    wrong number of features, outside the likelihood's support), and for a batch size
    larger than the first split, before anything is trained or written."""
    for data in splits:
        if data is not None:
            _check_split(vae, data)
    train = splits[0]
    if batch_size is not None and batch_size > len(train):
        raise ValueError(f"--batch-size {batch_size} is larger than the {train.split} split "
                         f"of {train.name!r} ({len(train)} points)")


def _check_split(vae, data) -> None:
    what = f"the {data.split} split of {data.name!r}"
    if len(data) == 0:
        raise ValueError(f"{what} is empty")
    if not data.x.is_floating_point():
        raise ValueError(f"{what} has dtype {data.x.dtype}; the model needs floating-point "
                         f"data (convert it with x.float())")
    x_dim = getattr(vae, "x_dim", None)
    if data.x.dim() != 2 or (x_dim is not None and data.x.shape[1] != x_dim):
        raise ValueError(f"{what} has points of shape {tuple(data.x.shape[1:])}; the model "
                         f"takes x_dim = {x_dim} features per point")
    # Dynamically binarized data reach the model as {0, 1} draws, valid everywhere.
    if not data.dynamic_binarize:
        vae.likelihood.check(data.x, what)


@contextlib.contextmanager
def _guide_only(vae, x: torch.Tensor):
    """Yield the model with its parameters hidden from SVI, and without gradients (no
    work spent on them) until the block exits; refuse a prior built on the guide's own
    parameters, as it would change with the guide."""
    with poutine.trace(param_only=True) as capture:
        vae.guide(x)
    guide_params = {id(site["value"].unconstrained()) for site in capture.trace.nodes.values()}
    frozen = [p for p in vae.parameters() if p.requires_grad and id(p) not in guide_params]
    log_p = vae.p_z().log_prob(torch.zeros(vae.z_dim, device=x.device))
    ours = [p for p in vae.parameters() if id(p) in guide_params]
    if log_p.requires_grad and any(g is not None for g in torch.autograd.grad(
            log_p.sum(), ours, allow_unused=True)):
        raise ValueError("freeze_model: the prior is built on the guide's encoder and would "
                         "train with it; give the model its own (VAE.swap_guide)")
    for p in frozen:
        p.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            # pyro.module notes each frozen parameter it skips: here that is the point.
            warnings.filterwarnings("ignore", message=".*not registered in the param store "
                                                      "because requires_grad=False")
            yield poutine.block(vae.model, hide_types=["param"])
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _format(record: Dict) -> str:
    text = f"epoch {record['epoch']:>3}  train ELBO {record['train_elbo']:9.3f}"
    if record.get("valid_elbo") is not None:
        text += f"  valid ELBO {record['valid_elbo']:9.3f}"
    return text + f"  ({record['seconds']:.1f}s)"


def _module_device(module: torch.nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


CHECKPOINT_FORMAT = "pyro_vae.checkpoint/1"


def atomic_write(path, write: Callable, binary: bool = True) -> None:
    """Write ``path`` so that a crash leaves either the old file or the new one, never a
    mix: ``write(f)`` fills a temporary file in the same folder, which is flushed, fsynced
    and renamed over ``path`` (``os.replace`` is atomic). On failure the temporary file is
    removed; one left by a killed process is never read (readers open ``path`` only)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, vae, **extra) -> None:
    """Write ``vae``'s state dict (plus plain ``extra`` values) to ``path`` atomically
    (``atomic_write``): a crash never leaves a half-written checkpoint in place of the
    last good one."""
    state = {"format": CHECKPOINT_FORMAT, "model": vae.state_dict(), **extra}
    atomic_write(path, lambda f: torch.save(state, f))


def read_checkpoint(path, map_location="cpu") -> Dict:
    """The contents of a checkpoint written by ``save_checkpoint``.

    Uses ``torch.load(weights_only=True)``: tensors and plain containers only, never
    arbitrary pickled objects, so a crafted file cannot run code. (Pyro's own
    ``ParamStoreDict.load`` and ``PyroOptim.load`` unpickle; they are not used here.)
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except Exception as e:  # corrupt, truncated or not a weights-only file
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: not a readable pyro_vae checkpoint "
                         f"({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a pyro_vae checkpoint (no {CHECKPOINT_FORMAT!r} tag)")
    return state


def load_checkpoint(path, vae, map_location="cpu", state: Optional[Dict] = None) -> Dict:
    """Load a checkpoint into ``vae`` (``state``: its contents, if already read);
    returns the extras saved beside the weights."""
    state = read_checkpoint(path, map_location) if state is None else state
    try:
        vae.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        reason = str(e).splitlines()[0]
        raise ValueError(f"{path}: does not fit this model: {reason}") from None
    return {k: v for k, v in state.items() if k not in ("format", "model")}


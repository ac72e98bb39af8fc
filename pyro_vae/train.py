"""Training: ``fit(model, data)`` for any Pyro model/guide pair (``pyro_vae.contract``).

Three pieces, each readable on its own:

- ``Step`` (``pyro_vae.step``): one step, ``SVI.step`` with one PyTorch optimizer for all parameters and a
  finite check that never waits for the device unless asked.
- ``Trainer``: epochs of steps, validation, checkpoints, resume; its phases are methods.
- Hooks (``pyro_vae.hooks``): ``on_epoch_end(record, history, model)`` (return True to
  stop) and ``on_checkpoint(state)``. Early stopping, keep-best, the metrics file and the
  checkpoint file are hooks; a plain function is an ``on_epoch_end`` hook.
"""

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

import pyro
from pyro import poutine
from pyro.infer import ELBO

from .compiled import (TraceError, TracedLoss, check_precision, compare_speed, compile_mode,
                       compiled, eagerly, rng_untouched, warm_up)
from .checkpoints import (Position, TrainState, fingerprint, get_rng_state,
                          load_optimizer_state, set_rng_state)
from .contract import (check_data, check_model, check_model_guide, check_num_data,
                       guide_parameters, hidden_from_pyro)
from .datasets import Draw, as_dataset
from .distributed import World
from .errors import ArgumentError
from .evaluation import elbo as evaluate_elbo
from .arguments import MAX_SEED, check_device, check_hooks, check_option_kinds
from .fused import TracedStep, functional_update
from .hooks import EarlyStopping
from .memory import check_step_memory
from .objectives import (AUTO, Loss, beta_at, check_objective, choose_elbo, describe_elbo,
                         is_latent, make_elbo, plain_elbo, scales_with_data_size,
                         warn_if_monte_carlo_kl)
from .progress import bar
from .step import OPTIMIZERS, Step, make_optimizer, trained_parameters

logger = logging.getLogger("pyro_vae")


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """SIGINT (Ctrl-C) or SIGTERM arrived: training stopped at the next step boundary,
    after a checkpoint of the state there (resume from it)."""


@dataclasses.dataclass
class Options:
    """What ``fit`` takes besides the model and the data (all keyword arguments).

    Attributes:
        epochs: passes over the training data.
        loss: ``"auto"`` (chosen from the model and guide: ``TraceEnum_ELBO`` for sites
            marked for enumeration, ``Trace_ELBO`` for a guide that is not mean-field,
            else ``TraceMeanField_ELBO``; a model's ``default_loss`` first, see
            ``pyro_vae.objectives.choose_elbo``), ``"trace"``, ``"meanfield"``, ``"iwae"``,
            ``"enum"``, or any ``pyro.infer.ELBO`` object. The choice is logged and recorded
            in each history record (``"loss"``) and in the training state.
        allow_loss_change: on resume, accept an objective other than the one the training
            state was saved with (refused otherwise: the optimizer's state belongs to it).
        num_particles: vectorized samples per data point for a named loss (K of the IWAE
            bound); an ELBO object carries its own.
        beta, warmup_epochs: the KL weight (beta-VAE, Higgins et al. 2017) on every latent
            site of model and guide; with W warm-up epochs it rises linearly from 0 at epoch 1
            to ``beta`` at epoch W + 1. beta_sites: the latent sites it weights (default all).
        batch_size, lr: minibatch size, learning rate.
        optimizer, clip_norm: ``"adam"`` (PyTorch's fused Adam) or ``"clipped_adam"`` (Pyro's,
            each gradient clipped elementwise to +-clip_norm).
        seed: initial random state; process r of several draws its noise from seed + r.
        device: move the model and data there (default: the model's device).
        validate: check distribution arguments and supports on the first step.
        freeze_model: train the guide alone (the modules ``model.guide_modules`` names).
        skip_nonfinite: skip (and log) up to this many non-finite steps before stopping.
        checkpoint_every: also checkpoint every N steps (0: after each epoch only).
        check_every: read the finite checks every N steps (default 1 on the CPU, 50 on GPU).
        early_stopping: stop after P epochs without a better ``monitor`` value (0: off).
        monitor: the record field early stopping watches: ``"valid_elbo"`` (maximized) or a
            validation metric of the model's, e.g. ``"valid_error"`` (minimized; see
            ``pyro_vae.hooks.higher_is_better``).
        compile: record the whole step (Pyro's ELBO and its backward pass; on the CPU the
            optimizer's update and the batch draw too) once for the full batch size and
            compile it, or where it cannot be recorded the model's networks and the
            package's densities alone (``pyro_vae.compiled``, ``pyro_vae.fused``);
            compiling takes seconds, once per call of ``fit`` (from torch's compile cache
            after the first time), the first epoch's record gives them as
            ``compile_seconds``, and a line after it says from which epoch they have paid.
        precision: ``"float32"``, or ``"bf16"``: the networks' matrix products in bfloat16
            (log-densities and the ELBO stay float32); refused where bfloat16 is not fast.
    """

    epochs: int = 10
    loss: Loss = AUTO
    num_particles: int = 1
    beta: float = 1.0
    warmup_epochs: int = 0
    beta_sites: Optional[Tuple[str, ...]] = None
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    clip_norm: float = 10.0
    seed: int = 0
    device: Optional[Union[str, torch.device]] = None
    validate: bool = True
    freeze_model: bool = False
    skip_nonfinite: int = 0
    checkpoint_every: int = 0
    check_every: Optional[int] = None
    early_stopping: int = 0
    monitor: str = "valid_elbo"
    compile: bool = False
    precision: str = "float32"
    allow_loss_change: bool = False

    def check(self) -> None:
        """One-line errors naming the argument, before anything is trained."""
        check_option_kinds(self)
        if self.device is not None:
            check_device(self.device)
        counts = ("epochs", "skip_nonfinite", "checkpoint_every", "early_stopping",
                  "warmup_epochs")
        for name in counts:
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ArgumentError(name, f"must be an integer >= 0, got {value!r}")
        for name in ("batch_size", "num_particles") + (
                ("check_every",) if self.check_every is not None else ()):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ArgumentError(name, f"must be an integer >= 1, got {value!r}")
        if not 0 <= self.lr < math.inf:
            raise ArgumentError("lr", f"must be finite and >= 0, got {self.lr}")
        if not 0 < self.clip_norm < math.inf:
            raise ArgumentError("clip_norm", f"must be finite and > 0, got {self.clip_norm}")
        if not 0 <= self.beta < math.inf:
            raise ArgumentError("beta", f"must be finite and >= 0, got {self.beta}")
        if not 0 <= self.seed < MAX_SEED:
            raise ArgumentError("seed", f"must lie in 0 ... 2**32 - 1, got {self.seed}")
        if not isinstance(self.compile, bool):
            raise ArgumentError("compile", f"must be True or False, got {self.compile!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{list(OPTIMIZERS)}")
        if not (isinstance(self.loss, str) and self.loss == AUTO):  # else: once traced
            check_objective(make_elbo(self.loss, self.num_particles), self.beta,
                            self.warmup_epochs)


class Trainer:
    """Trains ``model`` on ``train`` as ``options`` (an ``Options``) say: ``fit`` is
    ``Trainer(model, train, valid, Options(**options), hooks, progress).fit(resume)``.

    Building it checks the options, the objective and the precision, and moves the model
    to the device (a one-line ``ValueError`` for what cannot work); ``fit()`` trains and
    returns the history. Its phases (the step, warm-up, epochs, validation, checkpoints)
    are methods of their own."""

    def __init__(self, model, train, valid=None, options: Optional[Options] = None,
                 hooks: Sequence = (), progress: bool = True):
        self.options = o = options or Options()
        o.check()
        check_model(model)
        self.device = torch.device(o.device) if o.device is not None else _module_device(model)
        self.world = World.current(self.device)
        check_precision(o.precision, self.device)
        self.model = model.to(self.device)
        self.train = as_dataset(train, split="train").to(self.device)
        self.valid = None if valid is None else as_dataset(valid, split="valid").to(self.device)
        check_data(model, self.train, self.valid, batch_size=o.batch_size)
        self.objective = self._choose_objective()
        self.steps = math.ceil(len(self.train) / o.batch_size)
        if self.world.size > 1:
            _check_distributed(self.objective, len(self.train), o.batch_size, self.world)
        self.check_every = o.check_every or (1 if self.device.type == "cpu" else 50)
        self.hooks = check_hooks(hooks)
        if o.monitor != "valid_elbo" and not (valid is not None and hasattr(model, "metrics")):
            raise ArgumentError("monitor", f"{o.monitor!r} is a validation metric of the "
                                f"model's: give validation data and a model with metrics()")
        if o.early_stopping:
            self.hooks.append(EarlyStopping(o.early_stopping, o.monitor))
        self.progress = progress and self.world.main
        self.pending = []  # steps since the last check: (step, points, loss, ok, bad)

    def _choose_objective(self) -> ELBO:
        """Check the model/guide pair on two points (``self.probe``) and return the ELBO
        ``Options.loss`` names or, for ``"auto"``, the one their traces call for; checked
        against beta and warm-up and the step's memory, and logged with the reason."""
        o = self.options
        # The pair's structure; distribution checks are the first step's (which names a
        # non-finite parameter, after a checkpoint of the state before it).
        check_model_guide(self.model, self.train, validate=False)
        with rng_untouched(self.device):  # gray data are binarized with random draws
            self.probe = next(self.train.batches(2, False))  # two points to trace
        objective, why = choose_elbo(o.loss, o.num_particles, self.model, self.probe)
        check_objective(objective, o.beta, o.warmup_epochs)
        check_step_memory(self.train, o.batch_size, objective.num_particles, self.device)
        if self.world.main:
            logger.info("loss: %s; %s", _describe(objective), why)
        return objective

    def fit(self, resume=None) -> List[Dict]:
        """Train, from the start or from ``resume`` (a ``TrainState`` or its dict), and
        return the history."""
        o = self.options
        pyro.clear_param_store()
        pyro.set_rng_seed(o.seed + self.world.rank)  # the model's noise: per process
        self.generator = torch.Generator(device=self.device).manual_seed(o.seed)  # data
        self.pos, self.history = Position(len(self.train), o.batch_size), []
        if resume is not None:
            resume = TrainState.from_dict(resume)
            self._check_resume(resume)
        with self._frozen_model() as model_fn, self._interruptible():
            self._build_step(model_fn)
            with self._compiled():
                self._warm_up()
                if resume is not None:  # after all set-up that draws random numbers
                    self._restore(resume)
                else:
                    self._checkpoint()
                self.model.train()
                while self.pos.epoch <= o.epochs:
                    self._run_epoch()
                    if self._end_epoch():
                        break
        return self.history

    # Set-up --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _interruptible(self):
        """SIGINT and SIGTERM only note that a stop was asked for inside the block; the
        step under way ends, a checkpoint is taken and ``TrainingInterrupted`` raised
        (``_take_step``); a signal after the first is ignored, with one line. A signal
        the process already ignores (``SIG_IGN``: SIGINT in a shell script's background
        job) stays ignored. One process in the main thread only: several processes would
        have to agree on the step, and there a killed run resumes from its checkpoint."""
        self.signals = []
        if self.world.size > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return
        caught = [s for s in (signal.SIGINT, signal.SIGTERM)
                  if signal.getsignal(s) is not signal.SIG_IGN]
        before = {s: signal.signal(s, self._on_signal) for s in caught}
        try:
            yield
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.signals:
            logger.warning("%s ignored: already stopping at the end of this step",
                           signal.Signals(signum).name)
        self.signals.append(signum)

    @contextlib.contextmanager
    def _frozen_model(self):
        """Yield the model function; with ``freeze_model``, with everything but the guide
        hidden from Pyro and without gradients until the block exits."""
        if not self.options.freeze_model:
            yield self.model.model
            return
        guide = set(map(id, guide_parameters(self.model).values()))
        with rng_untouched(self.device):
            _refuse_prior_on_guide(self.model, self.probe, guide)
        frozen = [p for p in self.model.parameters() if p.requires_grad and id(p) not in guide]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with warnings.catch_warnings():
                # pyro.module notes each frozen parameter it skips: here that is the point.
                warnings.filterwarnings("ignore", message=".*not registered in the param "
                                                          "store because requires_grad=False")
                yield poutine.block(self.model.model, hide_types=["param"])
        finally:
            for p in frozen:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def _compiled(self):
        """The networks compiled and/or in bfloat16 inside the block, as asked;
        ``_record_step`` may run them eagerly for the rest of it (``eager_parts``)."""
        o = self.options
        self.compiled_networks, self.compile_seconds = [], None
        self.eager_step_seconds = None
        with compiled(self.model, self.probe, o.compile, o.precision, self.device) as names, \
                contextlib.ExitStack() as self.eager_parts:
            self.compiled_networks = names
            yield

    def _warm_up(self) -> None:
        """Compile the step before any epoch's clock runs: the whole step recorded as
        one graph for the full batch size where it can be (``TracedStep``, the update
        included, on the CPU; ``TracedLoss`` elsewhere), the networks alone for every
        batch size where not. Without changing the weights or the optimizer's state,
        and without drawing from the random streams (the run is the one it would be
        without compiling). Then time the compiled step against the eager one, and say
        so when it is not faster."""
        o = self.options
        if not (o.compile and self.compiled_networks):
            return
        last = len(self.train) - (self.steps - 1) * o.batch_size
        sizes = sorted({min(o.batch_size, len(self.train)), last}, reverse=True)
        with rng_untouched(self.device):  # a batch as training draws them
            first = next(self.train.draws(o.batch_size, order=torch.arange(
                len(self.train), device=self.device)))
        batches = [first if size == first.size and self.world.size == 1 else
                   tuple(self.world.shard(t[:size]) for t in first) for size in sizes]
        beta = beta_at(1, o.beta, o.warmup_epochs)

        def step(batch):
            with pyro.validation_enabled(False):
                self.step.dry_run(batch, self.num_data, beta)

        def eager_step():
            traced, self.step.traced = self.step.traced, None
            try:
                with torch.compiler.set_stance("force_eager"):
                    step(batches[0])
            finally:
                self.step.traced = traced
        what = self._record_step(batches[0], beta)
        if self.step.traced is None:
            self.compile_seconds = warm_up(lambda: [step(b) for b in batches], self.device)
        compiled_s, self.eager_step_seconds = compare_speed(lambda: step(batches[0]),
                                                            eager_step, self.device)
        if self.world.main:
            logger.info("compiled %s in %.1f s", what, self.compile_seconds)
            if compiled_s > self.eager_step_seconds:
                logger.warning("compiling does not pay here: a compiled step took %.1f ms, "
                               "an eager one %.1f ms (median of 5)", 1e3 * compiled_s,
                               1e3 * self.eager_step_seconds)

    def _log_break_even(self, record: Dict) -> None:
        """After the first compiled epoch: the epoch from which compiling has paid for
        itself, at this epoch's speed against eager steps' (timed in ``_warm_up``,
        without their update: an estimate that errs towards later)."""
        eager = self.steps * self.eager_step_seconds
        saved = eager - record["seconds"]
        if saved <= 0:
            logger.info("compiling took %.1f s and saves nothing per epoch here (this epoch "
                        "%.3g s, eager steps about %.3g s)", record["compile_seconds"],
                        record["seconds"], eager)
            return
        logger.info("compiling took %.1f s and saves about %.3g s per epoch (this epoch "
                    "%.3g s, eager steps about %.3g s): it has paid for itself after "
                    "epoch %d", record["compile_seconds"], saved, record["seconds"], eager,
                    math.ceil(record["compile_seconds"] / saved))

    def _record_step(self, batch, beta: float) -> str:
        """Record and compile the whole step for ``batch``'s size and ``beta`` (it is then
        ``self.step.traced``, and the compiled networks run eagerly for the rest of the
        block: in the last, smaller batch of an epoch and in validation), or else say in
        one line why the networks are compiled alone; what is compiled."""
        why = ("several processes train" if self.world.size > 1 else
               "the loss has no differentiable_loss" if not self.step.differentiable
               else None)
        if why is None:
            size = batch.size if isinstance(batch, Draw) else len(batch[0])
            update = functional_update(self.step.optimizer, list(self.params.values())) \
                if self.device.type == "cpu" else None
            traced = TracedStep(self.step.loss, list(self.params), self.device, update,
                                batch_size=size) if update is not None else \
                TracedLoss(self.step.loss, list(self.params), self.device,
                           compile_mode(self.device), batch_size=size)
            run = (lambda: traced.step(batch, 1.0, self.num_data, beta, dry=True)) \
                if update is not None else (lambda: traced(batch, 1.0, self.num_data, beta))
            try:
                with pyro.validation_enabled(False):
                    self.compile_seconds = warm_up(run, self.device)
                self.step.traced = traced
                self.eager_parts.enter_context(eagerly())
                return "the whole step" + (", update included" if update else "")
            except TraceError as e:
                why = str(e)
        if self.world.main:
            logger.warning("the step cannot be compiled whole (%s): its networks are "
                           "compiled alone", why)
        return ", ".join(self.compiled_networks)

    def _build_step(self, model_fn) -> None:
        """Find the trained parameters and check the model on the probe batch (none of
        it draws from the run's random streams), then build the step."""
        o, probe = self.options, self.probe
        # A Renyi bound runs unscaled (see pyro_vae.objectives); the rest see N / B.
        self.num_data = len(self.train) if scales_with_data_size(self.objective) else None
        with rng_untouched(self.device):
            self.params = trained_parameters(self.model, self.objective, probe,
                                             o.freeze_model, model_fn)
            _check_beta_sites(self.model, probe, o.beta_sites)
            if self.num_data is not None and o.batch_size < self.num_data:
                check_num_data(self.model, self.objective, probe, self.num_data, model_fn)
            if self.world.main:
                with torch.no_grad(), pyro.validation_enabled(False):  # diagnostics only
                    warn_if_monte_carlo_kl(self.objective, model_fn, self.model.guide,
                                           *probe)
                    hidden_from_pyro(self.model, self.params, probe, model_fn)
        optimizer = make_optimizer(o.optimizer, self.params.values(), o.lr, o.clip_norm)
        self.step = Step(self.model, self.objective, self.params, optimizer, self.world,
                         model_fn, o.beta_sites)

    def _shapes(self) -> Dict[str, List[int]]:
        """The trained parameters' shapes by name, as ``TrainState.parameters`` holds them."""
        return {k: list(p.shape) for k, p in self.params.items()}

    def _check_resume(self, state: TrainState) -> None:
        """Refuse to resume ``state`` with weights other than those saved with it, or
        with another objective unless ``allow_loss_change``."""
        if state.fingerprint is not None and fingerprint(self.model) != state.fingerprint:
            raise ValueError(
                "resume: the model's weights are not those saved with this training state; "
                "load them first (model.load_state_dict(pv.read_checkpoint(path)['model']))")
        now, saved = describe_elbo(self.objective), state.objective
        if saved is not None and saved != now and not self.options.allow_loss_change:
            changed = ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}"
                                for k in sorted(set(saved) | set(now))
                                if saved.get(k) != now.get(k))
            raise ValueError(
                f"resume: the state was trained with another objective ({changed}); pass "
                f"the same loss, or allow_loss_change=True if the change is meant")

    def _restore(self, state: TrainState) -> None:
        state.check_data(len(self.train), self.options.batch_size)
        self.pos = dataclasses.replace(state.position)
        if self.pos.order is not None:
            self.pos.order = self.pos.order.to(self.device)
        self.history = [dict(r) for r in state.history]
        shapes = self._shapes()
        if state.parameters is not None and state.parameters != shapes:
            bad = next((k for k in {**state.parameters, **shapes}
                        if state.parameters.get(k) != shapes.get(k)))
            raise ValueError(f"resume: parameter {bad} was trained with shape "
                             f"{state.parameters.get(bad)}, it is {shapes.get(bad)} now")
        load_optimizer_state(self.step.optimizer, list(self.params), state.optimizer,
                             self.options.lr, self.options.clip_norm)
        set_rng_state(state.rng, self.generator, self.world)

    # Epochs and steps ------------------------------------------------------------------

    def _run_epoch(self) -> None:
        o, pos = self.options, self.pos
        self.beta = beta_at(pos.epoch, o.beta, o.warmup_epochs)
        if pos.order is None:
            pos.order = torch.randperm(len(self.train), device=self.device,
                                       generator=self.generator)
        self.clock = time.perf_counter()
        self.bar = bar(self.train.draws(o.batch_size, order=pos.order, start=pos.step,
                                        generator=self.generator), self.progress,
                       total=self.steps, initial=pos.step, desc=f"epoch {pos.epoch}/{o.epochs}")
        for batch in self.bar:
            self._take_step(batch)
        self.bar.close()
        self._settle()

    def _take_step(self, batch: Draw) -> None:
        o, pos, world = self.options, self.pos, self.world
        step = pos.step  # steps of this epoch done before this one
        shard, weight = batch, 1.0  # the Draw itself: a compiled step gathers it itself
        if world.size > 1:
            shard = tuple(world.shard(t) for t in batch)
            # The loss averaged over processes must be the global batch's (N / B).
            weight = world.size * len(shard[0]) / batch.size
        done = (pos.epoch - 1) * self.steps + step + 1
        due = o.checkpoint_every and done % o.checkpoint_every == 0 and step + 1 < self.steps
        check = due or (step + 1) % self.check_every == 0 or step + 1 == self.steps
        try:
            # Distribution checks run on the very first step, where a model or guide bug
            # shows, and are then switched off: they cost ~15% of a step.
            with pyro.validation_enabled(o.validate and pos.epoch == 1 and step == 0):
                self.pending.append((step, batch.size) + self.step(
                    shard, weight, check, num_data=self.num_data, beta=self.beta))
        except ValueError:
            # With validation on, NaN weights fail a distribution's argument check.
            bad = next((f"parameter {name}" for name, p in self.model.named_parameters()
                        if not torch.isfinite(p).all()), None)
            if bad is None:
                raise
            self.step.optimizer.zero_grad(set_to_none=True)
            self.pending.append((step, batch.size, torch.tensor(math.nan),
                                 torch.tensor(False), bad))
        pos.step += 1
        if check or self.pending[-1][4] is not None or self.signals:
            self._settle()
        if due or self.signals:
            self._checkpoint(running=True)
        if self.signals:
            self.bar.close()
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(self.signals[0]).name} after epoch {pos.epoch}, "
                f"step {pos.step}; the checkpoint holds the state there")

    def _settle(self) -> None:
        """Read the pending steps' losses and finite flags (one wait for the device),
        add them to the epoch's totals, and deal with non-finite steps."""
        if not self.pending:
            return
        taken, self.pending = self.pending, []
        if len(taken) == 1 and self.world.size == 1:  # the CPU's every step: no stacking
            losses, flags = [float(taken[0][2])], [bool(taken[0][3])]
        else:
            losses = self.world.sum(torch.stack([p[2].to(self.device).double()
                                                 for p in taken]))
            losses = (losses / self.world.size).tolist()
            flags = torch.stack([p[3].to(self.device) for p in taken]).tolist()
        failed = None
        for (step, size, _, _, bad), batch_loss, ok in zip(taken, losses, flags):
            if ok:
                # -ELBO of the batch: the step's loss estimates it for the whole set.
                self.pos.total += batch_loss * size / len(self.train) if self.num_data \
                    else batch_loss
                self.pos.seen += size
            elif failed is None:
                failed = self._nonfinite(step, bad, batch_loss, last=taken[-1][0])
        if failed is not None:
            self._diverged(*failed, last=taken[-1][0])
        if not self.bar.disable:
            self.bar.set_postfix(elbo=f"{-self.pos.total / max(self.pos.seen, 1):.2f}",
                                 refresh=False)

    def _nonfinite(self, step: int, bad: Optional[str], batch_loss: float, last: int):
        """Skip a non-finite step if allowed (None), else return what failed."""
        bad = bad or (f"loss or a gradient (steps are checked every {self.check_every}; "
                      f"found at step {last + 1})")
        where = f"epoch {self.pos.epoch}, step {step + 1}"
        if self.pos.skipped < self.options.skip_nonfinite:
            self.pos.skipped += 1
            logger.warning("non-finite %s at %s: step skipped, no parameter changed "
                           "(%d of %d allowed)", bad, where, self.pos.skipped,
                           self.options.skip_nonfinite)
            return None
        return step, bad, batch_loss, where

    def _diverged(self, step, bad, batch_loss, where, last):
        self.bar.close()
        if step == last:  # nothing ran after it: resuming retries this batch
            self.pos.step = step
        self._checkpoint(running=True)
        raise TrainingDiverged(
            f"non-finite {bad} (loss {batch_loss}) at {where}; this step changed no "
            f"parameter; lower lr, use optimizer 'clipped_adam', or allow a few with "
            f"skip_nonfinite")

    def _end_epoch(self) -> bool:
        """Validate, record, call the hooks, checkpoint; whether to stop."""
        record = {"epoch": self.pos.epoch, "beta": self.beta,
                  "train_elbo": -self.pos.total / max(self.pos.seen, 1), "valid_elbo": None,
                  "seconds": self.pos.seconds + time.perf_counter() - self.clock,
                  "loss": type(self.objective).__name__}
        if self.compile_seconds is not None:  # the first epoch of this call of fit
            record["compile_seconds"], self.compile_seconds = self.compile_seconds, None
            if self.world.main:
                self._log_break_even(record)
        self.history.append(record)
        stop = False
        if self.world.main:
            if self.valid is not None:
                record["valid_elbo"] = evaluate_elbo(self.model, self.valid,
                                                     plain_elbo(self.objective), check=False)
                if hasattr(self.model, "metrics"):  # e.g. a classifier's error
                    record.update({f"valid_{k}": v
                                   for k, v in self.model.metrics(self.valid).items()})
            if self.progress:  # one line per epoch, on a terminal or in a log file
                self.bar.write(_format(record))
            # Every hook sees the epoch, even after one has asked to stop.
            stop = any([bool(h.on_epoch_end(record, self.history, self.model))
                        for h in self.hooks])
        self.pos = self.pos.next_epoch()
        self._checkpoint()
        # Process 0 alone decided: its decision is everyone's.
        return self.world.sum(torch.tensor([float(stop)], device=self.device)).item() > 0

    def _checkpoint(self, running: bool = False) -> None:
        """Hand the training state to the hooks; ``running``: mid-epoch, where the epoch's
        clock stops for the checkpoint (its time is not training time)."""
        if running:
            self.pos.seconds += time.perf_counter() - self.clock
        rng = get_rng_state(self.generator, self.world)  # every process takes part
        if self.world.main and self.hooks:
            state = TrainState(self.pos, self.history,
                               {"parameters": list(self.params),
                                "state": self.step.optimizer.state_dict()}, rng,
                               objective=describe_elbo(self.objective),
                               parameters=self._shapes(),
                               fingerprint=fingerprint(self.model))
            for hook in self.hooks:
                hook.on_checkpoint(state)
        if running:
            self.clock = time.perf_counter()


def fit(model, train, valid=None, *, hooks: Sequence = (), resume=None,
        progress: bool = True, **options) -> List[Dict]:
    """Train ``model`` (any ``model``/``guide`` pair, see ``pyro_vae.contract``) on
    ``train`` by stochastic variational inference and return the per-epoch history.

    ``train`` and ``valid``: ``TensorDataset`` objects (the package's or
    ``torch.utils.data.TensorDataset``), tensors, or tuples of tensors sharing their
    first dimension (a batch is passed as ``model(*batch, num_data=N)``). ``options``:
    the fields of ``Options`` (epochs, loss, beta, batch_size, lr, compile, ...).
    ``hooks``: ``Hook`` objects or functions of ``(record, history, model)``.
    ``resume``: a ``TrainState`` (or its dict) that a hook's ``on_checkpoint`` received,
    with ``model`` holding the weights saved with it; the run continues where the state
    was taken, on the CPU bitwise as the uninterrupted run (``lr`` and ``clip_norm``
    given now replace the saved ones). ``progress``: a bar per epoch on a terminal, and
    each record printed in one line.

    Each step is ``pyro.infer.SVI.step`` with one PyTorch optimizer for all parameters
    (``Step``); the model trains the same under plain ``SVI`` when Pyro sees its
    parameters, and ``fit`` says in one line when it would not. The ELBO is chosen from
    model and guide unless ``loss`` names one (``pyro_vae.objectives.choose_elbo``).
    Before the first step ``fit`` checks that the loss scales with ``num_data``.

    Returns one record per epoch, ``{"epoch", "beta", "train_elbo", "valid_elbo",
    "seconds", "loss"}``, each also passed to every hook: per data point, in nats;
    ``train_elbo`` is the training objective (beta-weighted ELBO or Renyi bound)
    averaged over the epoch's minibatches, ``valid_elbo`` the plain ELBO of ``valid``,
    ``seconds`` excludes validation and checkpoints, ``loss`` the ELBO's class name.

    Clears Pyro's parameter store first (a stale entry of an earlier model with the same
    names would be optimized instead). With ``torch.distributed`` initialized, each
    process trains on its shard of every batch (``pyro_vae.distributed``); process 0
    validates and calls the hooks; an ELBO without ``differentiable_loss`` is refused
    there.

    Raises ``TypeError`` for an unknown option; ``ValueError`` (often an
    ``ArgumentError`` naming the option) for a bad value, data the model cannot take, or
    a resume that does not fit (other weights than those saved, another objective unless
    ``allow_loss_change=True``); ``TrainingDiverged`` when a step's loss or gradient is
    not finite (the step changes nothing; ``skip_nonfinite`` such steps are skipped
    first); ``TrainingInterrupted`` on SIGINT or SIGTERM, at the next step boundary
    after a checkpoint (a signal the process ignores stays ignored).
    """
    try:
        opts = Options(**options)
    except TypeError:
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Options)})
        raise TypeError(f"fit() got unknown option(s) {unknown}; see pyro_vae.train."
                        f"Options") from None
    return Trainer(model, train, valid, opts, hooks, progress).fit(resume)


def _check_distributed(objective: ELBO, n: int, batch_size: int, world: World) -> None:
    if not hasattr(objective, "differentiable_loss"):
        raise ValueError(f"loss {type(objective).__name__} cannot train on several "
                         f"processes (it has no differentiable_loss: Pyro computes its "
                         f"gradients outside a module's forward); use one process")
    smallest = min(batch_size, n - (math.ceil(n / batch_size) - 1) * batch_size)
    if smallest < world.size:
        raise ArgumentError("batch_size", f"{batch_size}: a batch of {smallest} points cannot "
                         f"be shared by {world.size} processes (the last batch of {n} "
                         f"points); choose a batch size that leaves at least {world.size}")


def _check_beta_sites(module, batch, sites) -> None:
    if sites is None:
        return
    with torch.no_grad(), pyro.validation_enabled(False):
        trace = poutine.trace(module.guide).get_trace(*batch)
    latent = [name for name, site in trace.nodes.items() if is_latent(site)]
    unknown = [s for s in sites if s not in latent]
    if unknown:
        raise ArgumentError("beta_sites", f"the guide has no latent site {unknown[0]!r} (it "
                         f"samples {latent})")


def _refuse_prior_on_guide(module, batch, guide_ids) -> None:
    """freeze_model: refuse a model whose densities depend on the guide's parameters
    (a prior built on the guide's own encoder would change with the guide)."""
    guide_trace = poutine.trace(module.guide).get_trace(*batch)
    for site in guide_trace.nodes.values():
        if is_latent(site):
            site["value"] = site["value"].detach()
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)
                                ).get_trace(*batch)
    log_p = model_trace.log_prob_sum()
    ours = [p for p in module.parameters() if id(p) in guide_ids]
    if log_p.requires_grad and any(g is not None for g in torch.autograd.grad(
            log_p, ours, allow_unused=True)):
        raise ValueError("freeze_model: the prior is built on the guide's encoder and would "
                         "train with it; give the model its own (VAE.swap_guide)")


def _describe(objective) -> str:
    """An ELBO (or ``describe_elbo``'s dict of one) in a few words:
    ``TraceEnum_ELBO(num_particles=1, max_plate_nesting=1)``."""
    d = describe_elbo(objective) if isinstance(objective, ELBO) else objective
    shown = ", ".join(f"{k}={d[k]}" for k in ("num_particles", "max_plate_nesting", "alpha")
                      if k in d)
    return f"{str(d.get('class', '?')).rsplit('.', 1)[-1]}({shown})"


def _format(record: Dict) -> str:
    text = f"epoch {record['epoch']:>3}  train ELBO {record['train_elbo']:9.3f}"
    if record.get("valid_elbo") is not None:
        text += f"  valid ELBO {record['valid_elbo']:9.3f}"
    if record.get("valid_error") is not None:
        text += f"  valid error {record['valid_error']:.2f}%"
    return text + f"  ({record['seconds']:.1f}s)"


def _module_device(module: torch.nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")

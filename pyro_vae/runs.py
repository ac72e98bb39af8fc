"""Run folders: a ``TrainConfig`` in, a folder of results out, and back again.

A run folder holds ``config.json`` (every setting), ``metrics.jsonl`` (one JSON object per
epoch), ``checkpoint.pt`` (the last epoch's weights, and everything needed to resume
exactly), ``best.pt`` (the best validated epoch's weights, which runs with early stopping
report), ``summary.json`` (test ELBO, timings, and which weights they are of) and the
figures ``samples.png``, ``reconstructions.png``, ``elbo.png``; ``pyro-vae evaluate`` adds
``eval.json`` and ``elbo_surgery.png``. A semi-supervised run (``--model ssvae``) adds
``labels.json`` (the labelled training points) and the figures ``analogies.png``,
``confusion.png`` and ``error.png``. ``run.lock`` is the folder's write lock: the process
that writes the folder holds it (``fcntl.flock``) and its PID is in it; the file stays,
empty of meaning once the holder has exited. ``RunFolder`` is the one place that knows
these names.
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

import pyro

from . import datasets, distributed, plots
from .compiled import check_precision
from .checkpoints import (TrainState, atomic_write, load_checkpoint, read_checkpoint,
                          save_checkpoint)
from .errors import ArgumentError
from .statecheck import check_optimizer_state
from .config import (MODEL_SETTINGS, RESUMABLE_CHANGES, TrainConfig, build_model,
                     config_from_dict, config_to_dict, flag, resolve_device)
from .files import MAX_JSON_BYTES, open_nofollow, read_bounded
from .evaluation import (MAX_SAMPLES, active_units, bits_per_dim, elbo_surgery,
                         log_likelihood, probe_batch, units)
from .evaluation import elbo as evaluate_elbo
from .models import MODELS
from .objectives import choose_elbo, plain_elbo
from .hooks import Checkpointer, KeepBest, MetricsWriter, best_epoch, stopped_early
from .semisupervised import classification_error, labelled_split, repeats
from .step import make_optimizer
from .contract import check_model_guide
from .arguments import check_device
from .errors import ArgumentError
from .memory import check_step_memory
from .train import Options, check_data, fit

logger = logging.getLogger("pyro_vae")

# Every file a run folder may hold.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json",
             "samples.png", "reconstructions.png", "elbo.png", "eval.json",
             "elbo_surgery.png", "labels.json", "analogies.png", "confusion.png", "error.png")


LOCK_FILE = "run.lock"  # never removed: removing a lock file races with its next holder

# What a run writes once training has ended (and a semi-supervised one besides).
REPORT_FILES = ("summary.json", "samples.png", "reconstructions.png", "elbo.png")
CLASSIFIER_FILES = ("analogies.png", "confusion.png", "error.png")


class RunFolder:
    """The files of one run, by name: where each lives, how each is written (atomically)
    and read back."""

    def __init__(self, path):
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
            raise ArgumentError("run_dir", f"must name the run folder, got {path!r}")
        self.path = Path(path)
        if self.path.is_symlink():  # resolved once: a link changed later moves no write
            self.path, self.link = self.path.resolve(), self.path
        else:
            self.link = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    def existing(self):
        """The names of the run files (``RUN_FILES``) the folder holds (a dangling link
        among them)."""
        return [f for f in RUN_FILES if os.path.lexists(self.path / f)]

    def prepare(self, overwrite: bool) -> None:
        """Make the folder for a new run: refuse one that holds a run unless
        ``overwrite``, then remove that run's files."""
        existing = self.existing()
        if existing and not overwrite:
            raise FileExistsError(f"--out {self.path} already holds a run "
                                  f"({', '.join(existing)}); pass --overwrite or choose "
                                  f"another folder")
        self.path.mkdir(parents=True, exist_ok=True)
        for f in existing:
            os.remove(self.path / f)
        self.remove_leftovers()

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder's write lock (``fcntl.flock`` on ``run.lock``) inside the
        block: one writer per run folder. A second writer is refused in one line naming
        the holder's PID; the kernel releases the lock when its holder exits or is
        killed, so a stale lock never blocks. ``run.lock`` is never followed through a
        symbolic link (nor written when it is not a plain file of its own)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.link is not None:
            logger.info("run folder %s is a symbolic link: writing in %s", self.link,
                        self.path)
        fd = open_nofollow(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RuntimeError(f"{self.path}: another process (PID {holder}) is writing "
                               f"this run folder; wait for it to end or stop it") from None
        try:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            except OSError as e:
                raise OSError(f"{self.path / LOCK_FILE}: not written ({e.strerror})") from None
            yield self
        finally:
            os.close(fd)  # releases the lock

    def remove_leftovers(self) -> None:
        """Temporary files of writes cut short by a killed process (see ``atomic_write``)."""
        for f in RUN_FILES:
            for tmp in self.path.glob(f + ".*.tmp"):
                if tmp.is_symlink() or tmp.is_file():  # unlink removes a link, not its target
                    tmp.unlink()

    def write_json(self, name: str, obj) -> None:
        """Write ``obj`` as indented JSON to the folder's file ``name``, atomically."""
        atomic_write(self.path / name, lambda f: f.write(json.dumps(obj, indent=2) + "\n"),
                     binary=False)

    def write_config(self, config: TrainConfig) -> None:
        """Write ``config.json`` (``config_to_dict``: the format, then every setting)."""
        self.write_json("config.json", config_to_dict(config))

    def read_config(self, trust_imports: bool = False) -> TrainConfig:
        """The run's ``TrainConfig`` (see the module function ``read_config``)."""
        return read_config(self.path / "config.json", trust_imports)

    def restart_metrics(self, history) -> None:
        """``metrics.jsonl`` from ``history``: an epoch logged after the checkpoint was
        taken is trained again, and logged once."""
        atomic_write(self.path / "metrics.jsonl",
                     lambda f: f.writelines(json.dumps(r) + "\n" for r in history),
                     binary=False)

    def hooks(self, vae, x_dim: int, monitor: str = "valid_elbo"):
        """The hooks that fill the folder while training: metrics, checkpoint, and the
        best epoch's weights by ``monitor`` (kept whether or not the run stops early, so
        that early stopping given on --resume still has the best epoch before it)."""
        return [MetricsWriter(self.path / "metrics.jsonl"),
                Checkpointer(self.checkpoint, vae, x_dim=x_dim),
                KeepBest(self.best, vae, monitor, x_dim=x_dim)]

    def training_state(self) -> Tuple[dict, TrainState]:
        """The checkpoint's content and the training state in it (to resume from)."""
        state = read_checkpoint(self.checkpoint)
        if not isinstance(state.get("training"), dict):
            raise ValueError(f"{self.checkpoint}: holds weights only, no training state "
                             f"to resume from")
        return state, TrainState.from_dict(state["training"], str(self.checkpoint))

    def reported(self, config: TrainConfig) -> bool:
        """Whether the summary and figures of a finished run are all there."""
        files = REPORT_FILES + (CLASSIFIER_FILES if config.model == "ssvae" else ())
        return all((self.path / f).exists() for f in files)

    def weights(self, config: TrainConfig, which: Optional[str] = None) -> Path:
        """The checkpoint holding the model: ``best.pt`` for ``which="best"`` (the best
        validated epoch's weights), ``checkpoint.pt`` for ``"last"``; ``None``: the one
        the run's summary and figures use (``which_weights``)."""
        return self.best if which_weights(config, which) == "best" else self.checkpoint


#: The weights a run folder keeps: the best validated epoch's and the last epoch's.
WEIGHTS = ("best", "last")


def which_weights(config: TrainConfig, which: Optional[str] = None) -> str:
    """``which`` ("best" or "last"), or for ``None`` the run's own: the best epoch's
    with early stopping (which trains on past it), else the last epoch's. Raises
    ``ArgumentError`` naming ``which`` otherwise."""
    if which is None:
        return "best" if config.early_stopping else "last"
    if which not in WEIGHTS:
        raise ArgumentError("which", f"must be one of {list(WEIGHTS)} (or None: the run's "
                            f"own), got {which!r}")
    return which


def load_data(config: TrainConfig):
    """The config's (train, valid, test); with ``labels``, the training split keeps that
    many labels (``semisupervised.labelled_split``)."""
    train, valid, test = datasets.load(config.dataset, config.data_dir,
                                       binarize=config.binarize_data, seed=config.seed,
                                       download=config.download)
    if config.limit:
        train = train.subset(config.limit)
    if config.labels:
        train = labelled_split(train, config.labels, config.seed,
                               share=config.labelled_share)
    return train, valid, test


def _labels_record(config: TrainConfig, train) -> dict:
    """What labels.json holds: which training points kept their label, how they were
    chosen, and how often each is repeated per epoch."""
    size, r = repeats(train, config.labels)
    index = train.spread[:size].nonzero().squeeze(-1)
    return {"count": len(index), "per_class": len(index) // 10, "seed": config.seed,
            "rule": "N/10 per class, each class's drawn by a permutation seeded with seed",
            "repeats_per_epoch": r, "labelled_share_of_batches": r * len(index) / len(train),
            "indices": index.tolist(), "labels": train.labels[index].tolist()}


def from_source(config: TrainConfig, trust_imports: bool = False
                ) -> Tuple[TrainConfig, dict]:
    """For ``--init-from SOURCE``: the config with SOURCE's model settings, and the weights
    to start from (a state dict for ``build_model(config)``: the model's from SOURCE; the
    guide's too when it is SOURCE's guide family, else left to its fresh initialization).
    The guide is what the model declares (``guide_modules``)."""
    source = RunFolder(config.init_from)
    src = source.read_config(trust_imports)
    state = read_checkpoint(source.weights(src))["model"]
    guide_settings = {k: getattr(config, k) for k in ("guide", "guide_options")}
    taken = MODEL_SETTINGS + ("dataset", "binarize")  # the model, and what it models
    config = dataclasses.replace(config, **{**{k: getattr(src, k) for k in taken},
                                            **guide_settings})
    same_guide = ((config.guide, config.guide_options) == (src.guide, src.guide_options)
                  and not config.fresh_guide)
    if same_guide and not config.freeze_model:
        return config, state  # plain continuation, kept prior encoder and all
    # The prior keeps the encoder it was built on: the source's kept one, else its guide's.
    kept = "kept_encoder." if src.prior_guide is not None else "encoder."
    if src.prior_guide is None:
        config = dataclasses.replace(config, prior_guide=src.guide,
                                     prior_guide_options=src.guide_options)
    guide = tuple(name + "." for name in MODELS[config.model].guide_modules)
    start = {k: v for k, v in state.items() if not k.startswith(guide + ("kept_encoder.",))}
    start.update({"kept_encoder." + k[len(kept):]: v for k, v in state.items()
                  if k.startswith(kept)})
    if same_guide:  # the new guide starts where the source's stopped
        start.update({k: v for k, v in state.items() if k.startswith(guide)})
    return config, start


def _load_start(vae, state: dict, path: Path) -> None:
    """Load ``state``; only the guide (``guide_modules``) may be missing, to start fresh."""
    try:
        result = vae.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        reason = str(e).splitlines()[-1].strip() if str(e) else ""
        raise ValueError(f"{path}: does not fit this model ({reason})") from None
    guide = tuple(name + "." for name in vae.guide_modules)
    missing = [k for k in result.missing_keys if not k.startswith(guide)]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise ValueError(f"{path}: does not fit this model (e.g. {bad!r})")


def train_run(config: TrainConfig, progress: bool = True, trust_imports: bool = False) -> dict:
    """Train as ``config`` says and fill its run folder; returns the summary.
    ``trust_imports``: let ``init_from``'s run folder name classes by import path."""
    if not isinstance(config, TrainConfig):
        raise ArgumentError("config", f"must be a pyro_vae.TrainConfig, got "
                                      f"{type(config).__name__}")
    config.validate()
    start = None
    if config.init_from:
        if Path(config.out).resolve() == Path(config.init_from).resolve():
            raise ValueError(f"--out {config.out} is the --init-from run; write elsewhere")
        config, start = from_source(config, trust_imports)
    config = config.resolved()
    device = distributed.setup(resolve_device(config.device))
    data = load_data(config)
    pyro.set_rng_seed(config.seed)  # the initial weights too are a function of --seed
    vae = build_model(config, data[0].x.shape[1], data[0])
    if start is not None:
        _load_start(vae, start, Path(config.init_from))
    check_data(vae, *data, batch_size=config.batch_size)
    check_model_guide(vae, data[0])  # a trial on two points: bad parameters show here
    check_step_memory(data[0], config.batch_size, config.particles, device)
    run = RunFolder(config.out)
    # Everything that can fail on bad input has been checked: only now touch the folder
    # (process 0 does, of several under torchrun), holding its lock.
    with _writing(run):
        if distributed.is_main():
            run.prepare(config.overwrite)
            run.write_config(config)
            if config.labels:
                run.write_json("labels.json", _labels_record(config, data[0]))
        return _train_and_report(config, run, vae, data, device, progress)


def _writing(run: RunFolder):
    """The run folder's lock, taken by the process that writes it (process 0)."""
    return run.lock() if distributed.is_main() else contextlib.nullcontext()


def resume_config(run_dir, changes: Optional[dict] = None,
                  trust_imports: bool = False) -> TrainConfig:
    """The config of the run in ``run_dir`` with ``changes`` (option name -> value, e.g.
    the options given on the command line beside ``--resume``) applied. A change outside
    ``RESUMABLE_CHANGES`` is a one-line error naming the option: a resumed run keeps its
    model and what it was trained on."""
    run_dir = RunFolder(run_dir).path
    saved = RunFolder(run_dir).read_config(trust_imports)
    if not isinstance(changes, (dict, type(None))):
        raise ArgumentError("changes", f"must be a dict of setting: value, got "
                                       f"{type(changes).__name__}")
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in (changes or {}).items()}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in changes.items():
        if name not in names:
            raise ValueError(f"--resume: unknown setting {name!r}")
        now = getattr(dataclasses.replace(saved, **{name: value}).resolved(), name)
        if name in RESUMABLE_CHANGES or now == getattr(saved, name):
            continue
        what = ("changes the model" if name in MODEL_SETTINGS
                else "changes what the run trains")
        raise ValueError(f"--resume {run_dir}: --{flag(name)} {_show(value)} differs from "
                         f"the run's {_show(getattr(saved, name))} and {what}; start a new "
                         f"run (--init-from {run_dir} keeps its weights)")
    changes = {k: v for k, v in changes.items() if k in RESUMABLE_CHANGES}
    config = dataclasses.replace(saved, **{**changes, "out": str(run_dir)})
    config.validate()
    return config


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def resume_run(run_dir, changes: Optional[dict] = None, progress: bool = True,
               trust_imports: bool = False) -> dict:
    """Continue the run in ``run_dir`` from its checkpoint (``pyro-vae train --resume``):
    on the CPU a run killed at any point and resumed ends bitwise where the uninterrupted
    run would. ``changes``: see ``resume_config`` (e.g. ``{"epochs": 50}`` to train on).
    The data are read as ``evaluate_run`` reads them: from the run's data_dir only where
    that folder exists (nothing downloaded there), unless ``changes`` gives one."""
    config = resume_config(run_dir, changes, trust_imports)
    run = RunFolder(config.out)
    if not run.checkpoint.exists():
        raise ValueError(f"--resume {run.path}: no checkpoint.pt (the run stopped before "
                         f"its first checkpoint); start it again with --overwrite")
    device = distributed.setup(resolve_device(config.device))
    source = config if "data_dir" in (changes or {}) else _run_data(config, None)
    with _writing(run):
        return _resume(config, run, device, progress, source)


def _resume(config: TrainConfig, run: RunFolder, device, progress: bool,
            source: TrainConfig) -> dict:
    """``resume_run`` holding the folder's lock; ``source``: the config to load the data
    with (``_run_data``)."""
    out = run.path
    state, training = run.training_state()
    done = training.epochs_done
    finished = done >= config.epochs or stopped_early(training.history,
                                                      config.early_stopping, config.monitor)
    if finished and not run.reported(config):
        return _finish(config, run, state, training, device, load_data(source))
    if stopped_early(training.history, config.early_stopping, config.monitor):
        raise ValueError(f"--resume {out}: the run stopped early after {done} epochs (no "
                         f"better {config.monitor} since epoch "
                         f"{best_epoch(training.history, config.monitor)}); give a larger "
                         f"--early-stopping to train on")
    if done >= config.epochs:
        raise ValueError(f"--resume {out}: the run has finished its {done} epochs; give "
                         f"--epochs more than {done} to train on")
    data = load_data(source)
    vae = build_model(config, data[0].x.shape[1], data[0])
    load_checkpoint(run.checkpoint, vae, state=state)
    check_data(vae, *data, batch_size=config.batch_size)
    _check_resumable(run, training, vae, data[0], config, device)
    if distributed.is_main():
        run.remove_leftovers()
        run.write_config(config)
    return _train_and_report(config, run, vae, data, device, progress, resume=training)


def _check_resumable(run: RunFolder, training: TrainState, vae, train, config,
                     device) -> None:
    """What the resumed run will load, checked before config.json is rewritten: the
    position fits the data, the optimizer state fits the model's parameters, a step fits
    in memory."""
    training.check_data(len(train), config.batch_size, str(run.checkpoint))
    check_step_memory(train, config.batch_size, config.particles, device)
    params, where = dict(vae.named_parameters()), f"{run.checkpoint}: training.optimizer"
    check_optimizer_state(training.optimizer, params, where)
    # Its groups' flags (fused, amsgrad, ...) against an optimizer of the run's kind.
    saved = [params[name] for name in training.optimizer["parameters"]]
    check_optimizer_state(training.optimizer, params, where, make_optimizer(
        config.optimizer, saved, config.lr, config.clip_norm))


def _finish(config: TrainConfig, run: RunFolder, state: dict, training: TrainState,
            device, data) -> dict:
    """Write the summary and figures of a run whose training ended (it was stopped
    after its last checkpoint, before they were written)."""
    vae = build_model(config, data[0].x.shape[1], data[0])
    load_checkpoint(run.checkpoint, vae, state=state)
    check_step_memory(data[0], config.batch_size, config.particles, device)
    best = read_checkpoint(run.best) if config.early_stopping else None  # before any write
    if distributed.is_main():
        run.remove_leftovers()
        run.restart_metrics(training.history)
        if best is not None:
            load_checkpoint(run.best, vae, state=best)
        return _report(config, run, vae.to(device), data, device, training.history)
    return {}


def _train_and_report(config: TrainConfig, run: RunFolder, vae, data, device,
                      progress: bool, resume: Optional[TrainState] = None) -> dict:
    """Train (from the start, or from ``resume``) into the run folder: checkpoints and
    metrics as it goes (the folder's hooks), then the summary and figures. Of several
    processes, all train and process 0 alone writes (the others return {})."""
    train, valid, _ = data
    main = distributed.is_main()
    if main:
        run.restart_metrics(resume.history if resume else [])
    hooks = run.hooks(vae, train.x.shape[1], config.monitor) if main else []
    options = {name: getattr(config, name) for name in config.group("training")
               if name in Options.__dataclass_fields__}
    history = fit(vae, train, valid, hooks=hooks, resume=resume, progress=progress,
                  **dict(options, num_particles=config.particles, device=device))
    if not main:
        return {}
    if which_weights(config) == "best":  # the summary and figures are that model's
        load_checkpoint(run.best, vae, map_location=device)
    return _report(config, run, vae, data, device, history)


def _report(config: TrainConfig, run: RunFolder, vae, data, device, history) -> dict:
    """Write the summary (test ELBO, timings) and the figures of a trained run."""
    train, _, test = data
    test = test.to(device)
    objective, _ = choose_elbo(config.loss, config.particles, vae, probe_batch(test))
    # The plain ELBO (beta = 1) for every run; the IWAE bound too where it was trained.
    which = which_weights(config)
    summary = {
        "test_elbo": evaluate_elbo(vae, test, plain_elbo(objective), seed=config.seed),
        "num_test": len(test),
        # Whose numbers: the best epoch's weights (best.pt) or the last one's.
        "weights": which,
        "weights_epoch": best_epoch(history, config.monitor) if which == "best"
        else len(history),
        "epochs": config.epochs,
        "epochs_trained": len(history),
        "best_epoch": best_epoch(history, config.monitor),
        "seconds_per_epoch": sum(r["seconds"] for r in history) / max(len(history), 1),
        "device": str(device),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        **units(vae, test),
    }
    if config.loss == "iwae":
        summary["test_iwae"] = evaluate_elbo(vae, test, objective, seed=config.seed)
    if summary["likelihood_of"] == "probability":
        summary["test_elbo_bits_per_dim"] = bits_per_dim(summary["test_elbo"],
                                                         summary["dims"])
    if config.model == "ssvae":
        summary["test_error"] = classification_error(vae, test)
        summary["labels"] = config.labels
    run.write_json("summary.json", summary)
    vae.eval()
    plots.plot_samples(vae, train.image_shape, run / "samples.png")
    plots.plot_reconstructions(vae, test.x[:32], train.image_shape, run / "reconstructions.png")
    plots.plot_elbo(history, run / "elbo.png")
    if config.model == "ssvae":
        plots.plot_classifier(vae, test, history, run.path)
    return summary


def read_config(path, trust_imports: bool = False) -> TrainConfig:
    """The ``TrainConfig`` in a run folder's ``config.json``. A run folder is data: a
    class named by import path in it is refused unless ``trust_imports``."""
    path = Path(path)
    try:
        text = read_bounded(path, MAX_JSON_BYTES, "config.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; is this a pyro_vae run folder?") from None
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # bad JSON, text or nesting
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not valid JSON ({reason})") from None
    return config_from_dict(raw, str(path), trust_imports)


def load_run(run_dir, device="cpu", trust_imports: bool = False,
             which: Optional[str] = None) -> Tuple[torch.nn.Module, TrainConfig]:
    """The trained model and the config of a run folder, on ``device``. ``which``:
    ``"best"`` (the best validated epoch's weights, ``best.pt``), ``"last"`` (the last
    epoch's, ``checkpoint.pt``), or ``None``: those the run's summary used (the best with
    ``--early-stopping``, else the last). A config that names a class by import path is
    refused unless ``trust_imports`` (never imported). Raises ``FileNotFoundError`` for a
    missing file (a folder written by ``save_run`` without early stopping has no
    ``best.pt``) and ``ValueError`` for one that is not a run's."""
    vae, config, _ = _load_run(run_dir, check_device(device), trust_imports, which)
    return vae, config


def _load_run(run_dir, device, trust_imports: bool, which: Optional[str]):
    """``load_run``'s model and config, and the checkpoint's content."""
    run = RunFolder(run_dir)
    config = run.read_config(trust_imports)
    path = run.weights(config, which)
    state = read_checkpoint(path)
    # x_dim is stored in the checkpoint, so the data need not be loaded to rebuild the net.
    if not isinstance(state.get("x_dim"), int):
        raise ValueError(f"{path}: checkpoint has no x_dim")
    vae = build_model(config, state["x_dim"])
    load_checkpoint(path, vae, state=state)
    return vae.to(device), config, state


def save_run(run_dir, vae, config: TrainConfig, overwrite: bool = False) -> RunFolder:
    """Write a model trained in Python as a run folder (``config.json`` and
    ``checkpoint.pt``, and ``best.pt`` where ``config`` asks for early stopping), so that
    ``load_run`` and ``pyro-vae evaluate`` take it. ``config`` says how to rebuild it (its
    model settings) and which data it was trained on; the model must be the one
    ``build_model(config)`` builds: a one-line error otherwise, before anything is
    written. Holds the folder's lock while writing (``RunFolder.lock``)."""
    if not isinstance(config, TrainConfig):
        raise ArgumentError("config", f"must be a pyro_vae.TrainConfig, got "
                                      f"{type(config).__name__}")
    x_dim = getattr(vae, "x_dim", None)
    if not (isinstance(vae, torch.nn.Module) and type(x_dim) is int):
        raise ArgumentError("vae", f"must be a model of the package (a module with x_dim, "
                                   f"as build_model(config) makes), got {type(vae).__name__}")
    run = RunFolder(run_dir)
    config = dataclasses.replace(config, out=str(run_dir)).resolved()
    config.validate()
    probe = build_model(config, x_dim)
    try:
        probe.load_state_dict(vae.state_dict())
    except RuntimeError as e:
        raise ValueError(f"save_run: the model is not what config describes "
                         f"({str(e).splitlines()[0]})") from None
    with run.lock():
        run.prepare(overwrite)
        run.write_config(config)
        save_checkpoint(run.checkpoint, vae, epoch=0, x_dim=x_dim)
        if config.early_stopping:  # what load_run reads for such a run
            save_checkpoint(run.best, vae, epoch=0, x_dim=x_dim)
    return run


def evaluate_run(run_dir, samples: int = 5000, chunk: int = 100, split: str = "test",
                 limit: Optional[int] = None, device: str = "auto", seed: int = 0,
                 progress: bool = True, surgery_points: Optional[int] = None,
                 trust_imports: bool = False, compile: bool = False,
                 precision: str = "float32", data_dir=None,
                 which: Optional[str] = None) -> dict:
    """Evaluate a run folder on one of its splits; writes ``eval.json`` (and
    ``elbo_surgery.png`` where the surgery applies) there and returns the results, with
    ``"written"``: the files written, and for a part that does not apply to the model
    ``"surgery_skipped"`` / ``"active_units_skipped"``: why. ``surgery_points``: ELBO
    surgery on the first N evaluated points only (default: all). ``trust_imports``,
    ``which`` (the best or the last epoch's weights): see ``load_run``. ``compile``,
    ``precision``: see ``pyro_vae.compiled``.

    ``data_dir``: the data root to read the split from. By default the run's own
    (config.json's ``data_dir``) where that folder exists, read only (nothing is
    downloaded or created there), else ``$PYRO_VAE_DATA`` or the cache
    (``pyro_vae.datasets.data_root``). The folder's lock is held from loading the model
    to writing the results, so no other run is written into it meanwhile."""
    _check_evaluation(split, samples, chunk, limit, surgery_points)
    run = RunFolder(run_dir)
    dev = resolve_device(device)
    check_precision(precision, dev)
    with run.lock():
        vae, config, state = _load_run(run.path, dev, trust_imports, which)
        data = dict(zip(("train", "valid", "test"),
                        load_data(_run_data(config, data_dir))))[split]
        results, surgery = _evaluate(vae, config, data.subset(limit).to(dev), samples, chunk,
                                     seed, progress, surgery_points,
                                     dict(compile=compile, precision=precision))
        results.update(weights=which_weights(config, which), weights_epoch=state.get("epoch"),
                       written=["eval.json"] + (["elbo_surgery.png"] if surgery else []))
        if surgery is not None:
            plots.plot_elbo_surgery(surgery, run / "elbo_surgery.png")
        run.write_json("eval.json", results)
    return results


def _run_data(config: TrainConfig, data_dir) -> TrainConfig:
    """``config`` with the data root to read a run folder's data from: ``data_dir`` when
    the caller gives one; else config.json's where that folder exists, read only (never
    created, nothing downloaded there); else the default root."""
    if data_dir is not None:
        return dataclasses.replace(config, data_dir=str(data_dir))
    if config.data_dir is not None and Path(config.data_dir).expanduser().is_dir():
        return dataclasses.replace(config, download=False)
    if config.data_dir is not None:
        logger.warning("the run's data_dir %s does not exist: reading %s from %s",
                       config.data_dir, config.dataset, datasets.data_root())
    return dataclasses.replace(config, data_dir=None)


def _evaluate(vae, config: TrainConfig, data, samples: int, chunk: int, seed: int,
              progress: bool, surgery_points: Optional[int], compiling: dict):
    """``evaluate_run``'s results of ``vae`` on ``data``, and the ELBO surgery terms."""
    vae.eval()
    elbo_objective = plain_elbo(choose_elbo(config.loss, 1, vae, probe_batch(data))[0])
    start = time.perf_counter()
    ll = log_likelihood(vae, data, samples, chunk, seed=seed, progress=progress,
                        **compiling)
    ll_stderr = (ll.std() / len(ll) ** 0.5).item() if len(ll) > 1 else 0.0
    results = {
        "split": data.split,
        "guide": config.guide,
        "num_points": len(data),
        "num_samples": samples,
        "log_likelihood_seconds": time.perf_counter() - start,
        **compiling,
        "test_elbo": evaluate_elbo(vae, data, elbo_objective, seed=seed),
        "elbo_estimator": type(elbo_objective).__name__,
        "log_likelihood": ll.mean().item(),
        "log_likelihood_stderr": ll_stderr,
        **units(vae, data),
    }
    if config.model == "ssvae":  # y summed out in both; the classifier's error too
        results["test_error"] = classification_error(vae, data)
    if results["likelihood_of"] == "probability":
        dims = results["dims"]
        results.update(
            log_likelihood_bits_per_dim=bits_per_dim(results["log_likelihood"], dims),
            log_likelihood_stderr_bits_per_dim=-bits_per_dim(ll_stderr, dims),
            test_elbo_bits_per_dim=bits_per_dim(results["test_elbo"], dims))
    surgery = _posterior_diagnostics(vae, data, surgery_points, seed, results, compiling)
    return results, surgery


def _check_evaluation(split, samples, chunk, limit, surgery_points) -> None:
    """One-line errors for ``evaluate_run``'s arguments, naming the argument (the command
    line names its option)."""
    if split not in ("train", "valid", "test"):
        raise ArgumentError("split", f"{split!r} is not one of ['train', 'valid', 'test']")
    for name, value in (("samples", samples), ("chunk", chunk), ("limit", limit),
                        ("surgery_points", surgery_points)):
        if value is not None and not (type(value) is int and value >= 1):
            raise ArgumentError(name, f"must be an integer >= 1, got {value!r}")
    if samples > MAX_SAMPLES:
        raise ArgumentError("samples", f"{samples} is more than {MAX_SAMPLES} importance "
                            f"samples per point")


def _posterior_diagnostics(vae, data, surgery_points, seed, results: dict,
                           compiling: dict):
    """ELBO surgery (``compiling``: its compile and precision) and active units into
    ``results``; each skipped, with its reason, for a model it does not fit. Returns
    the surgery terms (None when skipped)."""
    surgery = None
    try:
        surgery = elbo_surgery(vae, data.subset(surgery_points), seed=seed, **compiling)
        results.update({k: surgery[k] for k in ("reconstruction", "avg_kl",
                                                "mutual_information", "marginal_kl", "log_n")})
        results["surgery_elbo"] = surgery["elbo"]
        results["surgery_points"] = surgery["num_points"]
    except ValueError as e:  # a model with more than one latent layer
        results["surgery_skipped"] = str(e)
    try:
        diagnostics = active_units(vae, data)
        results.update(active_units=diagnostics["active_units"],
                       activity=diagnostics["activity"], kl_per_dim=diagnostics["kl_per_dim"])
    except ValueError as e:  # a model without q(z | x) alone (M2's needs a label)
        results["active_units_skipped"] = str(e)
    return surgery

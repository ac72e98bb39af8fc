"""Run folders: one flat ``TrainConfig`` in, a folder of results out, and back again.

A run folder holds ``config.json`` (every setting), ``metrics.jsonl`` (one JSON object per
epoch), ``checkpoint.pt`` (the weights, and everything needed to resume exactly),
``summary.json`` (test ELBO, timings) and the figures ``samples.png``,
``reconstructions.png``, ``elbo.png``.
"""

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

import pyro

from . import datasets, distributed, plots
from .evaluation import active_units, elbo_surgery, log_likelihood
from .evaluation import elbo as evaluate_elbo
from .likelihoods import LIKELIHOODS, GaussianLikelihood
from .guides import GUIDES
from .models import MODELS, build, resolve
from .nn import ACTIVATIONS, ARCHS
from .objectives import LOSSES, check_objective, make_elbo, plain_elbo
from .priors import PRIORS
from .checkpoints import atomic_write, load_checkpoint, read_checkpoint
from .train import (OPTIMIZERS, Checkpointer, KeepBest, MetricsWriter, Options, best_epoch,
                    check_data, fit, stopped_early)


def _opt(default, help, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; the ``pyro-vae train`` options map 1:1 onto it."""

    dataset: str = _opt("digits", "data set", choices=datasets.DATASETS)
    data_dir: Optional[str] = _opt(None, f"data root (default: ${datasets.ENV_VAR}, "
                                         f"else ~/.cache/pyro_vae)")
    download: bool = _opt(True, "download missing data files")
    out: str = _opt("runs/quickstart", "run folder to write")
    overwrite: bool = _opt(False, "replace a run already in --out")
    limit: Optional[int] = _opt(None, "train on the first N training points only")
    model: str = _opt("vae", "vae, or hvae (two stochastic layers)", choices=tuple(MODELS))
    arch: str = _opt("mlp", "networks: mlp, or gated (GatedDense, the VampPrior paper's)",
                     choices=ARCHS)
    z_dim: Optional[int] = _opt(None, "latent dimension (default: 50 for mlp, 40 for gated)")
    hidden: Optional[Tuple[int, ...]] = _opt(None, "hidden layer sizes of the encoder; the "
                                                   "decoder mirrors them (default: 400 for "
                                                   "mlp, 300 300 for gated)")
    act: str = _opt("relu", "hidden activation of mlp networks", choices=tuple(ACTIVATIONS))
    prior: str = _opt("normal", f"p(z): one of {', '.join(PRIORS)}, or "
                                f"package.module:ClassName")
    components: Optional[int] = _opt(None, "mixture components of mog (default 10) and "
                                           "vamp (default 500)")
    pseudo_init: Optional[str] = _opt(None, "vamp pseudo-inputs: normal (N(0.05, 0.01), "
                                            "the default) or data (random training images)",
                                      choices=("normal", "data"))
    learn_weights: Optional[bool] = _opt(None, "vamp: learn the mixture weights "
                                               "(default: uniform)")
    guide: str = _opt("diagonal", f"q(z|x): one of {', '.join(GUIDES)}, or "
                                  f"package.module:ClassName")
    flow_steps: int = _opt(2, "flow steps of --guide iaf")
    init_from: Optional[str] = _opt(None, "start from this run folder's model (its model "
                                          "settings are used); a --guide other than its "
                                          "own starts fresh, the same one from its weights")
    freeze_model: bool = _opt(False, "with --init-from: train the guide only, the decoder "
                                     "and prior stay fixed")
    fresh_guide: bool = _opt(False, "with --init-from: start the guide from scratch even "
                                    "when it is that run's own family")
    prior_guide: Optional[str] = _opt(None, "set by --init-from: guide family of the "
                                            "encoder the prior keeps from that run",
                                      derived=True)
    prior_flow_steps: Optional[int] = _opt(None, "set by --init-from: its flow steps",
                                           derived=True)
    likelihood: str = _opt("bernoulli", "p(x|z)", choices=tuple(LIKELIHOODS))
    likelihood_scale: Optional[float] = _opt(None, "fixed sigma of the gaussian "
                                                   "likelihood (default: learned)")
    binarize: Optional[bool] = _opt(None, "binarize gray data (default: with the "
                                          "bernoulli likelihood)")
    loss: str = _opt("meanfield", "trace (Trace_ELBO), meanfield (TraceMeanField_ELBO) or "
                                  "iwae (RenyiELBO, alpha=0)", choices=tuple(LOSSES))
    particles: int = _opt(1, "vectorized samples per data point (K of the IWAE bound)")
    beta: float = _opt(1.0, "weight of the KL term (beta-VAE)")
    warmup_epochs: int = _opt(0, "KL warm-up: beta rises linearly from 0 over these epochs")
    epochs: int = _opt(30, "training epochs")
    batch_size: int = _opt(128, "minibatch size")
    lr: float = _opt(1e-3, "learning rate")
    optimizer: str = _opt("adam", "Pyro optimizer", choices=OPTIMIZERS)
    clip_norm: float = _opt(10.0, "gradient norm bound of clipped_adam")
    skip_nonfinite: int = _opt(0, "skip up to K steps whose loss or gradient is not "
                                  "finite (each is logged), instead of stopping")
    early_stopping: int = _opt(0, "stop after N epochs without a better validation ELBO; "
                                  "best.pt keeps the best epoch's model, which the "
                                  "summary, figures and evaluate use (0: off)")
    checkpoint_every: int = _opt(0, "also checkpoint every N steps (0: after each epoch "
                                    "only)")
    seed: int = _opt(0, "random seed")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting, as its command-line option."""
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ValueError(f"--{_flag(f.name)}: {value!r} is not one of {list(choices)}")
        positive = ("z_dim", "particles", "epochs", "batch_size", "lr", "clip_norm", "limit",
                    "likelihood_scale", "components")
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:  # None: the default applies
                raise ValueError(f"--{_flag(name)} must be > 0, got {value}")
        if self.hidden is not None and (not self.hidden or min(self.hidden) < 1):
            raise ValueError(f"--hidden: sizes must be >= 1, got {list(self.hidden)}")
        for name in ("skip_nonfinite", "checkpoint_every", "early_stopping"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not self.flow_steps >= 1:
            raise ValueError(f"--flow-steps must be >= 1, got {self.flow_steps}")
        for flag in ("freeze_model", "fresh_guide"):
            if getattr(self, flag) and not self.init_from:
                raise ValueError(f"--{_flag(flag)} needs --init-from RUN (a trained model)")
        check_objective(make_elbo(self.loss, self.particles), self.beta, self.warmup_epochs)
        resolve(self.prior, PRIORS, "prior")
        resolve(self.guide, GUIDES, "guide")
        resolve_device(self.device)

    def resolved(self) -> "TrainConfig":
        """A copy with the arch-dependent defaults filled in (what config.json records)."""
        gated = self.arch == "gated"
        return dataclasses.replace(
            self, z_dim=self.z_dim or (40 if gated else 50),
            hidden=tuple(self.hidden or ((300, 300) if gated else (400,))))

    def prior_options(self) -> dict:
        """The prior options that were set, for the prior's constructor."""
        names = ("components", "pseudo_init", "learn_weights")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def binarize_data(self) -> bool:
        return self.likelihood == "bernoulli" if self.binarize is None else self.binarize


def _flag(name: str) -> str:
    return name.replace("_", "-")


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} asked for, but CUDA is not available")
    return device


def build_vae(config: TrainConfig, x_dim: int, train=None):
    """The model a (resolved) config describes. ``train``: the training split, needed by
    VampPrior pseudo-inputs initialized from data (not when loading trained weights)."""
    likelihood = config.likelihood
    if likelihood == "gaussian":
        likelihood = GaussianLikelihood(x_dim, scale=config.likelihood_scale)
    options = config.prior_options()
    if options.get("pseudo_init") == "data":
        # Loading a trained run overwrites them; any images of the right shape will do.
        options["data"] = train.x if train is not None else torch.rand(
            config.components or 500, x_dim)
    swapped = config.prior_guide is not None
    vae = MODELS[config.model](
        x_dim, config.z_dim, config.hidden, likelihood=likelihood, prior=config.prior,
        encoder=config.prior_guide if swapped else config.guide, act=config.act,
        arch=config.arch, prior_options=options,
        flow_steps=config.prior_flow_steps if swapped else config.flow_steps)
    if swapped:  # a guide fitted to another run's model: the prior keeps that encoder
        vae.swap_guide(build(config.guide, GUIDES, "guide", dict(
            x_dim=x_dim, z_dim=config.z_dim, hidden=config.hidden, act=config.act,
            arch=config.arch, flow_steps=config.flow_steps)))
    return vae


# Settings that define the model p(x, z): --init-from takes them from the source run.
MODEL_SETTINGS = ("dataset", "model", "arch", "z_dim", "hidden", "act", "prior",
                  "components", "pseudo_init", "learn_weights", "likelihood",
                  "likelihood_scale", "binarize")


def from_source(config: TrainConfig) -> Tuple[TrainConfig, dict]:
    """For ``--init-from SOURCE``: the config with SOURCE's model settings, and the weights
    to start from (a state dict for ``build_vae(config)``: the model's from SOURCE; the
    guide's too when it is SOURCE's guide family, else left to its fresh initialization)."""
    source = Path(config.init_from)
    src = read_config(source / "config.json")
    state = read_checkpoint(source / "checkpoint.pt")["model"]
    config = dataclasses.replace(config, **{k: getattr(src, k) for k in MODEL_SETTINGS})
    same_guide = ((config.guide, config.flow_steps) == (src.guide, src.flow_steps)
                  and not config.fresh_guide)
    if same_guide and not config.freeze_model:
        # Plain continuation; a source that kept an encoder for its prior keeps it.
        return dataclasses.replace(config, prior_guide=src.prior_guide,
                                   prior_flow_steps=src.prior_flow_steps), state
    # The prior keeps the encoder it was built on: the source's kept one, else its guide's.
    kept = "kept_encoder." if src.prior_guide is not None else "encoder."
    config = dataclasses.replace(
        config, prior_guide=src.prior_guide or src.guide,
        prior_flow_steps=src.prior_flow_steps if src.prior_guide else src.flow_steps)
    guide = _guide_prefixes(config)
    start = {k: v for k, v in state.items() if not k.startswith(guide + ("kept_encoder.",))}
    start.update({"kept_encoder." + k[len(kept):]: v for k, v in state.items()
                  if k.startswith(kept)})
    if same_guide:  # the new guide starts where the source's stopped
        start.update({k: v for k, v in state.items() if k.startswith(guide)})
    return config, start


def _guide_prefixes(config: TrainConfig) -> Tuple[str, ...]:
    """State-dict prefixes of the modules that make the model's guide (its declaration,
    ``guide_modules``: for the HVAE both q(z2 | x) and q(z1 | x, z2))."""
    return tuple(name + "." for name in MODELS[config.model].guide_modules)


def load_data(config: TrainConfig):
    train, valid, test = datasets.load(config.dataset, config.data_dir,
                                       binarize=config.binarize_data, seed=config.seed,
                                       download=config.download)
    if config.limit:
        train = train.subset(config.limit)
    return train, valid, test


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), binary=False)


def _write_lines(path: Path, records) -> None:
    atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records),
                 binary=False)


# Every file a run folder may hold (best.pt: runs with --early-stopping).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json",
             "samples.png", "reconstructions.png", "elbo.png")


def _prepare_out(out: Path, overwrite: bool) -> None:
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"--out {out} already holds a run ({', '.join(existing)}); "
                              f"pass --overwrite or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    for f in existing:
        os.remove(out / f)
    _remove_leftovers(out)


def _remove_leftovers(out: Path) -> None:
    """Temporary files of writes cut short by a killed process (see ``atomic_write``)."""
    for f in RUN_FILES:
        for tmp in out.glob(f + ".*.tmp"):
            tmp.unlink()


def _load_start(vae, state: dict, path: Path) -> None:
    """Load ``state``; only the guide (``guide_modules``) may be missing, to start fresh."""
    result = vae.load_state_dict(state, strict=False)
    guide = tuple(name + "." for name in vae.guide_modules)
    missing = [k for k in result.missing_keys if not k.startswith(guide)]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise ValueError(f"{path}: does not fit this model (e.g. {bad!r})")


def train_run(config: TrainConfig, progress: bool = True) -> dict:
    """Train as ``config`` says and fill its run folder; returns the summary."""
    config.validate()
    start = None
    if config.init_from:
        if Path(config.out).resolve() == Path(config.init_from).resolve():
            raise ValueError(f"--out {config.out} is the --init-from run; write elsewhere")
        config, start = from_source(config)
    config = config.resolved()
    device = distributed.setup(resolve_device(config.device))
    data = load_data(config)
    pyro.set_rng_seed(config.seed)  # the initial weights too are a function of --seed
    vae = build_vae(config, data[0].x.shape[1], data[0])
    if start is not None:
        _load_start(vae, start, Path(config.init_from) / "checkpoint.pt")
    check_data(vae, *data, batch_size=config.batch_size)
    out = Path(config.out)
    # Everything that can fail on bad input has been checked: only now touch the folder
    # (process 0 does, of several under torchrun).
    if distributed.is_main():
        _prepare_out(out, config.overwrite)
        _write_json(out / "config.json", dataclasses.asdict(config))
    return _train_and_report(config, vae, data, device, progress)


# What --resume may change; any other difference from the run's config.json is refused.
RESUMABLE_CHANGES = ("epochs", "early_stopping", "lr", "clip_norm", "skip_nonfinite",
                     "checkpoint_every", "device", "data_dir", "download", "out", "overwrite")
GUIDE_SETTINGS = ("guide", "flow_steps", "prior_guide", "prior_flow_steps")


def resume_config(run_dir, changes: Optional[dict] = None) -> TrainConfig:
    """The config of the run in ``run_dir`` with ``changes`` (option name -> value, e.g.
    the options given on the command line beside ``--resume``) applied. A change outside
    ``RESUMABLE_CHANGES`` is a one-line error naming the option: a resumed run keeps its
    model and what it was trained on."""
    run_dir = Path(run_dir)
    saved = read_config(run_dir / "config.json")
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in (changes or {}).items()}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in changes.items():
        if name not in names:
            raise ValueError(f"--resume: unknown setting {name!r}")
        now = getattr(dataclasses.replace(saved, **{name: value}).resolved(), name)
        if name in RESUMABLE_CHANGES or now == getattr(saved, name):
            continue
        what = ("changes the model" if name in MODEL_SETTINGS + GUIDE_SETTINGS
                else "changes what the run trains")
        raise ValueError(f"--resume {run_dir}: --{_flag(name)} {_show(value)} differs from "
                         f"the run's {_show(getattr(saved, name))} and {what}; start a new "
                         f"run (--init-from {run_dir} keeps its weights)")
    changes = {k: v for k, v in changes.items() if k in RESUMABLE_CHANGES}
    config = dataclasses.replace(saved, **{**changes, "out": str(run_dir)})
    config.validate()
    return config


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def resume_run(run_dir, changes: Optional[dict] = None, progress: bool = True) -> dict:
    """Continue the run in ``run_dir`` from its checkpoint (``pyro-vae train --resume``):
    on the CPU a run killed at any point and resumed ends bitwise where the uninterrupted
    run would. ``changes``: see ``resume_config`` (e.g. ``{"epochs": 50}`` to train on)."""
    config = resume_config(run_dir, changes)
    out = Path(config.out)
    if not (out / "checkpoint.pt").exists():
        raise ValueError(f"--resume {out}: no checkpoint.pt (the run stopped before its "
                         f"first checkpoint); start it again with --overwrite")
    state = read_checkpoint(out / "checkpoint.pt")
    training = state.get("training")
    if not isinstance(training, dict):
        raise ValueError(f"{out / 'checkpoint.pt'}: holds weights only, no training state "
                         f"to resume from")
    done = len(training["history"])
    if stopped_early(training["history"], config.early_stopping):
        raise ValueError(f"--resume {out}: the run stopped early after {done} epochs (no "
                         f"better validation ELBO since epoch "
                         f"{best_epoch(training['history'])}); give a larger "
                         f"--early-stopping to train on")
    if done >= config.epochs:
        raise ValueError(f"--resume {out}: the run has finished its {done} epochs; give "
                         f"--epochs more than {done} to train on")
    device = distributed.setup(resolve_device(config.device))
    data = load_data(config)
    vae = build_vae(config, data[0].x.shape[1], data[0])
    load_checkpoint(out / "checkpoint.pt", vae, state=state)
    check_data(vae, *data, batch_size=config.batch_size)
    if distributed.is_main():
        _remove_leftovers(out)
        _write_json(out / "config.json", dataclasses.asdict(config))
    return _train_and_report(config, vae, data, device, progress, resume=training)


def _train_and_report(config: TrainConfig, vae, data, device, progress: bool,
                      resume: Optional[dict] = None) -> dict:
    """Train (from the start, or from ``resume``) into ``config.out``: checkpoints and
    metrics as it goes (hooks), then the summary and figures. Of several processes, all
    train and process 0 alone writes (the others return an empty summary)."""
    out = Path(config.out)
    train, valid, test = data
    main = distributed.is_main()
    hooks = []
    if main:
        # metrics.jsonl restarts from the checkpoint's history: an epoch logged after the
        # checkpoint was taken is trained again, and logged once.
        _write_lines(out / "metrics.jsonl", resume["history"] if resume else [])
        x_dim = train.x.shape[1]
        hooks = [MetricsWriter(out / "metrics.jsonl"),
                 Checkpointer(out / "checkpoint.pt", vae, x_dim=x_dim)]
        if config.early_stopping:
            hooks.append(KeepBest(out / "best.pt", vae, x_dim=x_dim))
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(Options)
               if hasattr(config, f.name)}
    options.update(num_particles=config.particles, device=device)
    history = fit(vae, train, valid, hooks=hooks, resume=resume, progress=progress,
                  **options)
    if not main:
        return {}
    if config.early_stopping:  # the summary and figures are the best epoch's model's
        load_checkpoint(out / "best.pt", vae, map_location=device)
    return _report(config, vae, data, device, history)


def _report(config: TrainConfig, vae, data, device, history) -> dict:
    """Write the summary (test ELBO, timings) and the figures of a trained run."""
    out = Path(config.out)
    train, _, test = data
    test = test.to(device)
    objective = make_elbo(config.loss, config.particles)
    # The plain ELBO (beta = 1) for every run; the IWAE bound too where it was trained.
    summary = {
        "test_elbo": evaluate_elbo(vae, test, plain_elbo(objective), seed=config.seed),
        "num_test": len(test),
        "epochs": config.epochs,
        "epochs_trained": len(history),
        "best_epoch": best_epoch(history),
        "seconds_per_epoch": sum(r["seconds"] for r in history) / max(len(history), 1),
        "device": str(device),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
    }
    if config.loss == "iwae":
        summary["test_iwae"] = evaluate_elbo(vae, test, objective, seed=config.seed)
    _write_json(out / "summary.json", summary)
    vae.eval()
    plots.plot_samples(vae, train.image_shape, out / "samples.png")
    plots.plot_reconstructions(vae, test.x[:32], train.image_shape, out / "reconstructions.png")
    plots.plot_elbo(history, out / "elbo.png")
    return summary


def read_config(path) -> TrainConfig:
    """The ``TrainConfig`` in a run folder's ``config.json``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; is this a pyro_vae run folder?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}")
    if isinstance(raw.get("hidden"), list):
        raw["hidden"] = tuple(raw["hidden"])
    if not isinstance(raw.get("z_dim"), int) or not raw.get("hidden"):
        raise ValueError(f"{path}: z_dim and hidden must be set")
    config = TrainConfig(**raw)
    try:
        config.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def load_run(run_dir, device="cpu") -> Tuple[torch.nn.Module, TrainConfig]:
    """The trained model and the config of a run folder, on ``device``: the best epoch's
    (``best.pt``) for a run with ``--early-stopping``, else the last one's."""
    run_dir = Path(run_dir)
    config = read_config(run_dir / "config.json")
    ckpt_path = run_dir / ("best.pt" if config.early_stopping else "checkpoint.pt")
    state = read_checkpoint(ckpt_path)
    # x_dim is stored in the checkpoint, so the data need not be loaded to rebuild the net.
    if not isinstance(state.get("x_dim"), int):
        raise ValueError(f"{ckpt_path}: checkpoint has no x_dim")
    vae = build_vae(config, state["x_dim"])
    load_checkpoint(ckpt_path, vae, state=state)
    return vae.to(device), config


def evaluate_run(run_dir, samples: int = 5000, chunk: int = 100, split: str = "test",
                 limit: Optional[int] = None, device: str = "auto", seed: int = 0,
                 progress: bool = True, surgery_points: Optional[int] = None) -> dict:
    """Evaluate a run folder on one of its splits; writes ``eval.json`` and
    ``elbo_surgery.png`` there and returns the results. ``surgery_points``: ELBO surgery
    on the first N evaluated points only (default: all)."""
    if split not in ("train", "valid", "test"):
        raise ValueError(f"--split: {split!r} is not one of ['train', 'valid', 'test']")
    if any(v is not None and v < 1 for v in (samples, chunk, limit, surgery_points)):
        raise ValueError("--samples, --chunk, --limit and --surgery-points must be >= 1")
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    vae, config = load_run(run_dir, dev)
    data = dict(zip(("train", "valid", "test"), load_data(config)))[split]
    data = data.subset(limit).to(dev)
    vae.eval()
    ll = log_likelihood(vae, data, samples, chunk, seed=seed, progress=progress)
    results = {
        "split": split,
        "guide": config.guide,
        "num_points": len(data),
        "num_samples": samples,
        "test_elbo": evaluate_elbo(vae, data, plain_elbo(make_elbo(config.loss)), seed=seed),
        "log_likelihood": ll.mean().item(),
        "log_likelihood_stderr": (ll.std() / len(ll) ** 0.5).item() if len(ll) > 1 else 0.0,
    }
    try:
        surgery = elbo_surgery(vae, data.subset(surgery_points), seed=seed)
        results.update({k: surgery[k] for k in ("reconstruction", "avg_kl",
                                                "mutual_information", "marginal_kl", "log_n")})
        results["surgery_elbo"] = surgery["elbo"]
        results["surgery_points"] = surgery["num_points"]
        plots.plot_elbo_surgery(surgery, run_dir / "elbo_surgery.png")
    except ValueError as e:  # a model with more than one latent layer
        results["surgery_skipped"] = str(e)
    diagnostics = active_units(vae, data)
    results.update(active_units=diagnostics["active_units"],
                   activity=diagnostics["activity"], kl_per_dim=diagnostics["kl_per_dim"])
    _write_json(run_dir / "eval.json", results)
    return results

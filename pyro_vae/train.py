"""fit(): the SVI loop, epoch callbacks, and safe checkpoints."""

import contextlib
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

import pyro
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import torch_item, zero_grads
from pyro.optim import Adam, ClippedAdam

from .evaluation import elbo as evaluate_elbo
from .objectives import (beta_at, check_objective, make_elbo, plain_elbo_loss,
                         scales_with_data_size, warn_if_monte_carlo_kl)

OPTIMIZERS = ("adam", "clipped_adam")

Callback = Callable[[Dict, torch.nn.Module], None]


logger = logging.getLogger("pyro_vae")


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN or infinite."""


def _guarded_step(svi: SVI, *args, **kwargs) -> Tuple[float, Optional[str]]:
    """``svi.step`` (same body as Pyro's), except that when the loss or a gradient is not
    finite no parameter is updated. Returns the loss and None, or the loss and the name
    of the first non-finite quantity ("loss" or "gradient of decoder.0.weight")."""
    with poutine.trace(param_only=True) as capture:
        loss = torch_item(svi.loss_and_grads(svi.model, svi.guide, *args, **kwargs))
    sites = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    params = set(sites.values())
    bad = None
    if not math.isfinite(loss):
        bad = "loss"
    else:
        grads = [p.grad for p in params if p.grad is not None]
        # One reduction and one host sync for all gradients; names only on failure.
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            bad = next((f"gradient of {name.replace('$$$', '.')}"
                        for name, p in sites.items()
                        if p.grad is not None and not torch.isfinite(p.grad).all()), None)
    if bad is None:
        svi.optim(params)
    zero_grads(params)
    return loss, bad


def make_optimizer(name: str = "adam", lr: float = 1e-3, clip_norm: float = 10.0):
    """Pyro's ``Adam`` or ``ClippedAdam`` (gradient norm clipped to ``clip_norm``).

    ``Adam`` uses PyTorch's fused kernel: Pyro keeps one optimizer per parameter tensor,
    and the fused update cuts that per-call overhead (about 3 ms of a 14 ms step on the
    784-400-50 MNIST network on a 2-core CPU; see benchmarks/train_speed.py).
    """
    if name == "adam":
        return Adam({"lr": lr, "fused": True})
    if name == "clipped_adam":
        return ClippedAdam({"lr": lr, "clip_norm": clip_norm})
    raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")


def fit(vae, train, valid=None, *, epochs: int = 10, loss: str = "meanfield",
        num_particles: int = 1, beta: float = 1.0, warmup_epochs: int = 0,
        batch_size: int = 128, lr: float = 1e-3,
        optimizer: str = "adam", clip_norm: float = 10.0, seed: int = 0,
        device=None, callbacks: Sequence[Callback] = (), progress: bool = True,
        validate: bool = True, freeze_model: bool = False,
        skip_nonfinite: int = 0) -> List[Dict]:
    """Train ``vae`` on ``train`` with ``pyro.infer.SVI`` and return the per-epoch history.

    Each step estimates the objective of the whole training set from one minibatch (the
    ``"data"`` plate scales it by N / B) and takes one optimizer step. ``loss`` is
    ``"trace"``, ``"meanfield"`` or ``"iwae"`` (see ``pyro_vae.objectives``).

    ``beta`` weights the KL term (beta-VAE, Higgins et al. 2017); with ``warmup_epochs``
    W it rises linearly from 0 at epoch 1 to ``beta`` at epoch W + 1.

    After each epoch a record ``{"epoch", "beta", "train_elbo", "valid_elbo", "seconds"}``
    is appended to the history and passed to every ``callback(record, vae)``. Values are
    per data point, in nats: ``train_elbo`` is the training objective (the beta-weighted
    ELBO, or the IWAE bound) averaged over the epoch's minibatches; ``valid_elbo`` is the
    plain ELBO (beta = 1) of ``valid``; ``seconds`` excludes validation.

    ``device``: move the model and data there; by default the model's device is used.
    ``validate``: check distribution arguments and supports on the first step.
    Every step checks the loss and the gradients before the update: a non-finite value
    changes no parameter and stops training with ``TrainingDiverged`` naming the epoch,
    the step and the quantity; ``skip_nonfinite`` such steps are skipped (and logged)
    first. Skipped steps do not count in ``train_elbo``.
    ``freeze_model``: train the guide's parameters only; the decoder, the likelihood and
    the prior stay as they are (to fit a new guide to a trained model, see
    ``VAE.swap_guide``; a prior built on the guide's own encoder would move, and is
    refused).
    Clears Pyro's parameter store first: PyroModule registers parameters by name, and a
    stale entry from an earlier model of the same shape would be optimized instead.
    """
    if skip_nonfinite < 0:
        raise ValueError(f"skip_nonfinite must be >= 0, got {skip_nonfinite}")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    check_objective(loss, beta, warmup_epochs)
    device = torch.device(device) if device is not None else _module_device(vae)
    vae.to(device)
    train = train.to(device)
    valid = valid.to(device) if valid is not None else None
    check_data(vae, train, valid, batch_size=batch_size)

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    objective = make_elbo(loss, num_particles)
    probe = next(train.batches(2, False))  # two points to trace the model and guide on
    guide_only = _guide_only(vae, probe) if freeze_model else None
    with guide_only or contextlib.nullcontext(vae.model) as model:
        svi = SVI(model, vae.guide, make_optimizer(optimizer, lr, clip_norm), objective)
        with torch.no_grad(), pyro.validation_enabled(False):  # a diagnostic: never raise here
            warn_if_monte_carlo_kl(loss, vae.model, vae.guide, probe)
        # The IWAE bound runs unscaled (see pyro_vae.objectives); the rest see N / B.
        num_data = len(train) if scales_with_data_size(loss) else None
        valid_loss = plain_elbo_loss(loss)

        n = len(train)
        steps = math.ceil(n / batch_size)
        history = []
        skipped = 0  # non-finite steps skipped so far
        vae.train()
        for epoch in range(1, epochs + 1):
            beta_e = beta_at(epoch, beta, warmup_epochs)
            start = time.perf_counter()
            total = 0.0  # -objective summed over the epoch's data points
            seen = 0
            bar = tqdm(train.batches(batch_size, generator=generator), total=steps,
                       desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False,
                       dynamic_ncols=True)
            for step, xb in enumerate(bar):
                try:
                    # Distribution checks run on the very first step, where a model or guide
                    # bug shows, and are then switched off: they cost ~15% of a step.
                    with pyro.validation_enabled(validate and epoch == 1 and step == 0):
                        batch_loss, bad = _guarded_step(svi, xb, num_data=num_data,
                                                        beta=beta_e)
                except ValueError:
                    # With validation on, NaN weights fail a distribution's argument check.
                    bad = next((f"parameter {name}" for name, p in vae.named_parameters()
                                if not torch.isfinite(p).all()), None)
                    if bad is None:
                        raise
                    batch_loss = math.nan
                if bad is not None:
                    where = f"epoch {epoch}, step {step + 1}"
                    if skipped < skip_nonfinite:
                        skipped += 1
                        logger.warning("non-finite %s at %s: step skipped, no parameter "
                                       "changed (%d of %d allowed)", bad, where, skipped,
                                       skip_nonfinite)
                        continue
                    raise TrainingDiverged(
                        f"non-finite {bad} (loss {batch_loss}) at {where}; this step changed "
                        f"no parameter; lower --lr, use --optimizer clipped_adam, or allow "
                        f"a few with --skip-nonfinite")
                # -ELBO of the batch: the step's loss estimates it for the whole set if scaled.
                total += batch_loss * len(xb) / n if num_data else batch_loss
                seen += len(xb)
                if step % 10 == 0:
                    bar.set_postfix(elbo=f"{-total / seen:.2f}")
            bar.close()
            train_seconds = time.perf_counter() - start
            record = {"epoch": epoch, "beta": beta_e, "train_elbo": -total / max(seen, 1),
                      "valid_elbo": None, "seconds": train_seconds}
            if valid is not None:
                record["valid_elbo"] = evaluate_elbo(vae, valid, valid_loss, num_particles)
            history.append(record)
            if progress:
                tqdm.write(_format(record))
            for callback in callbacks:
                callback(record, vae)
        return history


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

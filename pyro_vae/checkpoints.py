"""What a run saves: the training state (one dataclass, one layout, a format version),
checkpoint files written atomically and read without unpickling, and the random number
generators training draws from."""

import copy
import dataclasses
import errno
import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .distributed import World
from .files import open_regular
from .statecheck import (check_history, check_optimizer_layout, check_optimizer_state,
                         check_progress, check_rng_state)

logger = logging.getLogger("pyro_vae")


@dataclasses.dataclass
class Position:
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

    def next_epoch(self) -> "Position":
        """The position at the start of the next epoch (no step done, a new order)."""
        return Position(self.num_data, self.batch_size, self.epoch + 1, skipped=self.skipped)


@dataclasses.dataclass
class TrainState:
    """Everything a run needs to continue exactly, but the model's weights: the position,
    the history so far, the optimizer's state (with its parameters' names) and every
    random number generator; and what must not change on resume: the objective
    (``objectives.describe_elbo``), the trained parameters' names and shapes, and the
    ``fingerprint`` of the weights it was saved with. ``to_dict`` / ``from_dict`` are the
    one place its layout is written and read (plain tensors and containers:
    ``torch.load(weights_only=True)`` reads it back)."""

    FORMAT = 3  # 2: without objective, parameters and fingerprint; 1: nor "format"

    position: Position
    history: List[Dict]
    optimizer: Dict  # {"parameters": [names], "state": optimizer.state_dict()}
    rng: Dict
    objective: Optional[Dict] = None  # None in formats 1 and 2: not checked on resume
    parameters: Optional[Dict[str, List[int]]] = None  # name -> shape
    fingerprint: Optional[str] = None

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def to_dict(self) -> Dict:
        """The state as plain tensors and containers (what a checkpoint file holds;
        ``from_dict`` reads it back)."""
        position = dataclasses.asdict(self.position)
        if self.position.order is not None:
            position["order"] = self.position.order.cpu()
        return {"format": self.FORMAT, "position": position, "history": self.history,
                "optimizer": self.optimizer, "rng": self.rng, "objective": self.objective,
                "parameters": self.parameters, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, state, where: str = "resume") -> "TrainState":
        """The state ``to_dict`` wrote; a one-line error naming ``where`` otherwise. A
        ``TrainState`` is checked the same way."""
        if isinstance(state, cls):
            state = state.to_dict()
        fmt = state.get("format", 1) if isinstance(state, dict) else None
        if fmt not in (1, 2, cls.FORMAT):
            raise ValueError(f"{where}: not a training state of a known format "
                             f"(format {fmt!r}; this version reads 1 to {cls.FORMAT})")
        for key, kind in (("position", dict), ("history", list), ("optimizer", dict),
                          ("rng", dict)):
            if not isinstance(state.get(key), kind):
                raise ValueError(f"{where}: training.{key} must be a "
                                 f"{kind.__name__}, got {_short(state.get(key))}")
        position = _checked_position(state["position"], f"{where}: training.position")
        history = state["history"]
        if not all(isinstance(r, dict) and r.get("epoch") == i + 1
                   for i, r in enumerate(history)):
            raise ValueError(f"{where}: training.history must be the records of epochs "
                             f"1, 2, ... in order")
        optimizer = state["optimizer"]
        if not (isinstance(optimizer.get("parameters"), list)
                and isinstance(optimizer.get("state"), dict)):
            raise ValueError(f"{where}: training.optimizer must hold 'parameters' (a "
                             f"list) and 'state' (a dict)")
        check_history(history, f"{where}: training.history")
        check_progress(position, len(history), f"{where}: training.position")
        check_optimizer_layout(optimizer, f"{where}: training.optimizer")
        check_rng_state(state["rng"], f"{where}: training.rng")
        return cls(position, [dict(r) for r in history], optimizer, state["rng"],
                   **_checked_identity(state, fmt, where))

    def check_data(self, num_data: int, batch_size: int, where: str = "resume") -> None:
        """Refuse a state saved on other data (its order and totals would not fit)."""
        pos = self.position
        if (pos.num_data, pos.batch_size) != (num_data, batch_size):
            raise ValueError(f"{where}: the state was saved training on {pos.num_data} "
                             f"points in batches of {pos.batch_size}, not {num_data} "
                             f"in batches of {batch_size}")


def _checked_identity(state: dict, fmt: int, where: str) -> dict:
    """The objective, parameter shapes and fingerprint of a format-3 state, each of its
    kind (a format 1 or 2 state has none: they are not checked)."""
    if fmt < 3:
        return {}
    objective, parameters, print_ = (state.get(k) for k in ("objective", "parameters",
                                                           "fingerprint"))
    if not (isinstance(objective, dict) and isinstance(objective.get("class"), str)):
        raise ValueError(f"{where}: training.objective must be a dict with a 'class', got "
                         f"{_short(objective)}")
    if not (isinstance(parameters, dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(type(n) is int for n in v)
            for k, v in parameters.items())):
        raise ValueError(f"{where}: training.parameters must map names to shapes (lists "
                         f"of integers)")
    if not (isinstance(print_, str) and len(print_) == 64):
        raise ValueError(f"{where}: training.fingerprint must be a sha256 hex digest, got "
                         f"{_short(print_)}")
    return {"objective": objective, "parameters": parameters, "fingerprint": print_}


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of ``module``'s state dict (names, dtypes, shapes and bytes, in order):
    equal for bitwise equal weights on any device."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Position's fields: (type, smallest value).
_POSITION = {"num_data": (int, 1), "batch_size": (int, 1), "epoch": (int, 1),
             "step": (int, 0), "seen": (int, 0), "skipped": (int, 0),
             "total": (float, None), "seconds": (float, 0.0)}


def _checked_position(raw: dict, where: str) -> Position:
    """A ``Position`` from a checkpoint, each field of its type and range, and the
    epoch's order a permutation of the data; one line naming the field otherwise."""
    unknown = sorted(set(raw) - set(_POSITION) - {"order"})
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}")
    for name, (kind, low) in _POSITION.items():
        value = raw.get(name)
        number = type(value) in ((int, float) if kind is float else (int,))
        if not number or not math.isfinite(value) or (low is not None and value < low):
            raise ValueError(f"{where}.{name} must be a finite {kind.__name__}"
                             f"{f' >= {low}' if low is not None else ''}, got "
                             f"{_short(value)}")
    order = raw.get("order")
    if order is not None and not (
            isinstance(order, torch.Tensor) and order.dtype == torch.int64
            and order.shape == (raw["num_data"],)
            and torch.equal(order.sort().values, torch.arange(raw["num_data"]))):
        raise ValueError(f"{where}.order must be a permutation of the "
                         f"{raw['num_data']} points")
    return Position(**raw)


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: List[str], saved: Dict,
                         lr: float, clip_norm: float, where: str = "resume") -> None:
    """Load a saved optimizer state, with the learning rate (and clipping bound) of this
    call: a resumed run may lower them. The state is checked against the optimizer's
    parameters first (``check_optimizer_state``)."""
    if saved["parameters"] != names:
        diff = next((f"{a!r} saved, {b!r} now" for a, b in zip(saved["parameters"], names)
                     if a != b), f"{len(saved['parameters'])} saved, {len(names)} now")
        raise ValueError(f"{where}: the saved optimizer state is for other parameters "
                         f"({diff}); resume the model it was saved with")
    check_optimizer_state(saved, dict(zip(names, (p for g in optimizer.param_groups
                                                   for p in g["params"]))),
                          f"{where}: training.optimizer", optimizer)
    state = copy.deepcopy(saved["state"])
    for group in state["param_groups"]:
        group["lr"] = lr
        if "clip_norm" in group:
            group["clip_norm"] = clip_norm
    optimizer.load_state_dict(state)


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


CHECKPOINT_FORMAT = "pyro_vae.checkpoint/1"


def atomic_write(path, write: Callable, binary: bool = True) -> None:
    """Write ``path`` so that a crash leaves either the old file or the new one, never a
    mix: ``write(f)`` fills a temporary file in the same folder, which is flushed, fsynced
    and renamed over ``path`` (``os.replace`` is atomic), and the folder is fsynced so the
    rename itself survives a power loss. The file gets the permissions of any new file
    (0666 less the umask). On failure the temporary file is removed and the old file is
    left as it was; a full disk or a refused permission is one line naming the file. A
    temporary file left by a killed process is never read (readers open ``path`` only)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # the file written, not a name
        os.replace(tmp, path)  # replaces a link at path; never writes through it
        _fsync_folder(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        raise _write_error(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: Path, e: Exception) -> OSError:
    """One line for a failed write: a full disk and a refused permission said plainly."""
    code = getattr(e, "errno", None)
    try:
        full = code == errno.ENOSPC or shutil.disk_usage(path.parent).free == 0
    except OSError:
        full = False
    if full:
        return OSError(f"{path}: not written, the disk is full; free some space (the "
                       f"previous version of the file is intact)")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OSError(f"{path}: not written, permission denied ({e.strerror})")
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return OSError(f"{path}: not written ({reason})")


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
    A path that is not a regular file (a FIFO, a device) is refused in one line.
    """
    path = Path(path)
    try:
        with open_regular(path, "checkpoint") as f:  # not a FIFO or a device
            state = torch.load(f, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except (ValueError, OSError) as e:
        if str(e).startswith(f"{path}: "):  # open_regular's refusal
            raise
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: not a readable pyro_vae checkpoint "
                         f"({type(e).__name__}: {reason})") from None
    except Exception as e:  # corrupt, truncated or not a weights-only file
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: not a readable pyro_vae checkpoint "
                         f"({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a pyro_vae checkpoint (no {CHECKPOINT_FORMAT!r} tag)")
    model = state.get("model")
    if not (isinstance(model, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in model.items())):
        raise ValueError(f"{path}: model must be a state dict (names to tensors), got "
                         f"{type(model).__name__}")
    bad = next((k for k, v in model.items()
                if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{path}: model.{bad} holds NaN or infinite values")
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


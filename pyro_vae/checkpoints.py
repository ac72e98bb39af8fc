"""What a run saves: the training state (one dataclass, one layout, a format version),
checkpoint files written atomically and read without unpickling, and the random number
generators training draws from."""

import copy
import dataclasses
import errno
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
        return Position(self.num_data, self.batch_size, self.epoch + 1, skipped=self.skipped)


@dataclasses.dataclass
class TrainState:
    """Everything a run needs to continue exactly, but the model's weights: the position,
    the history so far, the optimizer's state (with its parameters' names) and every
    random number generator. ``to_dict`` / ``from_dict`` are the one place its layout is
    written and read (plain tensors and containers: ``torch.load(weights_only=True)``
    reads it back)."""

    FORMAT = 2  # 1: the same layout without the "format" key

    position: Position
    history: List[Dict]
    optimizer: Dict  # {"parameters": [names], "state": optimizer.state_dict()}
    rng: Dict

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def to_dict(self) -> Dict:
        position = dataclasses.asdict(self.position)
        if self.position.order is not None:
            position["order"] = self.position.order.cpu()
        return {"format": self.FORMAT, "position": position, "history": self.history,
                "optimizer": self.optimizer, "rng": self.rng}

    @classmethod
    def from_dict(cls, state, where: str = "resume") -> "TrainState":
        """The state ``to_dict`` wrote; a one-line error naming ``where`` otherwise. A
        ``TrainState`` is checked the same way."""
        if isinstance(state, cls):
            state = state.to_dict()
        fmt = state.get("format", 1) if isinstance(state, dict) else None
        if fmt not in (1, cls.FORMAT):
            raise ValueError(f"{where}: not a training state of a known format "
                             f"(format {fmt!r}; this version reads 1 and {cls.FORMAT})")
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
        _check_history(history, f"{where}: training.history")
        _check_progress(position, len(history), f"{where}: training.position")
        _check_optimizer_layout(optimizer, f"{where}: training.optimizer")
        _check_rng_state(state["rng"], f"{where}: training.rng")
        return cls(position, [dict(r) for r in history], optimizer, state["rng"])

    def check_data(self, num_data: int, batch_size: int, where: str = "resume") -> None:
        """Refuse a state saved on other data (its order and totals would not fit)."""
        pos = self.position
        if (pos.num_data, pos.batch_size) != (num_data, batch_size):
            raise ValueError(f"{where}: the state was saved training on {pos.num_data} "
                             f"points in batches of {pos.batch_size}, not {num_data} "
                             f"in batches of {batch_size}")


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


def _real(value) -> bool:
    """A finite int or float (not a bool)."""
    return type(value) in (int, float) and math.isfinite(value)


def _check_progress(position: Position, epochs_done: int, where: str) -> None:
    """The position agrees with the history and the data: the epoch after the history's
    last, a step within the epoch's batches, the epoch's order drawn once a step is done,
    and no more points seen than those steps took."""
    steps = math.ceil(position.num_data / position.batch_size)
    if position.epoch != epochs_done + 1:
        raise ValueError(f"{where}.epoch is {position.epoch}, but the history holds "
                         f"{epochs_done} epochs (expected epoch {epochs_done + 1})")
    if position.step > steps:
        raise ValueError(f"{where}.step must be <= {steps} (the batches of {position.num_data} "
                         f"points in batches of {position.batch_size}), got {position.step}")
    if position.step > 0 and position.order is None:
        raise ValueError(f"{where}.order is missing, but {position.step} steps of the epoch "
                         f"are done")
    most = min(position.num_data, position.step * position.batch_size)
    if position.seen > most:
        raise ValueError(f"{where}.seen must be <= {most} (the points of {position.step} "
                         f"steps), got {position.seen}")


def _check_history(history: List[Dict], where: str) -> None:
    """Each epoch's record holds plain values (numbers, text, null), and a finite beta,
    training ELBO and time."""
    for i, record in enumerate(history):
        for key, value in record.items():
            if not isinstance(key, str) or not (value is None or type(value) in (
                    bool, int, float, str)):
                raise ValueError(f"{where}[{i}].{key} must be a number, text or null, "
                                 f"got {_short(value)}")
        for key in ("beta", "train_elbo", "seconds"):
            if not _real(record.get(key)):
                raise ValueError(f"{where}[{i}].{key} must be a finite number, got "
                                 f"{_short(record.get(key))}")
        bad = next((k for k, v in record.items() if k.startswith("valid_") and v is not None
                    and type(v) not in (int, float)), None)
        if bad is not None:
            raise ValueError(f"{where}[{i}].{bad} must be a number or null, got "
                             f"{_short(record[bad])}")


# Adam's (and ClippedAdam's) state of one parameter; with amsgrad, max_exp_avg_sq too.
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
# Options of a parameter group that must lie in a range (lr and clip_norm are replaced
# by the resuming call's): name -> (smallest, strictly above it).
_GROUP_NUMBERS = {"eps": (0.0, True), "weight_decay": (0.0, False), "lrd": (0.0, True)}


def _check_optimizer_layout(saved: Dict, where: str) -> None:
    """The layout of ``{"parameters": names, "state": optimizer.state_dict()}``: distinct
    names, groups that hold each parameter index once, each group's options in range, and
    each parameter's state the tensors Adam keeps, finite, with a whole step >= 0."""
    names = saved["parameters"]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{where}.parameters must be distinct parameter names")
    state = saved["state"]
    groups, entries = state.get("param_groups"), state.get("state")
    if not (isinstance(groups, list) and groups and isinstance(entries, dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in groups)):
        raise ValueError(f"{where}.state must hold 'param_groups' (a list of groups with "
                         f"'params') and 'state' (a dict)")
    indices = [i for g in groups for i in g["params"]]
    if not (all(type(i) is int for i in indices)
            and sorted(indices) == list(range(len(names)))):
        raise ValueError(f"{where}.state.param_groups must hold each of the {len(names)} "
                         f"parameters' indices once, got {_short(indices)}")
    group_of = {}
    for g, group in enumerate(groups):
        _check_group(group, f"{where}.state.param_groups[{g}]")
        group_of.update(dict.fromkeys(group["params"], group))
    for key, entry in entries.items():
        if key not in group_of or not isinstance(entry, dict):
            raise ValueError(f"{where}.state.state holds {_short(key)}, not the state of one "
                             f"of the {len(names)} parameters")
        _check_entry(entry, bool(group_of[key].get("amsgrad")),
                     f"{where}.state.state[{key}]")


def _check_group(group: Dict, where: str) -> None:
    betas = group.get("betas")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_real(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"{where}.betas must be two numbers in [0, 1), got {_short(betas)}")
    for key, (low, strict) in _GROUP_NUMBERS.items():
        value = group.get(key, low + 1)
        if not (_real(value) and (value > low if strict else value >= low)):
            raise ValueError(f"{where}.{key} must be a finite number "
                             f"{'>' if strict else '>='} {low:g}, got {_short(value)}")


def _check_entry(entry: Dict, amsgrad: bool, where: str) -> None:
    expected = set(_ADAM_STATE) | ({"max_exp_avg_sq"} if amsgrad else set())
    if set(entry) != expected:
        raise ValueError(f"{where} must hold {sorted(expected)}, got {_short(sorted(entry, key=str))}")
    step = entry["step"]
    if isinstance(step, torch.Tensor) and step.dim() == 0:
        step = step.item()
    if not (_real(step) and step >= 0 and step == int(step)):
        raise ValueError(f"{where}.step must be a whole number >= 0, got {_short(step)}")
    for key in sorted(expected - {"step"}):
        t = entry[key]
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()
                and bool(torch.isfinite(t).all())
                and (key == "exp_avg" or not bool((t < 0).any()))):
            raise ValueError(f"{where}.{key} must be a tensor of finite "
                             f"{'' if key == 'exp_avg' else 'non-negative '}values")


def check_optimizer_state(saved: Dict, params: Dict[str, torch.Tensor], where: str,
                          optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Refuse, in one line naming ``where`` and the field, a saved optimizer state that
    does not fit ``params`` (name -> parameter, the model's): a name it lacks, a state
    tensor of another shape, dtype or device than its parameter (a fused Adam trusts
    these: a wrong shape corrupts memory). With ``optimizer`` (built on ``params``), its
    groups' sizes and flags (``fused``, ``amsgrad``, ...) must be the saved ones too."""
    _check_optimizer_layout(saved, where)
    names, groups = saved["parameters"], saved["state"]["param_groups"]
    unknown = next((n for n in names if n not in params), None)
    if unknown is not None:
        raise ValueError(f"{where}: the saved optimizer state is for other parameters "
                         f"({unknown!r} is not one of this model's)")
    if optimizer is not None:
        _check_groups_match(groups, optimizer.param_groups, where)
    # The j-th index of the saved groups, in order, is the j-th parameter (load_state_dict).
    name_of = dict(zip((i for g in groups for i in g["params"]), names))
    for key, entry in saved["state"]["state"].items():
        param = params[name_of[key]]
        for field, t in entry.items():
            if field != "step" and (t.shape != param.shape or t.dtype != param.dtype
                                    or t.device.type not in ("cpu", param.device.type)):
                raise ValueError(
                    f"{where}.state.state[{key}].{field} is {t.dtype} {tuple(t.shape)} on "
                    f"{t.device.type}; parameter {name_of[key]} is {param.dtype} "
                    f"{tuple(param.shape)} on {param.device.type}")


def _check_groups_match(groups: List[Dict], live: List[Dict], where: str) -> None:
    sizes = [len(g["params"]) for g in live]
    if [len(g["params"]) for g in groups] != sizes:
        raise ValueError(f"{where}.state.param_groups hold {[len(g['params']) for g in groups]} "
                         f"parameters; the optimizer's hold {sizes}")
    for g, (group, mine) in enumerate(zip(groups, live)):
        unknown = sorted(set(group) - set(mine), key=str)
        if unknown:
            raise ValueError(f"{where}.state.param_groups[{g}] has unknown options "
                             f"{_short(unknown)}")
        for key, value in mine.items():
            if (isinstance(value, bool) or value is None) and key in group and (
                    type(group[key]) is not type(value) or group[key] != value):
                raise ValueError(f"{where}.state.param_groups[{g}].{key} is "
                                 f"{_short(group[key])}; this optimizer has {value!r}")


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: List[str], saved: Dict,
                         lr: float, clip_norm: float, where: str = "resume") -> None:
    """Load a saved optimizer state, with the learning rate (and clipping bound) of this
    call: a resumed run may lower them. The state is checked against the optimizer's
    parameters first (``check_optimizer_state``)."""
    if saved["parameters"] != names:
        raise ValueError(f"{where}: the saved optimizer state is for other parameters "
                         f"({len(saved['parameters'])} saved, {len(names)} now)")
    check_optimizer_state(saved, dict(zip(names, (p for g in optimizer.param_groups
                                                   for p in g["params"]))),
                          f"{where}: training.optimizer", optimizer)
    state = copy.deepcopy(saved["state"])
    for group in state["param_groups"]:
        group["lr"] = lr
        if "clip_norm" in group:
            group["clip_norm"] = clip_norm
    optimizer.load_state_dict(state)


def _check_rng_state(rng: Dict, where: str) -> None:
    """What ``get_rng_state`` saves, each generator's state of its kind and size (a state
    of another size is refused here, not half-restored)."""
    size = torch.get_rng_state().numel()

    def byte_state(value, name, numel=None):
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8
                and value.dim() == 1 and (numel is None or value.numel() == numel)):
            raise ValueError(f"{where}.{name} must be a generator state (a uint8 tensor"
                             f"{f' of {numel} bytes' if numel else ''}), got {_short(value)}")

    unknown = sorted(set(rng) - {"torch", "python", "numpy", "generator",
                                 "generator_device", "cuda", "ranks"}, key=str)
    if unknown:
        raise ValueError(f"{where}: unknown fields {_short(unknown)}")
    byte_state(rng.get("torch"), "torch", size)
    if rng.get("generator_device") not in ("cpu", "cuda"):
        raise ValueError(f"{where}.generator_device must be 'cpu' or 'cuda', got "
                         f"{_short(rng.get('generator_device'))}")
    byte_state(rng.get("generator"), "generator",
               size if rng["generator_device"] == "cpu" else None)
    python = rng.get("python")
    if not (isinstance(python, tuple) and len(python) == 3 and python[0] == 3
            and isinstance(python[1], tuple) and len(python[1]) == 625
            and all(type(k) is int and 0 <= k < 2 ** 32 for k in python[1])
            and python[1][-1] <= 624 and (python[2] is None or _real(python[2]))):
        raise ValueError(f"{where}.python must be a state of Python's random module")
    numpy = rng.get("numpy")
    if not (isinstance(numpy, dict) and set(numpy) == {"keys", "pos", "has_gauss",
                                                       "cached_gaussian"}
            and isinstance(numpy["keys"], torch.Tensor) and numpy["keys"].shape == (624,)
            and numpy["keys"].dtype == torch.int64
            and bool(((numpy["keys"] >= 0) & (numpy["keys"] < 2 ** 32)).all())
            and type(numpy["pos"]) is int and 0 <= numpy["pos"] <= 624
            and numpy["has_gauss"] in (0, 1) and _real(numpy["cached_gaussian"])):
        raise ValueError(f"{where}.numpy must be a state of NumPy's MT19937 generator")
    for i, value in enumerate(_listed(rng.get("cuda", []), f"{where}.cuda")):
        byte_state(value, f"cuda[{i}]")
    for i, streams in enumerate(_listed(rng.get("ranks", []), f"{where}.ranks")):
        if not (isinstance(streams, dict) and "torch" in streams
                and set(streams) <= {"torch", "cuda"}):
            raise ValueError(f"{where}.ranks[{i}] must hold the process's 'torch' (and "
                             f"'cuda') streams")
        byte_state(streams["torch"], f"ranks[{i}].torch", size)
        if "cuda" in streams:
            byte_state(streams["cuda"], f"ranks[{i}].cuda")


def _listed(value, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list, got {_short(value)}")
    return list(value)


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


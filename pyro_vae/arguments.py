"""One-line checks of the Python API's arguments, where the command line checks its
options: a value of the wrong kind, a device that is not there, hooks that are not hooks.
Each raises ``ArgumentError`` naming the argument (the command line shows its option)."""

import math

import torch

from .errors import ArgumentError
from .hooks import Hook, _FunctionHook


#: Seeds run from 0 to 2**32 - 1 (NumPy's range; ``pyro.set_rng_seed`` seeds it too).
MAX_SEED = 2 ** 32

# Options by kind (a Python value of another kind is refused before its range is read).
_INTEGERS = ("epochs", "num_particles", "warmup_epochs", "batch_size", "seed",
             "skip_nonfinite", "checkpoint_every", "early_stopping")
_NUMBERS = ("beta", "lr", "clip_norm")
_FLAGS = ("validate", "freeze_model", "compile", "allow_loss_change")
_NAMES = ("optimizer", "monitor", "precision")


def check_option_kinds(o) -> None:
    """One line naming the argument for a value of ``fit``'s options (``o``, an
    ``Options``) of the wrong kind: a count that is not an integer (or is a bool), a
    number given as text, a flag that is not a bool, a name that is not text."""
    for name in _INTEGERS + (("check_every",) if o.check_every is not None else ()):
        value = getattr(o, name)
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise ArgumentError(name, f"must be an integer, got {value!r}")
    for name in _NUMBERS:
        value = getattr(o, name)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ArgumentError(name, f"must be a number, got {value!r}")
    for name in _FLAGS:
        if not isinstance(getattr(o, name), bool):
            raise ArgumentError(name, f"must be True or False, got {getattr(o, name)!r}")
    for name in _NAMES:
        if not isinstance(getattr(o, name), str):
            raise ArgumentError(name, f"must be a name (str), got {getattr(o, name)!r}")
    sites = o.beta_sites
    if sites is not None and not (isinstance(sites, (tuple, list))
                                  and all(isinstance(s, str) for s in sites)):
        raise ArgumentError("beta_sites", f"must be a list of site names, got {sites!r}")


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` this package trains on (the CPU, or a CUDA device
    that exists here); one line naming the argument otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ArgumentError("device", f"{device!r} is not a device this package trains on "
                                      f"(cpu, cuda, cuda:N)")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ArgumentError("device", f"{device!r} asked for, but CUDA is not available")
        if parsed.index is not None and parsed.index >= count:
            raise ArgumentError("device", f"{device!r} asked for, but this machine has "
                                          f"{count} CUDA device{'s' * (count > 1)}")
    return parsed


def check_hooks(hooks) -> list:
    """``hooks`` as a list of ``Hook`` objects: a plain function becomes an ``on_epoch_end``
    hook; anything else is refused in one line, before training starts."""
    if isinstance(hooks, (Hook, str, bytes)) or callable(hooks) or not hasattr(
            hooks, "__iter__"):
        raise ArgumentError("hooks", f"must be a list of hooks, got {type(hooks).__name__}")
    hooks = list(hooks)
    bad = next((h for h in hooks if not (isinstance(h, Hook) or callable(h))), None)
    if bad is not None:
        raise ArgumentError("hooks", f"holds {type(bad).__name__}, neither a "
                                     f"pyro_vae.Hook nor a function of (record, history, "
                                     f"model)")
    return [h if isinstance(h, Hook) else _FunctionHook(h) for h in hooks]


def check_counts(**counts) -> None:
    """One line naming the argument for a count that is not an integer >= 1."""
    for name, value in counts.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ArgumentError(name, f"must be an integer >= 1, got {value!r}")


def check_number(name: str, value, low: float = 0.0) -> None:
    """One line naming the argument for a value that is not a finite number >= ``low``."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and low <= value < math.inf):
        raise ArgumentError(name, f"must be a finite number >= {low:g}, got {value!r}")

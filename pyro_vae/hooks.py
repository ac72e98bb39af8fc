"""Hooks: what the trainer calls on process 0 after each epoch and at each checkpoint.

``on_epoch_end(record, history, model)`` (return True to stop) and
``on_checkpoint(state)``; a plain function is an ``on_epoch_end`` hook. Early stopping,
keep-best, the metrics file and the checkpoint file are hooks: a run folder is the
trainer plus the last three (``pyro_vae.runs.RunFolder.hooks``), and early stopping when
asked for.
"""

import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .checkpoints import TrainState, save_checkpoint
from .files import append_text

logger = logging.getLogger("pyro_vae")


class Hook:
    """Called by the trainer on process 0. Override what you need."""

    def on_epoch_end(self, record: Dict, history: List[Dict], model) -> Optional[bool]:
        """After each epoch (``record`` is ``history[-1]``); return True to stop."""

    def on_checkpoint(self, state: TrainState) -> None:
        """With the training state, before the first step, after every epoch, every
        ``checkpoint_every`` steps and before ``TrainingDiverged`` is raised."""


class _FunctionHook(Hook):
    def __init__(self, fn: Callable):
        self.fn = fn

    def on_epoch_end(self, record, history, model):
        return self.fn(record, history, model)


def stopped_early(history: Sequence[Dict], patience: int, monitor: str = "valid_elbo") -> bool:
    """Whether ``patience`` epochs have passed since the best ``monitor`` value."""
    return bool(patience) and len(history) - best_epoch(history, monitor) >= patience


def higher_is_better(monitor: str) -> bool:
    """An ELBO is maximized; a record field named ``..._error`` (a classification error,
    in percent) is minimized."""
    return not monitor.endswith("error")


def best_epoch(history: Sequence[Dict], monitor: str = "valid_elbo") -> int:
    """The epoch (1-based) of the best ``monitor`` value in ``history`` (``valid_elbo``,
    highest, by default; ``valid_error``, lowest), the first on a tie; 0 when no epoch
    has one."""
    sign = 1 if higher_is_better(monitor) else -1
    scored = [(sign * r[monitor], -r["epoch"]) for r in history if r.get(monitor) is not None]
    return -max(scored)[1] if scored else 0


class EarlyStopping(Hook):
    """Stop after ``patience`` epochs without a better ``monitor`` value (the validation
    ELBO by default) than the best so far: a function of the history, so a resumed run
    stops where the uninterrupted one would."""

    def __init__(self, patience: int, monitor: str = "valid_elbo"):
        if not (type(patience) is int and patience >= 1):
            raise ValueError(f"EarlyStopping: patience must be an integer >= 1, got "
                             f"{patience!r}")
        self.patience, self.monitor = patience, monitor

    def on_epoch_end(self, record, history, model) -> bool:
        stop = stopped_early(history, self.patience, self.monitor)
        if stop:
            logger.info("early stopping: no better %s in %d epochs; best epoch %d",
                        self.monitor, self.patience, best_epoch(history, self.monitor))
        return stop


class KeepBest(Hook):
    """Write the model to ``path`` (``save_checkpoint``, with ``extra``) whenever an
    epoch's ``monitor`` value (the validation ELBO by default) is the best so far."""

    def __init__(self, path, model, monitor: str = "valid_elbo", **extra):
        self.path, self.model, self.monitor, self.extra = Path(path), model, monitor, extra

    def on_epoch_end(self, record, history, model):
        if record.get(self.monitor) is not None and \
                best_epoch(history, self.monitor) == record["epoch"]:
            save_checkpoint(self.path, self.model, epoch=record["epoch"],
                            valid_elbo=record["valid_elbo"], **self.extra)


class MetricsWriter(Hook):
    """Append each epoch's record to a JSON-lines file, written at once (a symbolic link
    or a hard-linked file there is refused in one line, not written through)."""

    def __init__(self, path):
        self.path = Path(path)

    def on_epoch_end(self, record, history, model):
        append_text(self.path, json.dumps(record) + "\n")  # never through a link


class Checkpointer(Hook):
    """Write ``model``'s weights and the training state to ``path`` at every checkpoint
    (atomically; ``extra`` plain values beside them). ``fit(..., resume=...)`` takes
    ``read_checkpoint(path)["training"]`` back."""

    def __init__(self, path, model, **extra):
        self.path, self.model, self.extra = Path(path), model, extra

    def on_checkpoint(self, state: TrainState) -> None:
        save_checkpoint(self.path, self.model, epoch=state.epochs_done,
                        training=state.to_dict(), **self.extra)

"""Progress bars: on a terminal only. Written to a log file, a bar leaves a line per
refresh (``epoch 1/30:  0%|  | 0/11``) and runs into the next line printed; there the
callers print one line per epoch instead."""

import sys

from tqdm.auto import tqdm


def on_terminal() -> bool:
    """Whether standard error is a terminal (where tqdm draws its bars)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def bar(iterable, enabled: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, shown only when ``enabled`` and on a terminal; it
    clears itself when done (``leave=False``)."""
    return tqdm(iterable, disable=not (enabled and on_terminal()), leave=False,
                dynamic_ncols=True, **kwargs)

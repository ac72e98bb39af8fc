"""What fits: the memory of a device, and one-line refusals of sizes that cannot be
allocated there (checked before anything is written, rather than failing mid-run)."""

import os

import torch


def device_memory(device) -> int:
    """Bytes of memory of ``device``: a CUDA device's own, else the machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no bound known
        return 1 << 62


def check_fits(nbytes: int, device, what: str, hint: str) -> None:
    """Refuse, in one line, ``nbytes`` of ``what`` that are more than ``device`` has
    (``hint``: what to lower)."""
    total = device_memory(device)
    if nbytes > total:
        raise ValueError(f"{what} need at least {_size(nbytes)}, more than the "
                         f"{_size(total)} of memory of {torch.device(device)}; {hint}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2 ** 30:.3g} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.3g} MiB"


def check_step_memory(data, batch_size: int, particles: int, device) -> None:
    """Refuse, in one line, a step that cannot fit on ``device``: its decoder's output
    alone, particles x batch x features floats, would be more than the device holds."""
    batch = min(batch_size, len(data))
    features = data.x[0].numel() if len(data) else 0
    check_fits(4 * particles * batch * features, device,
               f"steps of {particles} particles x {batch} points x {features} features",
               "lower num_particles (--particles) or batch_size (--batch-size)")

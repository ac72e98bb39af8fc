"""Multi-process training on ``torch.distributed``, as ``torchrun`` starts it.

    torchrun --nproc_per_node 4 -m pyro_vae train --dataset mnist --device cuda ...

Every process runs the same program: ``setup`` joins the process group (NCCL for CUDA
devices, gloo for the CPU) and picks this process's GPU (``LOCAL_RANK``). ``fit`` then
trains with ``DistributedDataParallel``: every process draws the same global batch (the
data order and the dynamic binarization come from one seeded generator) and trains on
its own contiguous shard of it; DDP averages the gradients, every process applies the
same update. Process 0 alone writes checkpoints, metrics and figures.
"""

import dataclasses
import os
from typing import List, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def setup(device: torch.device) -> torch.device:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): join the process group
    and return this process's device (``cuda:LOCAL_RANK`` for a CUDA ``device``). Else
    return ``device`` unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process writes files: process 0, or the only one."""
    return World.current().main


@dataclasses.dataclass
class World:
    """This process's place among ``size`` training processes (one, when not under
    ``torch.distributed``), and the few collective operations training needs."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def current(cls, device=torch.device("cpu")) -> "World":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), torch.device(device))
        return cls(device=torch.device(device))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This process's contiguous part of a global batch (sizes differ by at most 1)."""
        return torch.tensor_split(x, self.size)[self.rank] if self.size > 1 else x

    def wrap(self, module: torch.nn.Module, ignore: Sequence[str] = ()) -> torch.nn.Module:
        """``module`` under ``DistributedDataParallel``; parameters named in ``ignore``
        (not trained) are left out of the gradient averaging."""
        if ignore:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                module, list(ignore))
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """Whether ``flag`` holds on every process (no host sync on CUDA)."""
        if self.size == 1:
            return flag
        false = (~flag).to(torch.int32).reshape(1)
        dist.all_reduce(false, op=dist.ReduceOp.MAX)
        return false[0] == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``t`` over the processes."""
        if self.size > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        """``t`` (same shape everywhere) of every process, in rank order, on the CPU."""
        if self.size == 1:
            return [t.cpu()]
        local = t.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        return [p.cpu() for p in parts]

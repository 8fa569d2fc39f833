"""torch.distributed set-up for ``torchrun``: which process this is, its device, and small reductions.

Under ``torchrun`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; NCCL is used when the
process has a GPU, gloo otherwise. Without those variables everything degrades to one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup", "all_reduce_mean", "all_reduce_sum"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place: rank, world size, local rank and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for a single process).

    ``device`` "cuda" becomes ``cuda:<LOCAL_RANK>`` with NCCL; "cpu" uses gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, device)


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all processes (``t`` itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all processes."""
    if dist.is_available() and dist.is_initialized():
        return all_reduce_sum(t) / dist.get_world_size()
    return t

"""torch.distributed set-up for ``torchrun``: which process this is, its device, and small collectives.

Under ``torchrun`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; NCCL is used when the
process has a GPU, gloo otherwise. Without those variables everything degrades to one process.

Every rank must call the same collectives in the same order; one that only some ranks reach cannot
complete. The process group is therefore joined with a finite timeout (``RENYIPRUNE_DIST_TIMEOUT``
seconds, default :data:`DEFAULT_TIMEOUT_S`), so such a collective raises on the waiting ranks instead of
hanging the run forever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "DistInfo",
    "init_distributed",
    "cleanup",
    "is_distributed",
    "rank",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_gather_cat",
    "broadcast_object",
    "batch_shard",
    "timeout_seconds",
]

TIMEOUT_ENV = "RENYIPRUNE_DIST_TIMEOUT"
#: Seconds a collective may wait for the other ranks before it raises (a stuck rank, a rank that died).
DEFAULT_TIMEOUT_S = 600.0


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


def timeout_seconds(value: float | None = None) -> float:
    """The collective timeout: ``value`` if given, else ``$RENYIPRUNE_DIST_TIMEOUT``, else the default."""
    if value is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        if not text:
            return DEFAULT_TIMEOUT_S
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"the distributed timeout must be a finite number of seconds > 0, got {value}")
    return float(value)


def init_distributed(device: str = "cpu", timeout: float | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for a single process).

    ``device`` "cuda" becomes ``cuda:<LOCAL_RANK>`` with NCCL; "cpu" uses gloo. ``timeout`` (seconds,
    default :func:`timeout_seconds`) bounds every collective: one that the other ranks never join raises.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    seconds = timeout_seconds(timeout)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.startswith("cuda") else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=seconds),
        )
    return DistInfo(rank, world, local, device)


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside a joined process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the joined process group (0 when there is none)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``t`` along dim 0, in rank order (lengths may differ).

    ``t`` itself when not distributed. Booleans travel as uint8 (gloo does not reduce bool) and come
    back as bool.
    """
    if not is_distributed():
        return t
    is_bool = t.dtype == torch.bool
    local = t.to(torch.uint8) if is_bool else t
    local = local.contiguous()
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    out = torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])
    return out.bool() if is_bool else out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process (picklable objects; ``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def batch_shard(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Indices of ``range(n)`` that process ``rank`` of ``world`` evaluates: whole batches, round-robin.

    The consecutive batches of ``batch_size`` that one process would form go to processes 0, 1, ...,
    0, 1, ... in turn, so every image is computed in exactly the batch it is in with one process (the
    short last batch included, always last on its process): per-image results are one process's.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(rank * batch_size, n, world * batch_size)
    return [i for s in starts for i in range(s, min(s + batch_size, n))]

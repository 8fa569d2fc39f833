"""What a training run counts and says about itself, kept out of ``train()``: the running sums of the
epoch in progress (in every checkpoint, so a resumed epoch reports all of its steps), unreadable
training images (stop naming one, or skip and count them), and the lines that say when a run stops
early or is extended on resume.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..data.images import BadImageError, Batch, DataError, check_bad
from ..utils import distributed as D

__all__ = ["EpochTally", "readable", "reduce_step", "extend_schedule", "say"]


@dataclass
class EpochTally:
    """Sums over the steps of the epoch in progress (every process holds the same, all-reduced)."""

    loss_sum: float = 0.0
    steps: int = 0
    skipped: int = 0  # unreadable images skipped (--skip-bad), all processes together

    def add(self, loss: float, skipped: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.skipped += skipped

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.steps if self.steps else math.nan

    def record(self, epoch: int, global_step: int, seconds: float) -> dict:
        """The metrics.jsonl line of a finished epoch (``seconds``: this process's part of it)."""
        return {"kind": "epoch", "epoch": epoch, "global_step": global_step, "seconds": seconds,
                "train_loss": self.mean_loss, "steps": self.steps, "skipped": self.skipped}  # fmt: skip

    def report(self, epoch: int, main: bool) -> None:
        """Say how many unreadable images the finished epoch skipped, if any."""
        if self.skipped:
            say(f"epoch {epoch}: skipped {self.skipped} unreadable training images (--skip-bad)", main)

    def state(self) -> dict:
        """Plain values for the checkpoint."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> EpochTally:
        """The tally a checkpoint holds; empty for a checkpoint written before tallies were kept."""
        return cls(**(state or {}))


def readable(batch: Batch, skip_bad: bool, step: int) -> int:
    """How many images of a training batch could not be read. Without ``skip_bad`` one stops the run
    (BadImageError naming it); a batch with no readable image at all is a DataError either way."""
    try:
        bad = check_bad(batch, skip_bad)
    except BadImageError as e:
        raise BadImageError(e.path, e.reason, f"{e}; --skip-bad skips unreadable training images") from None
    if bad and batch.images.shape[0] == 0:
        raise DataError(
            f"no image of the training batch at step {step} could be read (the first: {batch.bad[0][0]})"
        )
    return bad


def reduce_step(loss: Tensor, skipped: int) -> tuple[float, int]:
    """The loss averaged over the processes and the images they all skipped, in one all-reduce."""
    if not D.is_distributed():
        return float(loss.detach()), skipped
    both = D.all_reduce_sum(torch.stack([loss.detach().float(), loss.new_tensor(float(skipped))]))
    return float(both[0] / torch.distributed.get_world_size()), int(both[1])


def extend_schedule(sched: torch.optim.lr_scheduler.LambdaLR, state: dict) -> tuple[float, float]:
    """Load a checkpoint's scheduler ``state`` into ``sched`` without its LR function's settings (so that
    the function ``sched`` was built with, over the new number of epochs, holds) and give the optimizer
    the LR that function has at the step reached. Returns (the LR before, the LR now) of group 0."""
    state = dict(state, lr_lambdas=[None] * len(state.get("lr_lambdas", [])))
    sched.load_state_dict(state)
    opt = sched.optimizer
    before = opt.param_groups[0]["lr"]
    for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]
    return before, opt.param_groups[0]["lr"]


def say(text: str, main: bool = True) -> None:
    """One line on stderr from rank 0: what the run did that the user must know (shown without progress)."""
    if main:
        print(f"renyiprune train: {text}", file=sys.stderr, flush=True)

"""Top-1/top-5 evaluation of several pruning configurations on the same decoded images.

Each configuration is a parameter-sharing view of one model (``pruned_view``), so every batch is
decoded and preprocessed once and fed to all of them; forward time is measured per configuration.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..core.api import apply, share_parameters
from ..core.plans import UNPRUNED, MergePlan, PrunePlan
from ..data.images import Batch, check_bad
from ..planning.flops import count_gmacs
from ..planning.points import Point
from ..utils.distributed import all_reduce_sum
from .stats import paired_counts

__all__ = ["EvalResult", "evaluate", "pruned_view", "top1_top5"]


@dataclass
class EvalResult:
    """Accuracy (percent, 0-100) and cost of one configuration."""

    config: str
    top1: float
    top5: float
    images: int
    gmacs: float
    images_per_s: float
    skipped: int = 0
    details: dict = field(default_factory=dict)
    # Against the reference config on the same images (stats.paired_counts): delta, ci95, p_mcnemar, ...
    paired: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def pruned_view(model: nn.Module, plan: PrunePlan | MergePlan | Point) -> nn.Module:
    """A weight-sharing copy of ``model`` that prunes as ``plan`` says (a ``Point``'s budget solved on
    ``model``); the original is untouched, and the unpruned plan leaves the copy unpatched."""
    view = share_parameters(model)
    plan = (plan if isinstance(plan, Point) else Point(plan)).resolve(model)
    return view if plan == UNPRUNED else apply(view, plan)


def top1_top5(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per image (bool): the label is the top prediction; the label is among the top 5."""
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    return hit[:, 0], hit.any(dim=1)


@dataclass
class _Tally:
    """Per-config counts over the batches: top-1 and top-5 hits, images right only here / only in the
    reference, forward seconds; and images and skipped images."""

    names: list[str]
    images: int = 0
    skipped: int = 0
    counts: dict[str, list[float]] = field(default_factory=dict)  # name: [top1, top5, only_here, only_ref]
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {k: [0, 0, 0, 0] for k in self.names}
        self.seconds = dict.fromkeys(self.names, 0.0)

    def reduced(self) -> tuple[int, int, dict[str, list[int]], dict[str, float]]:
        """Under torchrun each process saw its own shard: images, skipped, per-config counts and the
        throughputs (images/s), added up over the processes."""
        rates = [self.images / self.seconds[k] if self.seconds[k] > 0 else 0.0 for k in self.names]
        flat = [v for k in self.names for v in self.counts[k]]
        total = all_reduce_sum(torch.tensor([self.images, self.skipped, *flat, *rates], dtype=torch.float64))
        k, values = len(self.names), total.tolist()
        counts = {n: [int(v) for v in values[2 + 4 * i : 6 + 4 * i]] for i, n in enumerate(self.names)}
        return int(values[0]), int(values[1]), counts, dict(zip(self.names, values[2 + 4 * k :], strict=True))


def _run_batch(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, tally: _Tally, dtype: torch.dtype,
               reference: str | None) -> None:  # fmt: skip
    """Every model on one batch, timed one by one, its hits added to ``tally``."""
    dev = x.device.type
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    right = {}
    for name in tally.names:
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            logits = models[name](x).float()
        sync()
        tally.seconds[name] += time.perf_counter() - t0
        right[name], in_top5 = top1_top5(logits, y)
        tally.counts[name][0] += int(right[name].sum())
        tally.counts[name][1] += int(in_top5.sum())
    if reference is not None:
        for name in tally.names:
            tally.counts[name][2] += int((right[name] & ~right[reference]).sum())
            tally.counts[name][3] += int((right[reference] & ~right[name]).sum())
    tally.images += y.shape[0]


@torch.inference_mode()
def evaluate(
    models: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    *,
    device: str | torch.device = "cpu",
    skip_bad: bool = False,
    total: int | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    reference: str | None = None,
) -> list[EvalResult]:
    """Run every model on every batch; returns one result per model in the mapping's order.

    A bad image stops the run with an error naming it unless ``skip_bad``; skipped images are counted.
    ``dtype`` float16/bfloat16 runs the forwards under ``torch.autocast`` (weights stay float32).
    With ``reference`` (a key of ``models``) each result carries its paired top-1 difference to it.
    """
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the evaluated configs")
    tally = _Tally(list(models))
    bar = tqdm(total=total, unit="img", desc="eval", disable=not progress, leave=False)
    for batch in batches:
        tally.skipped += check_bad(batch, skip_bad)
        bar.update(batch.labels.shape[0] + len(batch.bad))
        if batch.labels.shape[0]:
            x, y = batch.images.to(device, non_blocking=True), batch.labels.to(device)
            _run_batch(models, x, y, tally, dtype, reference)
    bar.close()
    images, skipped, counts, rates = tally.reduced()
    results = []
    for name in tally.names:
        top1, top5, only_here, only_ref = counts[name]
        paired = paired_counts(only_here, only_ref, images) if reference is not None and images else None
        results.append(EvalResult(config=name, top1=100.0 * top1 / max(images, 1),
                                  top5=100.0 * top5 / max(images, 1), images=images,
                                  gmacs=count_gmacs(models[name]), images_per_s=rates[name], skipped=skipped,
                                  paired=paired))  # fmt: skip
    return results

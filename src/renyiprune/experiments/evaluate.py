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
    dev = torch.device(device).type
    half = dtype != torch.float32
    names = list(models)
    correct1 = dict.fromkeys(names, 0)
    correct5 = dict.fromkeys(names, 0)
    only_here = dict.fromkeys(names, 0)  # images this config gets right and the reference wrong
    only_ref = dict.fromkeys(names, 0)  # ... and the reverse
    seconds = dict.fromkeys(names, 0.0)
    images = skipped = 0
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    bar = tqdm(total=total, unit="img", desc="eval", disable=not progress, leave=False)
    for batch in batches:
        skipped += check_bad(batch, skip_bad)
        n = batch.labels.shape[0]
        bar.update(n + len(batch.bad))
        if n == 0:
            continue
        x = batch.images.to(device, non_blocking=True)
        y = batch.labels.to(device)
        right = {}
        for name in names:
            sync()
            t0 = time.perf_counter()
            with torch.autocast(dev, dtype=dtype, enabled=half):
                logits = models[name](x).float()
            sync()
            seconds[name] += time.perf_counter() - t0
            right[name], in_top5 = top1_top5(logits, y)
            correct1[name] += int(right[name].sum())
            correct5[name] += int(in_top5.sum())
        if reference is not None:
            for name in names:
                only_here[name] += int((right[name] & ~right[reference]).sum())
                only_ref[name] += int((right[reference] & ~right[name]).sum())
        images += n
    bar.close()
    # Under torchrun each process saw its own shard: add up the counts (and the throughputs).
    counts = all_reduce_sum(torch.tensor(
        [images, skipped] + [correct1[k] for k in names] + [correct5[k] for k in names]
        + [only_here[k] for k in names] + [only_ref[k] for k in names]
        + [images / seconds[k] if seconds[k] > 0 else 0.0 for k in names], dtype=torch.float64))
    images, skipped = int(counts[0]), int(counts[1])
    k = len(names)

    def per_config(i: int) -> dict:
        return {n: int(c) for n, c in zip(names, counts[2 + i * k : 2 + (i + 1) * k].tolist(), strict=True)}

    correct1, correct5, only_here, only_ref = (per_config(i) for i in range(4))
    rates = dict(zip(names, counts[2 + 4 * k :].tolist(), strict=True))
    results = []
    for name in names:
        gmacs = count_gmacs(models[name])
        results.append(
            EvalResult(
                config=name,
                top1=100.0 * correct1[name] / max(images, 1),
                top5=100.0 * correct5[name] / max(images, 1),
                images=images,
                gmacs=gmacs,
                images_per_s=rates[name],
                skipped=skipped,
                paired=(paired_counts(only_here[name], only_ref[name], images)
                        if reference is not None and images else None),  # fmt: skip
            )
        )
    return results

"""Evaluate many pruning configurations on the same images, cheaply and resumably.

Every image is decoded and preprocessed once per sweep, and the blocks before the first pruning
location run once per image for all configurations: their output tokens are cached (``TokenCache``)
and each configuration's weight-sharing view (``evaluate.pruned_view``) runs only the remaining
blocks. Configurations then run one at a time, and each finished one is appended as one JSON line
(flushed and fsynced) to ``results.jsonl``, so an interrupted sweep loses at most the configuration
in flight and a rerun skips what is done.

An adaptive ``Point`` (``planning.points``) is per-image adaptive keep: a score threshold, calibrated on the
calibration images so that their mean keep rate at the first location is ``keep_rate``, sets how
many patches each image keeps (the same rate is applied at the later locations); images with equal
counts run together and GMACs are the mean over images.

Under ``torchrun`` each process caches and runs its share of the images (``distributed.batch_shard``:
whole batches, so each image is in the batch it would be in with one process); the per-image outcomes
are gathered and put back in image order before a record is made, the budget threshold is calibrated
on every process's calibration scores, and only rank 0 appends to ``results.jsonl``: the records are
those one process writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..core.attention import Site
from ..core.criteria import make_criterion
from ..core.plans import MergePlan
from ..core.streamed import score_block
from ..data.images import Batch, check_bad
from ..planning.flops import count_gmacs
from ..planning.points import Point
from ..utils import distributed as D
from ..utils.io import output_lock
from .evaluate import pruned_view, top1_top5
from .tune import is_calibration

__all__ = [
    "TokenCache",
    "ResultLog",
    "embed",
    "first_location",
    "build_cache",
    "run_view",
    "run_config",
    "run_sweep",
    "SweepSettings",
    "sweep_samples",
    "fingerprint",
]


BUDGET_STEP = 8  # budget mode: per-image keep counts are multiples of this many patches


@dataclass(frozen=True)
class SweepSettings:
    """How a sweep runs (not what it measures): batches, decoding workers, device, unreadable images,
    progress bars, and a file to memory-map the cached tokens into (image sets larger than memory)."""

    batch_size: int = 64
    workers: int = 2
    device: str | torch.device = "cpu"
    skip_bad: bool = False
    progress: bool = True
    storage: str | Path | None = None


def first_location(point: Point, depth: int) -> int:
    """The first block ``point`` changes (``depth`` for the unpruned model)."""
    if isinstance(point.plan, MergePlan):
        return 0
    return min(point.plan.locations, default=depth)


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """Patch embedding, CLS token and position embedding: the tokens entering block 0."""
    t = model.patch_embed(x)
    return torch.cat([model.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + model.pos_embed


@dataclass
class TokenCache:
    """Tokens entering block ``start`` for every image of the sweep, with labels and sample indices."""

    tokens: Tensor  # (N, T, C)
    labels: Tensor  # (N,)
    indices: Tensor  # (N,) positions in the sample list
    start: int
    skipped: int = 0
    seconds: float = 0.0


@torch.inference_mode()
def build_cache(
    model: nn.Module,
    batches: Iterable[Batch],
    start: int,
    *,
    total: int,
    device: str | torch.device = "cpu",
    skip_bad: bool = False,
    progress: bool = True,
    storage: str | Path | None = None,
) -> TokenCache:
    """Run ``model``'s (unpatched) embedding and ``blocks[:start]`` once per batch and keep the output.

    ``storage``: a file to hold the tokens memory-mapped (for image sets that do not fit in memory).
    """
    t0 = time.perf_counter()
    p = model.pos_embed
    shape = (total, p.shape[1], p.shape[2])
    if storage is not None:
        tokens = torch.from_file(str(storage), shared=True, size=math.prod(shape), dtype=p.dtype).view(shape)
    else:
        tokens = torch.empty(shape, dtype=p.dtype)
    labels = torch.empty(total, dtype=torch.int64)
    indices = torch.empty(total, dtype=torch.int64)
    n = skipped = 0
    blocks = list(model.blocks)[:start]
    bar = tqdm(total=total, unit="img", desc=f"decode + blocks[:{start}]", disable=not progress, leave=False)
    for batch in batches:
        skipped += check_bad(batch, skip_bad)
        b = batch.labels.shape[0]
        bar.update(b + len(batch.bad))
        if b == 0:
            continue
        x = embed(model, batch.images.to(device))
        for blk in blocks:
            x = blk(x)
        tokens[n : n + b] = x.cpu()
        labels[n : n + b] = batch.labels
        indices[n : n + b] = batch.indices
        n += b
    bar.close()
    return TokenCache(tokens[:n], labels[:n], indices[:n], start, skipped, time.perf_counter() - t0)


@torch.inference_mode()
def run_view(
    view: nn.Module,
    cache: TokenCache,
    *,
    rows: Tensor | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bar: tqdm | None = None,
) -> Tensor:
    """Logits of ``view`` for the cached images ``rows`` (default all), from ``blocks[cache.start:]`` on.

    Equivalent to ``view(images)``: the pruning state is reset per batch and its step advanced, as
    the patched model's forward does.
    """
    rows = torch.arange(cache.tokens.shape[0]) if rows is None else rows
    state = getattr(view, "renyiprune", None)
    blocks = list(view.blocks)[cache.start :]
    num_patches = view.patch_embed.num_patches
    out = []
    for i in range(0, rows.shape[0], batch_size):
        x = cache.tokens[rows[i : i + batch_size]].to(device)
        if state is not None:
            state.begin(x.shape[0], num_patches, x.device)
        for blk in blocks:
            x = blk(x)
        out.append(view.forward_head(view.norm(x)).float().cpu())
        if state is not None:
            state.end()
        if bar is not None:
            bar.update(x.shape[0])
    return torch.cat(out) if out else torch.empty(0)


def _outcomes(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per image: top-1 right, top-5 right, and the cross-entropy of the true class (nats, float64)."""
    top1, top5 = top1_top5(logits, labels)
    return top1, top5, torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")


def _bits(correct: Tensor) -> str:
    """Per-image top-1 outcomes as a '0'/'1' string in cache order (for paired comparisons)."""
    return "".join("1" if c else "0" for c in correct.tolist())


@torch.inference_mode()
def first_stage_scores(
    model: nn.Module, cache: TokenCache, config: Point, rows: Tensor, batch_size: int = 64
) -> Tensor:
    """Criterion scores (len(rows), n) of ``config``'s first stage, from the cached tokens."""
    if rows.numel() == 0:  # a process whose share holds no (calibration) image
        return torch.empty(0, cache.tokens.shape[1] - getattr(model, "num_prefix_tokens", 1))
    stages = config.plan.stages
    if len({(s.criterion, tuple(sorted(s.options.items()))) for s in stages}) != 1:
        raise ValueError("budget mode takes one criterion, not a per-stage spec")
    fn = make_criterion(stages[0].criterion, **stages[0].options)
    start = first_location(config, len(model.blocks))
    if start != cache.start:
        raise ValueError(f"budget mode needs the cache at block {start}, it is at {cache.start}")
    blk = model.blocks[start]
    out = []
    for i in range(0, rows.shape[0], batch_size):
        x = cache.tokens[rows[i : i + batch_size]]
        site = Site(num_patches=x.shape[1] - 1)  # the block's own scoring path (streamed.score_block)
        out.append(score_block(blk.attn, blk.norm1(x), fn, site)[1].float())
    return torch.cat(out)


def _run_budget(
    model: nn.Module,
    config: Point,
    cache: TokenCache,
    calibration: Tensor,
    batch_size: int,
    device,
    bar: tqdm | None,
) -> tuple[dict[str, Tensor], dict]:
    """Per-image keep counts from a calibrated threshold; returns per-image outcomes (with each image's
    keep count and GMACs) and the threshold. The threshold pools every process's calibration scores."""
    all_rows = torch.arange(cache.tokens.shape[0])
    calib_rows = all_rows[calibration]
    cal = D.all_gather_cat(first_stage_scores(model, cache, config, calib_rows, batch_size).flatten())
    if cal.numel() == 0:
        raise ValueError("budget mode needs calibration images")
    # Keep score >= tau; tau is the (1 - r) quantile of the pooled calibration scores.
    keep_rate = config.plan.stages[0].keep_rate
    tau = float(cal.kthvalue(max(1, round((1.0 - keep_rate) * cal.numel()))).values)
    scores = first_stage_scores(model, cache, config, all_rows, batch_size)
    n = scores.shape[1]
    # Counts are rounded to multiples of BUDGET_STEP patches so that images share batches (and GMACs).
    counts = (scores >= tau).sum(dim=1).float().div(BUDGET_STEP).round().mul(BUDGET_STEP).long()
    counts = counts.clamp(min(BUDGET_STEP, n), n)
    m = cache.tokens.shape[0]
    out = _empty_outcomes(m)
    out["keep"], out["gmacs"] = counts, torch.zeros(m, dtype=torch.float64)
    for k in counts.unique().tolist():
        rows = all_rows[counts == k]
        view = pruned_view(model, config.plan.with_keep_rate(k / n))
        logits = run_view(view, cache, rows=rows, batch_size=batch_size, device=device, bar=bar)
        out["correct"][rows], out["top5"][rows], out["nll"][rows] = _outcomes(logits, cache.labels[rows])
        out["gmacs"][rows] = count_gmacs(view)
    return out, {"threshold": tau, "patches": n}


def _empty_outcomes(m: int) -> dict[str, Tensor]:
    return {
        "correct": torch.zeros(m, dtype=torch.bool),
        "top5": torch.zeros(m, dtype=torch.bool),
        "nll": torch.zeros(m, dtype=torch.float64),
    }


def _gathered(outcomes: dict[str, Tensor], indices: Tensor) -> dict[str, Tensor]:
    """Every process's per-image outcomes, in image (sample-list) order: one process's cache order."""
    if not D.is_distributed():
        return outcomes
    order = D.all_gather_cat(indices).argsort()
    return {k: D.all_gather_cat(v)[order] for k, v in outcomes.items()}


def run_config(
    model: nn.Module,
    config: Point,
    cache: TokenCache,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    calibration: Tensor | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate one point on the cached images: top-1/top-5 (percent), mean NLL, per-image top-1
    outcomes, GMACs, images, seconds."""
    depth = len(model.blocks)
    if first_location(config, depth) < cache.start:
        raise ValueError(f"{config.label} prunes before block {cache.start}, where the cache starts")
    local = cache.tokens.shape[0]
    bar = tqdm(total=local, unit="img", desc=config.label, disable=not progress, leave=False)
    t0 = time.perf_counter()
    details: dict = {}
    if config.adaptive:
        calib = calibration if calibration is not None else torch.ones(local, dtype=torch.bool)
        out, details = _run_budget(model, config, cache, calib, batch_size, device, bar)
        out = _gathered(out, cache.indices)
        n = details.pop("patches")
        # mean GMACs over images: each keep count's GMACs times its images, in increasing count order
        gmacs = 0.0
        for k in out["keep"].unique().tolist():
            same = out["keep"] == k
            gmacs += float(out["gmacs"][same][0]) * int(same.sum())
        m = out["keep"].shape[0]
        gmacs /= max(m, 1)
        details["mean_keep_rate"] = float(out["keep"].float().mean() / n) if m else math.nan
    else:
        view = pruned_view(model, config)
        out = _empty_outcomes(local)
        if local:
            logits = run_view(view, cache, batch_size=batch_size, device=device, bar=bar)
            out["correct"], out["top5"], out["nll"] = _outcomes(logits, cache.labels)
        out = _gathered(out, cache.indices)
        gmacs = count_gmacs(view)
    correct, in_top5, nll = out["correct"], out["top5"], out["nll"]
    m = correct.shape[0]
    top1, top5 = int(correct.sum()), int(in_top5.sum())
    seconds = time.perf_counter() - t0
    bar.close()
    return {
        "label": config.label,
        "config": config.to_dict(),
        "top1": 100.0 * top1 / max(m, 1),
        "top5": 100.0 * top5 / max(m, 1),
        "nll": float(nll.mean()) if m else math.nan,  # mean cross-entropy of the true class (nats)
        "correct": _bits(correct),  # per-image top-1, cache order: paired comparisons (stats.paired)
        "gmacs": gmacs,
        "images": m,
        "seconds": seconds,
        **({"details": details} if details else {}),
    }


class ResultLog:
    """Append-only JSON-lines file of finished configurations, keyed by config and run fingerprint."""

    def __init__(self, path: str | Path, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def key(self, point: Point) -> str:
        return json.dumps({"config": point.to_dict(), "run": self.fingerprint}, sort_keys=True)

    def load(self) -> dict[str, dict]:
        """Finished records of this run's fingerprint; a torn last line (killed mid-write) is ignored."""
        done: dict[str, dict] = {}
        if not self.path.exists():
            return done
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.pop("run", None) == self.fingerprint and "config" in rec:
                done[self.key(Point.from_dict(rec["config"]))] = rec
        return done

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({**record, "run": self.fingerprint}, sort_keys=True, allow_nan=False)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:  # a previous run killed mid-line: start on a fresh line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())


def run_sweep(
    model: nn.Module,
    points: Sequence[Point],
    make_batches: Callable[[], Iterable[Batch]],
    total: int,
    *,
    log: ResultLog | None = None,
    calibration: Callable[[Tensor], Tensor] | None = None,
    settings: SweepSettings = SweepSettings(),
) -> tuple[list[dict], dict]:
    """Evaluate ``points`` (skipping those ``log`` has), appending each finished one to ``log``.

    ``make_batches()`` (``total`` images) is called only if something is left to do. ``calibration`` maps
    the cached sample indices to a boolean mask of the calibration images (adaptive keep). Returns the
    records in ``points`` order and timing {"cache_s", "configs_s", "skipped", "ran"}.

    Under ``torchrun`` every process calls this with its own share of the images (``make_batches``,
    ``total``; ``Batch.indices`` positions in the whole sample list): rank 0 reads ``log`` and tells the
    others what is done, every process runs what is left, and only rank 0 appends records.
    """
    main = D.rank() == 0
    done = D.broadcast_object(log.load() if log and main else {})
    keyed = [(c, log.key(c) if log else str(i)) for i, c in enumerate(points)]
    todo = [(c, k) for c, k in keyed if k not in done]
    timing = {"cache_s": 0.0, "configs_s": 0.0, "skipped": 0, "ran": len(todo)}
    for c, _ in todo:  # a bad option or budget fails here, before decoding, not after earlier points ran
        pruned_view(model, c)
    if todo:
        st = settings
        start = min(first_location(c, len(model.blocks)) for c, _ in todo)
        cache = build_cache(model, make_batches(), start, total=total, device=st.device, skip_bad=st.skip_bad,
                            progress=st.progress, storage=st.storage)  # fmt: skip
        skipped = D.all_reduce_sum(torch.tensor([cache.skipped], dtype=torch.int64))
        timing["cache_s"], timing["skipped"] = cache.seconds, int(skipped[0])
        mask = calibration(cache.indices) if calibration else None
        for c, k in tqdm(todo, desc="configs", unit="cfg", disable=not st.progress):
            rec = run_config(model, c, cache, batch_size=st.batch_size, device=st.device, calibration=mask,
                             progress=st.progress)  # fmt: skip
            timing["configs_s"] += rec["seconds"]
            if log and main:
                log.append(rec)
            done[k] = rec
    return [done[k] for _, k in keyed], timing


def fingerprint(model: str, weights: str, data: str, samples: Sequence, part: str = "all") -> dict:
    """What makes records comparable: model, weights (``models.model.weights_id``), data source key, image
    list (its file names' SHA-256) and which part of it."""
    names = "\n".join(Path(s.path).name for s in samples).encode()
    return {"model": model, "weights": weights, "data": data, "images": len(samples), "part": part,
            "list_sha256": hashlib.sha256(names).hexdigest()[:16]}  # fmt: skip


def _loader(samples: Sequence, transform: Callable, settings: SweepSettings):
    from torch.utils.data import DataLoader

    from ..data.images import ImageDataset, collate

    return DataLoader(ImageDataset(samples, transform), batch_size=settings.batch_size, shuffle=False,
                      num_workers=settings.workers, collate_fn=collate)  # fmt: skip


def _global_batches(loader, positions: Tensor):
    """The loader's batches with ``indices`` mapped from positions in a shard to the whole sample list."""
    for batch in loader:
        yield batch._replace(indices=positions[batch.indices])


def sweep_samples(model: nn.Module, points: Sequence[Point], samples: Sequence, log: ResultLog,
                  transform: Callable, settings: SweepSettings = SweepSettings()) -> tuple[list[dict], dict]:
    """Run ``points`` on ``samples`` (items with ``path`` and ``label``; resuming ``log``); records, timing.

    Under torchrun (a joined process group) this process decodes and runs only its share of the images
    (``distributed.batch_shard``); the records are gathered as one process makes them. The log's folder is
    locked meanwhile (``output_lock``: one writer per folder; re-entrant). Adaptive points calibrate on
    the calibration half (``tune.is_calibration``).
    """
    world = torch.distributed.get_world_size() if D.is_distributed() else 1
    shard = D.batch_shard(len(samples), settings.batch_size, D.rank(), world)
    positions = torch.tensor(shard, dtype=torch.int64)
    mine = [samples[int(i)] for i in positions]

    def calibration(idx: Tensor) -> Tensor:  # dtype: a process may hold no image
        return torch.tensor([is_calibration(samples[int(i)].path) for i in idx], dtype=torch.bool)

    with output_lock(log.path.parent, collective=True):
        batches = lambda: _global_batches(_loader(mine, transform, settings), positions)  # noqa: E731
        return run_sweep(model, points, batches, len(mine), log=log, calibration=calibration,
                         settings=settings)

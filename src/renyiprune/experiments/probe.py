"""Linear probe under pruning: a frozen ViT's pruned forward gives CLS features, a multinomial
logistic-regression head is fitted on them per configuration, and top-1/top-5 are measured.

This measures how much class information the pruned backbone still carries, on a new label set,
without fine-tuning. Work is shared the way ``renyiprune.sweep`` shares it: every image is decoded
once and the blocks before the first pruning location run once per image for all configurations
(``sweep.build_cache``); each configuration's weight-sharing view runs only the remaining blocks.
Features can be kept on disk (:class:`FeatureCache`, in ``probe_cache``), keyed by everything that
determines them.

The head (``probe_fit``): features are standardized (mean/std of the fitting images), then
``mean cross-entropy + l2/2 * ||W||^2`` (bias not penalized) is minimized full-batch with L-BFGS.
``l2`` is chosen on a held-out fifth of the training images (split by a hash of the file name), then
the head is refitted on all of them; the standardization is folded into the returned weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..core.plans import UNPRUNED, PrunePlan, Stage
from ..data.datasets import BannerCropped
from ..planning.flops import count_gmacs
from ..planning.points import Point
from ..utils import distributed as D
from .evaluate import pruned_view, top1_top5
from .probe_cache import FeatureCache, ImageSet, feature_code_files
from .probe_fit import DEFAULT_L2_GRID, LinearHead, fit_logistic, fit_probe, is_holdout
from .stats import paired_difference
from .sweep import build_cache, first_location, run_view

__all__ = [
    "DEFAULT_L2_GRID",
    "HEADS",
    "ImageSet",
    "LinearHead",
    "FeatureCache",
    "ProbeConfig",
    "is_holdout",
    "feature_code_files",
    "feature_view",
    "probe_gmacs",
    "evit_twin",
    "extract_features",
    "fit_logistic",
    "fit_probe",
    "run_probe",
]

#: How the head is fitted: on each configuration's own pruned features, or once on the unpruned ones.
HEADS = ("per-config", "unpruned")


@dataclass(frozen=True)
class ProbeConfig:
    """How a probe runs: the head (``num_classes``, ``l2_grid``, ``head``: one of :data:`HEADS`) and how
    features are computed (``cache``, ``batch_size``, ``workers``, ``device``, ``progress``)."""

    num_classes: int | None = None  # default: the largest label seen + 1
    cache: FeatureCache | None = None
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    batch_size: int = 64
    workers: int = 0
    device: str | torch.device = "cpu"
    progress: bool = True
    head: str = "per-config"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        object.__setattr__(self, "l2_grid", tuple(self.l2_grid))


# ---------------------------------------------------------------------------------------------- views


def feature_view(model: nn.Module, config: Point) -> nn.Module:
    """A weight-sharing pruned view of ``model`` whose output is the final-norm CLS feature (B, C)."""
    view = pruned_view(model, config)
    view.head = nn.Identity()
    return view


def probe_gmacs(model: nn.Module, config: Point, num_classes: int) -> float:
    """GMACs per image of ``config``'s pruned forward with a ``num_classes`` linear head."""
    view = pruned_view(model, config)
    view.head = nn.Linear(model.embed_dim, num_classes)
    return count_gmacs(view)


def evit_twin(config: Point) -> Point | None:
    """EViT at the same keep rate (or budget / token counts), locations and fate of pruned tokens;
    None for the unpruned model, ToMe and EViT itself."""
    plan = config.plan
    if not isinstance(plan, PrunePlan) or not plan.stages or all(s.criterion == "evit" for s in plan.stages):
        return None
    stages = tuple(Stage(s.location, s.keep_rate, s.tokens, "evit") for s in plan.stages)
    return Point(PrunePlan(stages, plan.removed, plan.fusion), config.budget)


# ------------------------------------------------------------------------------------------- features


def _loader(sets: Sequence[ImageSet], transform: Callable, batch_size: int, workers: int):
    from torch.utils.data import ConcatDataset, DataLoader

    from ..data.images import ImageDataset, collate

    parts = [ImageDataset(list(s.samples), BannerCropped(transform, s.crop_bottom)) for s in sets]
    return DataLoader(ConcatDataset(parts), batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate)  # fmt: skip


def extract_features(
    model: nn.Module,
    configs: Sequence[Point],
    sets: Sequence[ImageSet],
    transform: Callable,
    options: ProbeConfig = ProbeConfig(),
    needed: dict[int, Sequence[int]] | None = None,
) -> tuple[dict[tuple[int, int], Tensor], dict]:
    """Final CLS features of every configuration on every image set: ``{(config_i, set_i): (n, C)}``.

    Pairs found in ``options.cache`` are read; for the rest, the images of the sets concerned are
    decoded once, ``blocks[:start]`` (start = the earliest first pruning block among those
    configurations) run once per image, and each configuration runs the remaining blocks on the cached
    tokens. ``options`` also gives the batch size, loader workers, device and progress bars.
    ``needed``: the set indices wanted per configuration index (default: every set for every one).
    Returns the features and timing {"decode_prefix_s", "features_s", "cached", "computed", "images"}.
    """
    cache = options.cache
    out: dict[tuple[int, int], Tensor] = {}
    timing = {"decode_prefix_s": 0.0, "features_s": 0.0, "cached": 0, "computed": 0, "images": 0}
    missing: dict[int, list[int]] = {}
    for ci, c in enumerate(configs):
        for si in (needed[ci] if needed is not None else range(len(sets))):
            got = cache.load(c, sets[si]) if cache is not None else None
            if got is None:
                missing.setdefault(ci, []).append(si)
            else:
                out[(ci, si)] = got
                timing["cached"] += 1
    if not missing:
        return out, timing
    for ci in missing:  # a bad option fails here, before any image is decoded
        pruned_view(model, configs[ci])
    with cache.writing() if cache is not None else contextlib.nullcontext():
        computed, spent = _compute(model, configs, sets, missing, transform, options)
    out.update(computed)
    timing.update(spent)
    return out, timing


def _compute(model, configs, sets, missing, transform, options: ProbeConfig) -> tuple[dict, dict]:
    """The features ``missing`` lists ({config index: set indices}) and their timing, saved to the
    cache (by rank 0 only under torchrun: the others compute the same features)."""
    needed = sorted({si for sis in missing.values() for si in sis})
    offsets, total = {}, 0
    for si in needed:
        offsets[si], total = total, total + len(sets[si].samples)
    start = min(first_location(configs[ci], len(model.blocks)) for ci in missing)
    loader = _loader([sets[si] for si in needed], transform, options.batch_size, options.workers)
    tokens = build_cache(model, loader, start, total=total, device=options.device, progress=options.progress)
    if tokens.tokens.shape[0] != total:
        raise RuntimeError(f"decoded {tokens.tokens.shape[0]} of {total} images")
    out: dict[tuple[int, int], Tensor] = {}
    timing = {"decode_prefix_s": tokens.seconds, "images": total, "computed": 0}
    t0 = time.perf_counter()
    for ci, sis in tqdm(missing.items(), desc="features", unit="cfg", disable=not options.progress):
        rows = torch.cat([torch.arange(offsets[si], offsets[si] + len(sets[si].samples)) for si in sis])
        inner = tqdm(total=rows.numel(), unit="img", desc=configs[ci].label, disable=not options.progress,
                     leave=False)  # fmt: skip
        feats = run_view(feature_view(model, configs[ci]), tokens, rows=rows, batch_size=options.batch_size,
                         device=options.device, bar=inner)  # fmt: skip
        inner.close()
        at = 0
        for si in sis:
            n = len(sets[si].samples)
            out[(ci, si)] = feats[at : at + n]
            at += n
            if options.cache is not None and D.rank() == 0:
                options.cache.save(configs[ci], sets[si], out[(ci, si)])
            timing["computed"] += 1
    timing["features_s"] = time.perf_counter() - t0
    return out, timing


# ---------------------------------------------------------------------------------------------- probe


def _bits(correct: Tensor) -> str:
    return "".join("1" if c else "0" for c in correct.tolist())


def _paired(a: str, b: str) -> dict:
    d = paired_difference(a, b)
    return {"delta": d["delta"], "ci95": list(d["ci95"]), "p_mcnemar": d["p_mcnemar"],
            "a_only": d["a_only"], "b_only": d["b_only"]}  # fmt: skip


def with_references(configs: Sequence[Point]) -> tuple[list[Point], set[Point]]:
    """``configs`` plus the unpruned model and each one's EViT twin (unique, in order), and the set of
    those that were added only as references."""
    out = list(dict.fromkeys(configs))
    added = set()
    for c in [Point(UNPRUNED), *(t for t in map(evit_twin, configs) if t is not None)]:
        if c not in out:
            out.append(c)
            added.add(c)
    return out, added


def _num_classes(train: ImageSet, evals: Sequence[ImageSet], num_classes: int | None) -> int:
    """``num_classes``, or the largest label seen + 1; an error if a label does not fit."""
    labels_seen = [int(s.label) for s in train.samples] + [int(s.label) for e in evals for s in e.samples]
    k = num_classes or (max(labels_seen) + 1)
    if max(labels_seen) >= k:
        raise ValueError(f"labels go up to {max(labels_seen)} but num_classes is {k}")
    return k


def _fit_heads(feats: dict, train: ImageSet, k: int, count: int, base: int, config: ProbeConfig) -> dict:
    """Each of ``count`` configurations' head, fitted on its own train features (``per-config``) or
    one head fitted on the unpruned model's (configuration ``base``) for all."""
    y = train.labels
    holdout = torch.tensor([is_holdout(s.path) for s in train.samples], dtype=torch.bool)
    if config.head == "unpruned":
        return dict.fromkeys(range(count), fit_probe(feats[(base, 0)], y, k, holdout, config.l2_grid))
    return {ci: fit_probe(feats[(ci, 0)], y, k, holdout, config.l2_grid)
            for ci in tqdm(range(count), desc="heads", unit="cfg", disable=not config.progress)}  # fmt: skip


def _outcome(head: LinearHead, feats: Tensor, ye: Tensor) -> tuple[Tensor, Tensor, float]:
    """Per-image top-1 and top-5 outcomes of ``head`` on ``feats`` and its mean cross-entropy."""
    logits = head.logits(feats)
    top1, top5 = top1_top5(logits, ye)
    nll = F.cross_entropy(logits.double(), ye).item() if ye.numel() else math.nan
    return top1, top5, nll


def _record(c: Point, ev: ImageSet, outcome: tuple, head: LinearHead, run: dict) -> dict:
    """One configuration's record on ``ev``, before its paired differences; ``run`` gives its
    ``train_images``, ``gmacs`` and ``head`` (the protocol)."""
    top1, top5, nll = outcome
    n, d = len(ev.samples), c.to_dict()
    pruned = isinstance(c.plan, PrunePlan) and bool(c.plan.stages)  # not the unpruned model, not ToMe
    return {
        "config": c.label,
        "criterion": d.get("criterion") or "none",
        "alpha": d.get("alpha", 1.0),
        "keep_rate": d.get("keep_rate") if pruned else None,
        "fuse": pruned and c.plan.removed == "fuse",
        "settings": d,
        "eval": ev.name,
        "top1": 100.0 * float(top1.float().mean()) if n else math.nan,
        "top5": 100.0 * float(top5.float().mean()) if n else math.nan,
        "nll": nll,
        "images": n,
        "train_images": run["train_images"],
        "gmacs": run["gmacs"],
        "head": run["head"],
        "l2": head.l2,
        "holdout_top1": {f"{lam:g}": v for lam, v in head.holdout.items()},
    }


def run_probe(
    model: nn.Module,
    configs: Sequence[Point],
    train: ImageSet,
    evals: Sequence[ImageSet],
    transform: Callable,
    config: ProbeConfig = ProbeConfig(),
) -> tuple[list[dict], dict]:
    """Probe every configuration (plus the unpruned model and EViT twins as references).

    ``config.head="per-config"``: each configuration's head is fitted on its own pruned features of
    ``train``. ``"unpruned"``: one head, fitted on the unpruned model's features, classifies every
    configuration's pruned features (pruning at inference only; ``train`` then runs unpruned only).

    Returns one record per (configuration, evaluation set) — config label, criterion, alpha,
    keep_rate, top1, top5, images, gmacs, the chosen l2, per-image top-1 outcomes and the paired
    differences against the unpruned probe and against EViT at the same keep rate and fusion — and
    timing in seconds.
    """
    t_start = time.perf_counter()
    all_configs, added = with_references(configs)
    k = _num_classes(train, evals, config.num_classes)
    sets = [train, *evals]
    base = all_configs.index(Point(UNPRUNED))
    needed = None
    if config.head == "unpruned":
        needed = {ci: list(range(len(sets))) if ci == base else list(range(1, len(sets)))
                  for ci in range(len(all_configs))}  # fmt: skip
    feats, timing = extract_features(model, all_configs, sets, transform, config, needed)
    t0 = time.perf_counter()
    heads = _fit_heads(feats, train, k, len(all_configs), base, config)
    timing["heads_s"] = time.perf_counter() - t0
    gmacs = {ci: probe_gmacs(model, c, k) for ci, c in enumerate(all_configs)}
    records: list[dict] = []
    for ei, ev in enumerate(evals, start=1):
        outcome = {ci: _outcome(heads[ci], feats[(ci, ei)], ev.labels) for ci in range(len(all_configs))}
        for ci, c in enumerate(all_configs):
            twin = evit_twin(c)
            twin_bits = _bits(outcome[all_configs.index(twin)][0]) if twin is not None else None
            bits = _bits(outcome[ci][0])
            run = {"train_images": len(train.samples), "gmacs": gmacs[ci], "head": config.head}
            rec = _record(c, ev, outcome[ci], heads[ci], run)
            rec["reference"] = c in added
            rec["correct"] = bits
            rec["vs_unpruned"] = _paired(bits, _bits(outcome[base][0])) if ci != base else None
            rec["vs_evit"] = _paired(bits, twin_bits) if twin_bits is not None else None
            records.append(rec)
    timing["total_s"] = time.perf_counter() - t_start
    return records, timing

"""Linear probe under pruning: a frozen ViT's pruned forward gives CLS features, a multinomial
logistic-regression head is fitted on them per configuration, and top-1/top-5 are measured.

This measures how much class information the pruned backbone still carries, on a new label set,
without fine-tuning. Work is shared the way ``renyiprune.sweep`` shares it: every image is decoded
once and the blocks before the first pruning location run once per image for all configurations
(``sweep.build_cache``); each configuration's weight-sharing view runs only the remaining blocks.
Features can be kept on disk (:class:`FeatureCache`), keyed by everything that determines them.

The head: features are standardized (mean/std of the fitting images), then
``mean cross-entropy + l2/2 * ||W||^2`` (bias not penalized) is minimized full-batch with L-BFGS.
``l2`` is chosen on a held-out fifth of the training images (split by a hash of the file name), then
the head is refitted on all of them; the standardization is folded into the returned weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..data.datasets import BannerCropped
from ..data.images import Sample
from ..planning.flops import count_gmacs
from ..planning.specs import PruneConfig, config_to_dict, parse_stages
from ..utils import distributed as D
from ..utils.io import atomic_path, output_lock
from .evaluate import pruned_view, top1_top5
from .stats import paired_difference
from .sweep import build_cache, first_location, run_view

__all__ = [
    "DEFAULT_L2_GRID",
    "HEADS",
    "ImageSet",
    "LinearHead",
    "FeatureCache",
    "is_holdout",
    "feature_view",
    "probe_gmacs",
    "evit_twin",
    "extract_features",
    "fit_logistic",
    "fit_probe",
    "run_probe",
]

#: Candidate L2 strengths (on standardized features, mean cross-entropy), strongest first.
DEFAULT_L2_GRID = (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
#: How the head is fitted: on each configuration's own pruned features, or once on the unpruned ones.
HEADS = ("per-config", "unpruned")
#: Files whose code decides the features: a change to any of them invalidates cached features.
# The code that computes pruned features, relative to the package: the whole core, the model, and
# what turns a configuration into a plan. A change to any of them gives new cache keys.
_FEATURE_CODE = (
    "core/*.py", "models/model.py", "planning/budget.py", "planning/build.py", "planning/specs.py",
)  # fmt: skip


@dataclass(frozen=True)
class ImageSet:
    """A named list of labelled images (a ``--train`` or ``--eval`` folder); ``crop_bottom`` pixels of
    every image are cut off before the transform (FGVC-Aircraft's banner)."""

    name: str
    samples: tuple[Sample, ...]
    crop_bottom: int = 0

    def fingerprint(self) -> str:
        """SHA-256 of the resolved paths and labels, in order."""
        h = hashlib.sha256(f"crop={self.crop_bottom}\n".encode())
        for s in self.samples:
            h.update(f"{Path(s.path).resolve()}\t{int(s.label)}\n".encode())
        return h.hexdigest()

    @property
    def labels(self) -> Tensor:
        return torch.tensor([int(s.label) for s in self.samples], dtype=torch.int64)


def is_holdout(path: str | Path) -> bool:
    """True for the fifth of the training images that choose the L2 strength (hash of the file name)."""
    return hashlib.sha256(b"renyiprune-probe-holdout/" + Path(path).name.encode()).digest()[0] % 5 == 0


# ---------------------------------------------------------------------------------------------- views


def feature_view(model: nn.Module, config: PruneConfig) -> nn.Module:
    """A weight-sharing pruned view of ``model`` whose output is the final-norm CLS feature (B, C)."""
    view = pruned_view(model, config)
    view.head = nn.Identity()
    return view


def probe_gmacs(model: nn.Module, config: PruneConfig, num_classes: int) -> float:
    """GMACs per image of ``config``'s pruned forward with a ``num_classes`` linear head."""
    view = pruned_view(model, config)
    view.head = nn.Linear(model.embed_dim, num_classes)
    return count_gmacs(view)


def evit_twin(config: PruneConfig) -> PruneConfig | None:
    """EViT at the same keep rate (or budget / token counts), locations and fate of pruned tokens;
    None for the unpruned model, ToMe and EViT itself."""
    if config.criterion in (None, "tome", "evit"):
        return None
    locs = parse_stages(config.criterion)[2] if "@" in config.criterion else config.locations
    kept = tuple((k, v) for k, v in config.options if k in ("removed", "budget", "tokens"))
    return PruneConfig("evit", config.keep_rate, 1.0, tuple(locs), config.fuse, kept)


# ---------------------------------------------------------------------------------------------- cache


def feature_code_files() -> list[Path]:
    """The source files whose contents key the feature cache (:data:`_FEATURE_CODE`), sorted."""
    pkg = Path(__file__).resolve().parents[1]
    found = {pattern: sorted(pkg.glob(pattern)) for pattern in _FEATURE_CODE}
    missing = [pattern for pattern, files in found.items() if not files]
    if missing:  # a moved module must not silently drop out of the key
        raise RuntimeError(f"feature-cache code not found under {pkg}: {missing}")
    return sorted({f for files in found.values() for f in files})


def _code_hash() -> str:
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in feature_code_files():
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class FeatureCache:
    """Features of (configuration, image set) pairs on disk, one file each, written atomically.

    The key holds the model name, the weights' identity (``models.model.weights_id``: the SHA-256 of
    the file), the transform, the code that computes the features (a hash of the pruning modules,
    unless ``context`` names one: reading features written by an earlier version), the configuration
    and the image list, so a changed input never reuses stale features. Whoever computes features
    holds :meth:`writing` (one writer per folder); reading needs no lock (files are replaced whole).
    ``flag`` is the option that names the folder, for the message a second writer gets.
    """

    def __init__(self, root: str | Path, context: dict, flag: str = "--cache") -> None:
        self.root = Path(root)
        self.context = {"code": _code_hash(), **context, "format": 1}  # a given "code" wins (reports)
        self.flag = flag

    def writing(self) -> contextlib.AbstractContextManager:
        """The folder's ``output_lock`` (re-entrant; under torchrun rank 0's)."""
        return output_lock(self.root, self.flag)

    def key(self, config: PruneConfig, images: ImageSet) -> str:
        text = json.dumps({"context": self.context, "config": config_to_dict(config),
                           "images": images.fingerprint()}, sort_keys=True, default=str)  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, config: PruneConfig, images: ImageSet) -> Path:
        return self.root / f"{self.key(config, images)}.pt"

    def load(self, config: PruneConfig, images: ImageSet) -> Tensor | None:
        p = self.path(config, images)
        if not p.is_file():
            return None
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # a file we cannot read is recomputed (and then replaced)
            return None
        feats = obj.get("features") if isinstance(obj, dict) else None
        if not isinstance(feats, Tensor) or feats.shape[0] != len(images.samples):
            return None
        return feats

    def save(self, config: PruneConfig, images: ImageSet, features: Tensor) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(config, images)
        meta = {"label": config.label, "images": images.name, "count": len(images.samples)}
        with atomic_path(target) as tmp:
            torch.save({"features": features.contiguous(), "meta": json.dumps(meta)}, tmp)


# ------------------------------------------------------------------------------------------- features


def _loader(sets: Sequence[ImageSet], transform: Callable, batch_size: int, workers: int):
    from torch.utils.data import ConcatDataset, DataLoader

    from ..data.images import ImageDataset, collate

    parts = [ImageDataset(list(s.samples), BannerCropped(transform, s.crop_bottom)) for s in sets]
    return DataLoader(ConcatDataset(parts), batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate)  # fmt: skip


def extract_features(
    model: nn.Module,
    configs: Sequence[PruneConfig],
    sets: Sequence[ImageSet],
    transform: Callable,
    *,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    needed: dict[int, Sequence[int]] | None = None,
) -> tuple[dict[tuple[int, int], Tensor], dict]:
    """Final CLS features of every configuration on every image set: ``{(config_i, set_i): (n, C)}``.

    Pairs found in ``cache`` are read; for the rest, the images of the sets concerned are decoded once,
    ``blocks[:start]`` (start = the earliest first pruning block among those configurations) run
    once per image, and each configuration runs the remaining blocks on the cached tokens.
    ``needed``: the set indices wanted per configuration index (default: every set for every one).
    Returns the features and timing {"decode_prefix_s", "features_s", "cached", "computed", "images"}.
    """
    out: dict[tuple[int, int], Tensor] = {}
    timing = {"decode_prefix_s": 0.0, "features_s": 0.0, "cached": 0, "computed": 0, "images": 0}
    missing: dict[int, list[int]] = {}
    for ci, c in enumerate(configs):
        for si in (needed[ci] if needed is not None else range(len(sets))):
            s = sets[si]
            got = cache.load(c, s) if cache is not None else None
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
        _compute(model, configs, sets, missing, transform, out, timing, cache=cache, batch_size=batch_size,
                 workers=workers, device=device, progress=progress)  # fmt: skip
    return out, timing


def _compute(model, configs, sets, missing, transform, out, timing, *, cache, batch_size, workers, device,
             progress) -> None:  # fmt: skip
    """The features ``missing`` lists ({config index: set indices}) into ``out``, saved to ``cache``
    (by rank 0 only under torchrun: the others compute the same features)."""
    needed = sorted({si for sis in missing.values() for si in sis})
    offsets, total = {}, 0
    for si in needed:
        offsets[si], total = total, total + len(sets[si].samples)
    depth = len(model.blocks)
    start = min(first_location(configs[ci], depth) for ci in missing)
    loader = _loader([sets[si] for si in needed], transform, batch_size, workers)
    tokens = build_cache(model, loader, start, total=total, device=device, progress=progress)
    if tokens.tokens.shape[0] != total:
        raise RuntimeError(f"decoded {tokens.tokens.shape[0]} of {total} images")
    timing["decode_prefix_s"], timing["images"] = tokens.seconds, total
    t0 = time.perf_counter()
    bar = tqdm(missing.items(), desc="features", unit="cfg", disable=not progress)
    for ci, sis in bar:
        rows = torch.cat([torch.arange(offsets[si], offsets[si] + len(sets[si].samples)) for si in sis])
        view = feature_view(model, configs[ci])
        label = configs[ci].label
        inner = tqdm(total=rows.numel(), unit="img", desc=label, disable=not progress, leave=False)
        feats = run_view(view, tokens, rows=rows, batch_size=batch_size, device=device, bar=inner)
        inner.close()
        at = 0
        for si in sis:
            n = len(sets[si].samples)
            out[(ci, si)] = feats[at : at + n]
            at += n
            if cache is not None and D.rank() == 0:
                cache.save(configs[ci], sets[si], out[(ci, si)])
            timing["computed"] += 1
    timing["features_s"] = time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- head


@dataclass
class LinearHead:
    """A linear classifier on raw features: ``logits = x @ weight.T + bias``; ``l2`` it was fitted with."""

    weight: Tensor  # (K, C)
    bias: Tensor  # (K,)
    l2: float
    holdout: dict = field(default_factory=dict)  # l2 -> held-out top-1 (percent), when it was chosen

    def logits(self, x: Tensor) -> Tensor:
        return x.to(self.weight.dtype) @ self.weight.T + self.bias


def _objective(z: Tensor, y: Tensor, w: Tensor, b: Tensor, l2: float) -> Tensor:
    return F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()


def fit_logistic(
    z: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    *,
    init: tuple[Tensor, Tensor] | None = None,
    max_iter: int = 500,
    tol: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Minimize ``mean CE(z W^T + b, y) + l2/2 ||W||^2`` over W (K, C), b (K,) with full-batch L-BFGS.

    The objective is strictly convex for l2 > 0, so this is its unique minimum (to ``tol``: the
    largest gradient entry). ``init``: a warm start (W, b). Computes in ``z``'s dtype.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    c = z.shape[1]
    w = (init[0].clone() if init else z.new_zeros(num_classes, c)).to(z.dtype).requires_grad_(True)
    b = (init[1].clone() if init else z.new_zeros(num_classes)).to(z.dtype).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _objective(z, y, w, b, l2)
        loss.backward()
        return loss

    with torch.enable_grad(), torch.inference_mode(False):
        opt.step(closure)
    return w.detach(), b.detach()


def _standardize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    mu = x.mean(dim=0)
    sd = x.std(dim=0).clamp_min(1e-6)
    return (x - mu) / sd, mu, sd


def _fold(w: Tensor, b: Tensor, mu: Tensor, sd: Tensor) -> tuple[Tensor, Tensor]:
    """Weights on standardized features -> the same classifier on raw features."""
    w_raw = w / sd
    return w_raw, b - w_raw @ mu


def fit_probe(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    holdout: Tensor | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    *,
    max_iter: int = 200,
) -> LinearHead:
    """Fit the probe head on features ``x`` (n, C) and labels ``y``.

    With several ``l2_grid`` values, each is fitted on the images outside ``holdout`` (a boolean mask)
    and scored on those inside (top-1, ties: lower cross-entropy); the best is then refitted on all.
    """
    x = x.to(torch.float32)
    grid = sorted({float(v) for v in l2_grid}, reverse=True)  # strongest first: warm starts get easier
    if not grid:
        raise ValueError("l2_grid is empty")
    scores: dict[float, float] = {}
    best = grid[0]
    if len(grid) > 1:
        if holdout is None or not bool(holdout.any()) or bool(holdout.all()):
            raise ValueError("choosing l2 needs a non-empty held-out part and a non-empty fitting part")
        z, mu, sd = _standardize(x[~holdout])
        zh, yh = (x[holdout] - mu) / sd, y[holdout]
        init, key = None, None
        for lam in grid:
            w, b = fit_logistic(z, y[~holdout], num_classes, lam, init=init, max_iter=max_iter)
            init = (w, b)
            logits = zh @ w.T + b
            top1 = float((logits.argmax(1) == yh).float().mean()) * 100.0
            scores[lam] = top1
            k = (-top1, float(F.cross_entropy(logits, yh)))
            if key is None or k < key:
                key, best = k, lam
    z, mu, sd = _standardize(x)
    w, b = fit_logistic(z, y, num_classes, best, max_iter=max_iter)
    w_raw, b_raw = _fold(w, b, mu, sd)
    return LinearHead(w_raw, b_raw, best, scores)


# ---------------------------------------------------------------------------------------------- probe


def _bits(correct: Tensor) -> str:
    return "".join("1" if c else "0" for c in correct.tolist())


def _paired(a: str, b: str) -> dict:
    d = paired_difference(a, b)
    return {"delta": d["delta"], "ci95": list(d["ci95"]), "p_mcnemar": d["p_mcnemar"],
            "a_only": d["a_only"], "b_only": d["b_only"]}  # fmt: skip


def with_references(configs: Sequence[PruneConfig]) -> tuple[list[PruneConfig], set[PruneConfig]]:
    """``configs`` plus the unpruned model and each one's EViT twin (unique, in order), and the set of
    those that were added only as references."""
    out = list(dict.fromkeys(configs))
    added = set()
    for c in [PruneConfig(criterion=None), *(t for t in map(evit_twin, configs) if t is not None)]:
        if c not in out:
            out.append(c)
            added.add(c)
    return out, added


def run_probe(
    model: nn.Module,
    configs: Sequence[PruneConfig],
    train: ImageSet,
    evals: Sequence[ImageSet],
    transform: Callable,
    *,
    num_classes: int | None = None,
    cache: FeatureCache | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    head: str = "per-config",
) -> tuple[list[dict], dict]:
    """Probe every configuration (plus the unpruned model and EViT twins as references).

    ``head="per-config"``: each configuration's head is fitted on its own pruned features of ``train``.
    ``head="unpruned"``: one head, fitted on the unpruned model's features, classifies every
    configuration's pruned features (pruning at inference only; ``train`` then runs unpruned only).

    Returns one record per (configuration, evaluation set) — config label, criterion, alpha,
    keep_rate, top1, top5, images, gmacs, the chosen l2, per-image top-1 outcomes and the paired
    differences against the unpruned probe and against EViT at the same keep rate and fusion — and
    timing in seconds.
    """
    t_start = time.perf_counter()
    all_configs, added = with_references(configs)
    labels_seen = [int(s.label) for s in train.samples] + [int(s.label) for e in evals for s in e.samples]
    k = num_classes or (max(labels_seen) + 1)
    if max(labels_seen) >= k:
        raise ValueError(f"labels go up to {max(labels_seen)} but num_classes is {k}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    sets = [train, *evals]
    base = all_configs.index(PruneConfig(criterion=None))
    needed = None
    if head == "unpruned":
        needed = {ci: list(range(len(sets))) if ci == base else list(range(1, len(sets)))
                  for ci in range(len(all_configs))}  # fmt: skip
    feats, timing = extract_features(model, all_configs, sets, transform, cache=cache,
                                     batch_size=batch_size, workers=workers, device=device,
                                     progress=progress, needed=needed)  # fmt: skip
    y = train.labels
    holdout = torch.tensor([is_holdout(s.path) for s in train.samples], dtype=torch.bool)
    t0 = time.perf_counter()
    if head == "unpruned":
        shared = fit_probe(feats[(base, 0)], y, k, holdout, l2_grid)
        heads = dict.fromkeys(range(len(all_configs)), shared)
    else:
        heads = {ci: fit_probe(feats[(ci, 0)], y, k, holdout, l2_grid)
                 for ci in tqdm(range(len(all_configs)), desc="heads", unit="cfg", disable=not progress)}
    timing["heads_s"] = time.perf_counter() - t0
    gmacs = {ci: probe_gmacs(model, c, k) for ci, c in enumerate(all_configs)}
    records: list[dict] = []
    for ei, ev in enumerate(evals, start=1):
        ye = ev.labels
        outcome = {}
        for ci in range(len(all_configs)):
            logits = heads[ci].logits(feats[(ci, ei)])
            top1, top5 = top1_top5(logits, ye)
            nll = F.cross_entropy(logits.double(), ye).item() if ye.numel() else math.nan
            outcome[ci] = (top1, top5, nll)
        for ci, c in enumerate(all_configs):
            top1, top5, nll = outcome[ci]
            twin = evit_twin(c)
            bits = _bits(top1)
            rec = {
                "config": c.label,
                "criterion": c.criterion or "none",
                "alpha": "inf" if math.isinf(c.alpha) else c.alpha,
                "keep_rate": c.keep_rate if c.criterion not in (None, "tome") else None,
                "fuse": c.fuse,
                "settings": config_to_dict(c),
                "eval": ev.name,
                "top1": 100.0 * float(top1.float().mean()) if ye.numel() else math.nan,
                "top5": 100.0 * float(top5.float().mean()) if ye.numel() else math.nan,
                "nll": nll,
                "images": int(ye.numel()),
                "train_images": len(train.samples),
                "gmacs": gmacs[ci],
                "head": head,
                "l2": heads[ci].l2,
                "holdout_top1": {f"{lam:g}": v for lam, v in heads[ci].holdout.items()},
                "reference": c in added,
                "correct": bits,
                "vs_unpruned": _paired(bits, _bits(outcome[base][0])) if ci != base else None,
                "vs_evit": (_paired(bits, _bits(outcome[all_configs.index(twin)][0]))
                            if twin is not None else None),  # fmt: skip
            }
            records.append(rec)
    timing["total_s"] = time.perf_counter() - t_start
    return records, timing

"""Choosing pruning settings on calibration images only: the hash split, the candidates, the choice.

Images are split deterministically by a hash of their file name into a calibration half (used to
choose) and an evaluation half (used to report). ``choose`` picks the best record overall and per
criterion; ``renyiprune tune-alpha`` / ``tune-budget`` write the result as a policy
(``planning.policy``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_BUDGET_CANDIDATES",
    "SPLIT",
    "is_calibration",
    "split_samples",
    "choose",
    "policy_document",
]

#: How a policy file names the split its choices were made on (:func:`is_calibration`).
SPLIT = "calibration = SHA-256 of the file name ends in an even byte (renyiprune.experiments.tune)"

# What ``tune-budget`` chooses from at each compute budget: ToMe and its entropy-aware variants,
# and pruning whose removed tokens are merged, fused or dropped (sweep spec syntax).
DEFAULT_BUDGET_CANDIDATES = (
    "tome",
    "tome[schedule=decreasing]",
    "tome[entropy_weight=0.02;alpha=1]",
    "tome[entropy_weight=0.05;alpha=1]",
    "tome[entropy_weight=0.1;alpha=1]",
    "tome[entropy_weight=0.05;alpha=2]",
    "tome[entropy_weight=0.05;alpha=inf]",
    "tome[schedule=decreasing;entropy_weight=0.05;alpha=1]",
    "evit[removed=merge]",
    "headvar[removed=merge]",
    "renyi:2[removed=merge]",
    "renyi:2@3+evit@6+evit@9[removed=merge]",
    "evit[removed=fuse]",
    "diverse[removed=merge]",
    "pagerank[removed=merge]",
)


def is_calibration(path: str | Path) -> bool:
    """True for the calibration half: the SHA-256 of the file name (not its folder) is even."""
    return hashlib.sha256(Path(path).name.encode()).digest()[-1] % 2 == 0


def split_samples(samples: Sequence) -> tuple[list, list]:
    """(calibration, evaluation) halves of ``samples`` (items with a ``path``), order kept."""
    calib = [s for s in samples if is_calibration(s.path)]
    evals = [s for s in samples if not is_calibration(s.path)]
    return calib, evals


def _setting(record: dict) -> dict:
    c = record["config"]
    a = float(c["alpha"])
    return {
        "criterion": c["criterion"],
        "alpha": "inf" if math.isinf(a) else a,
        "options": dict(c.get("options", {})),
        "label": record["label"],
        "config": c,
        "calibration_top1": record["top1"],
        "gmacs": record["gmacs"],
    }


def choose(records: Sequence[dict]) -> dict:
    """Best record (calibration top-1; ties: fewer GMACs, then first listed) overall and per criterion."""
    order = {id(r): i for i, r in enumerate(records)}

    def key(r):
        return (-r["top1"], r["gmacs"], order[id(r)])

    by: dict[str, dict] = {}
    for r in sorted(records, key=key):
        c = r["config"]
        fixed = ";".join(f"{k}={v}" for k, v in sorted(c.get("options", {}).items()) if k != "lam")
        by.setdefault(c["criterion"] + (f"[{fixed}]" if fixed else ""), _setting(r))
    best = _setting(min(records, key=key))
    return {"best": best, "by_criterion": by}


def policy_document(
    model: str,
    keep: dict,
    *,
    locations: Sequence[int],
    fuse: bool,
    images: tuple[int, int],
    candidates: Sequence[str],
    alphas: Sequence[float | str],
    **about,
) -> dict:
    """A policy file's content (what ``planning.policy.load_policy`` reads): the per-keep-rate choices of
    :func:`choose` under ``keep``, with how they were made: ``images`` = (calibration, evaluation) image
    counts; ``about`` adds descriptive keys (dataset, protocol, lambdas)."""
    calibration_images, evaluation_images = images
    return {
        "model": model,
        **about,
        "locations": list(locations),
        "fuse": fuse,
        "split": SPLIT,
        "calibration_images": calibration_images,
        "evaluation_images": evaluation_images,
        "candidates": sorted(set(candidates)),
        "alphas": ["inf" if isinstance(a, float) and math.isinf(a) else a for a in alphas],
        "keep": keep,
    }

"""Tuned pruning policies: per keep rate, the criterion and settings chosen on calibration images only.

Images are split deterministically by a hash of their file name into a calibration half (used to
choose) and an evaluation half (used to report). A policy is a JSON file; the one shipped for
DeiT-Tiny (``policies/<model>.json``) backs ``patch(model, criterion="best")`` and
``renyiprune eval --criterion best``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

from .evaluate import PruneConfig
from .sweep import config_to_dict

__all__ = [
    "POLICY_DIR",
    "DEFAULT_BUDGET_CANDIDATES",
    "is_calibration",
    "split_samples",
    "load_policy",
    "policy_entry",
    "entry_config",
    "resolve_best",
    "resolve_budget",
    "budget_entry",
    "budget_config",
    "choose",
]

POLICY_DIR = Path(__file__).resolve().parent / "policies"

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


def load_policy(path: str | Path | None = None, model: str = "deit_tiny_patch16_224") -> dict:
    """Read a policy file; without ``path`` the one shipped for ``model``."""
    p = Path(path) if path is not None else POLICY_DIR / f"{model}.json"
    if not p.is_file():
        shipped = ", ".join(sorted(f.stem for f in POLICY_DIR.glob("*.json"))) or "none"
        raise FileNotFoundError(f"no pruning policy {p} (shipped: {shipped}); run renyiprune tune-alpha")
    policy = json.loads(p.read_text())
    if not policy.get("keep") and not policy.get("budget"):
        raise ValueError(f"policy {p} has neither keep rates nor budgets")
    return policy


def policy_entry(policy: dict, keep_rate: float, criterion: str | None = None) -> dict:
    """The policy's setting at the nearest tuned keep rate: the best overall, or for ``criterion``."""
    keeps = {float(k): v for k, v in policy.get("keep", {}).items()}
    if not keeps:
        raise ValueError("the policy has no keep-rate section; use budget= with criterion 'best'")
    k = min(keeps, key=lambda x: (abs(x - keep_rate), x))
    entry = keeps[k]
    if criterion is None:
        return entry["best"]
    by = entry.get("by_criterion", {})
    if criterion not in by:
        raise ValueError(f"policy has no tuned setting for {criterion!r} (it has: {', '.join(by) or 'none'})")
    return by[criterion]


def entry_config(entry: dict, keep_rate: float, locations: Sequence[int], fuse: bool) -> PruneConfig:
    """A ``PruneConfig`` from a policy entry at ``keep_rate``."""
    return PruneConfig(
        entry["criterion"],
        float(keep_rate),
        float(entry.get("alpha", 1.0)),
        tuple(locations),
        bool(fuse),
        tuple(sorted(entry.get("options", {}).items())),
    )


def resolve_best(
    keep_rate: float, model: str = "deit_tiny_patch16_224", path: str | Path | None = None
) -> tuple[str, float, dict]:
    """(criterion, alpha, options) the policy chose for ``keep_rate``."""
    e = policy_entry(load_policy(path, model), float(keep_rate))
    return e["criterion"], float(e.get("alpha", 1.0)), dict(e.get("options", {}))


def budget_entry(policy: dict, budget: float) -> dict | None:
    """The policy's choice at the tuned budget nearest ``budget``; None if it has no budget section."""
    budgets = {float(k): v for k, v in policy.get("budget", {}).items()}
    if not budgets:
        return None
    f = min(budgets, key=lambda x: (abs(x - budget), x))
    return budgets[f]["best"]


def resolve_budget(
    budget: float, model: str = "deit_tiny_patch16_224", path: str | Path | None = None
) -> dict | None:
    """``patch()`` arguments (method, criterion, removed, schedule, ...) the policy chose for the
    budget nearest ``budget``, without the budget itself; None if the policy has no budget section."""
    from .evaluate import patch_kwargs

    config = budget_config(load_policy(path, model), float(budget))
    if config is None:
        return None
    kwargs = patch_kwargs(config)
    for k in ("budget", "keep_rate"):
        kwargs.pop(k, None)
    return kwargs


def budget_config(policy: dict, budget: float):
    """The config of the method the policy chose at the tuned budget nearest ``budget``, with its
    schedule to be solved for ``budget`` itself; None if the policy has no budget section."""
    from .sweep import config_from_dict

    entry = budget_entry(policy, budget)
    if entry is None:
        return None
    c = config_from_dict(entry["config"])
    return PruneConfig(c.criterion, c.keep_rate, c.alpha, c.locations, c.fuse,
                       tuple(sorted({**dict(c.options), "budget": budget}.items())))


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


def config_of(setting: dict, keep_rate: float, locations: Sequence[int], fuse: bool) -> dict:
    """JSON form of the config a setting stands for (used in reports)."""
    return config_to_dict(entry_config(setting, keep_rate, locations, fuse))

"""Tuned pruning policies: the criterion and settings chosen per keep rate, and the method per budget.

A policy is a JSON file written by ``renyiprune tune-alpha`` / ``tune-budget`` (``experiments.tune``
chooses on calibration images only); the one shipped for DeiT-Tiny (``policies/<model>.json``) backs
``policy.best(model_name, keep_rate=... | budget=...)``, ``patch(model, criterion="best")`` and
``renyiprune eval --criterion best``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..core.plans import MergePlan, PrunePlan
from ..models.model import create_model
from .build import build_plan
from .specs import PruneConfig, config_from_dict, parse_stages, patch_kwargs

__all__ = [
    "POLICY_DIR",
    "best",
    "load_policy",
    "policy_entry",
    "entry_config",
    "resolve_best",
    "resolve_budget",
    "budget_entry",
    "budget_config",
]

POLICY_DIR = Path(__file__).resolve().parent / "policies"

def load_policy(path: str | Path | None = None, model: str = "deit_tiny_patch16_224") -> dict:
    """Read a policy file, or the shipped policy named ``path`` (e.g. ``"deit_tiny_patch16_224"``);
    without ``path`` the one shipped for ``model``."""
    p = Path(path) if path is not None else POLICY_DIR / f"{model}.json"
    shipped = POLICY_DIR / f"{path}.json"
    if isinstance(path, str) and p.name == path and not p.is_file() and shipped.is_file():
        p = shipped  # a shipped policy's name
    if not p.is_file():
        shipped = ", ".join(sorted(f.stem for f in POLICY_DIR.glob("*.json"))) or "none"
        raise FileNotFoundError(f"no pruning policy {p} (shipped: {shipped}); run renyiprune tune-alpha")
    try:
        policy = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"policy {p} is not a JSON file: {e}") from None
    if not isinstance(policy, dict):
        raise ValueError(f"policy {p} holds a JSON {type(policy).__name__}, not an object")
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
    entry = budget_entry(policy, budget)
    if entry is None:
        return None
    c = config_from_dict(entry["config"])
    return PruneConfig(c.criterion, c.keep_rate, c.alpha, c.locations, c.fuse,
                       tuple(sorted({**dict(c.options), "budget": budget}.items())))


def best(
    model_name: str = "deit_tiny_patch16_224",
    keep_rate: float | None = None,
    budget: float | None = None,
    *,
    model: nn.Module | None = None,
    path: str | Path | None = None,
    locations: Sequence[int] | None = None,
    removed: str | None = None,
    fuse: bool = False,
    fusion: str | None = None,
    tokens: int | Sequence[int] | None = None,
    **options,
) -> PrunePlan | MergePlan:
    """The plan the tuned policy of ``model_name`` (or the file ``path``) chooses.

    With ``keep_rate``: the criterion and its settings tuned at the nearest keep rate, pruning at
    ``locations`` (a per-stage choice such as ``headvar@3+evit@6`` brings its own) with ``removed`` tokens'
    fate. With ``budget`` (a GMACs fraction): the method chosen at the nearest tuned budget, solved for
    ``budget`` on ``model`` (default: the registered ``model_name`` built with random weights, which has
    the same token counts); a policy tuned per keep rate only gives its criterion at the keep rate that
    meets the budget. ``options`` go to the criterion.
    """
    if (keep_rate is None) == (budget is None):
        raise ValueError("policy.best takes either keep_rate or budget")
    if budget is not None and tokens is not None:
        raise ValueError("pass either budget or tokens, not both")
    policy = load_policy(path, model_name)
    if budget is not None:
        model = create_model(model_name) if model is None else model
        config = budget_config(policy, float(budget))
        if config is not None:  # the policy chose a method for this budget (pruning, merging or ToMe)
            kwargs = patch_kwargs(config)
            kwargs.pop("keep_rate", None)
            return build_plan(model, **{**kwargs, **options})
        pruned = build_plan(model, budget=budget, locations=locations, removed=removed, fuse=fuse,
                            fusion=fusion)  # fmt: skip
        keep_rate = pruned.stages[0].keep_rate
    if isinstance(keep_rate, (list, tuple)):
        raise ValueError('criterion="best" takes one keep_rate')
    entry = policy_entry(policy, float(keep_rate))
    crit, alpha, tuned = entry["criterion"], float(entry.get("alpha", 1.0)), dict(entry.get("options", {}))
    if "@" in crit:
        crit, alpha, locations = parse_stages(crit)
    kw = dict(locations=locations, removed=removed, fuse=fuse, fusion=fusion, **{**tuned, **options})
    if budget is not None:
        return build_plan(model, criterion=crit, alpha=alpha, budget=budget, **kw)
    return build_plan(None, keep_rate, crit, alpha, tokens=tokens, **kw)

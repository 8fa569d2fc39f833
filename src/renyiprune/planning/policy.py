"""Tuned pruning policies: the criterion and settings chosen per keep rate, and the method per budget.

A policy is a JSON file written by ``renyiprune tune-alpha`` / ``tune-budget`` (``experiments.tune``
chooses on calibration images only); the one shipped for DeiT-Tiny (``policies/<model>.json``) backs
``policy.best(model_name, keep_rate=... | budget=...)``, ``patch(model, criterion="best")`` and
``renyiprune eval --criterion best``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..core.plans import MergePlan, PrunePlan, parse_stages, plan_from_dict
from ..models.model import create_model
from .budget import plan_for_budget
from .build import PatchArgs, build_plan

__all__ = [
    "POLICY_DIR",
    "best",
    "load_policy",
    "policy_entry",
    "entry_args",
    "entry_plan",
    "resolve_best",
    "budget_entry",
    "budget_plan",
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


def entry_args(entry: dict, base: PatchArgs) -> PatchArgs:
    """``base`` with a policy entry's criterion, order and options (a per-stage choice such as
    ``headvar@3+evit@6`` brings its own locations); options of ``base`` go over the tuned ones."""
    crit, alpha, locs = entry["criterion"], float(entry.get("alpha", 1.0)), base.locations
    if "@" in crit:
        crit, alpha, locs = parse_stages(crit)
    return replace(base, criterion=crit, alpha=alpha, locations=locs,
                   options={**entry.get("options", {}), **base.options})  # fmt: skip


def entry_plan(entry: dict, keep_rate: float, locations: Sequence[int], fuse: bool) -> PrunePlan:
    """The plan of a policy entry at ``keep_rate``."""
    base = PatchArgs(float(keep_rate), locations=tuple(locations), fuse=fuse)
    return build_plan(entry_args(entry, base))


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


def budget_plan(policy: dict, budget: float) -> PrunePlan | MergePlan | None:
    """The plan of the method the policy chose at the tuned budget nearest ``budget``, its keep rate or r
    still to be solved for ``budget`` (``plan_for_budget``); None if the policy has no budget section."""
    entry = budget_entry(policy, budget)
    return None if entry is None else plan_from_dict(entry["config"])


def best(
    model_name: str = "deit_tiny_patch16_224",
    keep_rate: float | None = None,
    budget: float | None = None,
    *,
    model: nn.Module | None = None,
    path: str | Path | None = None,
    args: PatchArgs | None = None,
) -> PrunePlan | MergePlan:
    """The plan the tuned policy of ``model_name`` (or the file ``path``) chooses.

    With ``keep_rate``: the criterion and its settings tuned at the nearest keep rate, with the locations,
    removed tokens' fate, tokens and criterion options of ``args`` (``patch``'s arguments). With ``budget``
    (a GMACs fraction): the method chosen at the nearest tuned budget, solved for ``budget`` on ``model``
    (default: the registered ``model_name`` built with random weights, which has the same token counts);
    a policy tuned per keep rate only gives its criterion at the keep rate that meets the budget.
    """
    if (keep_rate is None) == (budget is None):
        raise ValueError("policy.best takes either keep_rate or budget")
    args = args or PatchArgs()
    if budget is not None and args.tokens is not None:
        raise ValueError("pass either budget or tokens, not both")
    policy = load_policy(path, model_name)
    if budget is None:
        if isinstance(keep_rate, (list, tuple)):
            raise ValueError('criterion="best" takes one keep_rate')
        entry = policy_entry(policy, float(keep_rate))
        return build_plan(entry_args(entry, replace(args, keep_rate=keep_rate)))
    model = create_model(model_name) if model is None else model
    chosen = budget_plan(policy, float(budget))
    if chosen is not None:  # the policy chose a method for this budget (pruning, merging or ToMe)
        if args.options and isinstance(chosen, PrunePlan):
            chosen = replace(chosen, stages=tuple(
                replace(s, options={**s.options, **args.options}) for s in chosen.stages))  # fmt: skip
        return plan_for_budget(model, chosen, budget)
    plain = replace(args, criterion=None, alpha=1.0, options={}, keep_rate=None, budget=budget)
    rate = plan_for_budget(model, build_plan(plain), budget).stages[0].keep_rate
    entry = policy_entry(policy, rate)
    return plan_for_budget(model, build_plan(entry_args(entry, replace(args, keep_rate=None))), budget)

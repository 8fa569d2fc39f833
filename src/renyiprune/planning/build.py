"""A plan from ``renyiprune.patch``'s keyword arguments: the one place they are interpreted.

``build_plan`` reads the convenience arguments (one value or one per location, ``alpha`` passed to the
criteria that take it, ``fuse``/``removed``, ``tokens``, ``budget``, ``method="tome"`` with its r-schedule)
and returns a ``PrunePlan`` or ``MergePlan``. It needs the model only to solve a ``budget``. Its parameter
list is also ``renyiprune.patch``'s (listed here only).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..core.criteria import Criterion
from ..core.plans import MergePlan, PrunePlan, Stage, per_stage, stage_options
from .budget import plan_for_budget

__all__ = ["build_plan", "DEFAULT_KEEP_RATE", "DEFAULT_LOCATIONS", "DEFAULT_CRITERION"]

DEFAULT_KEEP_RATE = 0.7
DEFAULT_LOCATIONS = (3, 6, 9)
DEFAULT_CRITERION = "renyi"


def build_plan(
    model: nn.Module | None = None,
    keep_rate: float | Sequence[float] | None = None,
    criterion: str | Criterion | Sequence[str | Criterion] | None = None,
    alpha: float | Sequence[float] = 1.0,
    locations: Sequence[int] | None = None,
    fuse: bool = False,
    *,
    removed: str | None = None,
    method: str = "prune",
    r: int | Sequence[int] = 16,
    schedule: str = "constant",
    budget: float | None = None,
    tokens: int | Sequence[int] | None = None,
    fusion: str | None = None,
    **criterion_options,
) -> PrunePlan | MergePlan:
    """The plan ``renyiprune.patch(model, ...)`` applies for these arguments (see its docstring)."""
    if method not in ("prune", "tome"):
        raise ValueError(f"method must be 'prune' or 'tome', got {method!r}")
    if method == "tome":
        return _merge_plan(model, alpha, r, schedule, budget, criterion_options, dict(
            keep_rate=keep_rate, criterion=criterion, locations=locations, tokens=tokens, removed=removed,
            fusion=fusion, fuse=fuse or None))  # fmt: skip
    removed = removed or ("fuse" if fuse else "drop")
    if removed not in ("drop", "fuse", "merge"):
        raise ValueError(f"removed must be drop, fuse or merge, got {removed!r}")
    if fusion is not None and removed != "fuse":
        raise ValueError(f"fusion={fusion!r} applies to fused pruning only (fuse=True or removed='fuse')")
    if budget is not None and tokens is not None:
        raise ValueError("pass either budget or tokens, not both")
    keep_rate = DEFAULT_KEEP_RATE if keep_rate is None else keep_rate
    criterion = DEFAULT_CRITERION if criterion is None else criterion
    locs = [int(i) for i in (DEFAULT_LOCATIONS if locations is None else locations)]
    if budget is not None:
        if model is None:
            raise ValueError("a budget is solved for a model: pass the model")
        return plan_for_budget(model, "prune", budget, criterion=criterion, alpha=alpha, locations=locs,
                               removed=removed, fusion=fusion, **criterion_options)  # fmt: skip
    crits = per_stage(criterion, len(locs), "criterion")
    alphas = per_stage(alpha, len(locs), "alpha")
    if tokens is not None:
        counts, rates = per_stage(tokens, len(locs), "tokens"), [None] * len(locs)
    else:
        rates, counts = per_stage(keep_rate, len(locs), "keep_rate"), [None] * len(locs)
    stages = [Stage(loc, rate, t, c, stage_options(c, a, criterion_options))
              for loc, rate, t, c, a in zip(locs, rates, counts, crits, alphas, strict=True)]  # fmt: skip
    return PrunePlan(tuple(stages), removed=removed, fusion=fusion)


def _merge_plan(model, alpha, r, schedule: str, budget, options: dict, pruning_only: dict) -> MergePlan:
    """method="tome": ToMe's r-schedule (or the r meeting ``budget``), with an optional merge order."""
    given = sorted(k for k, v in pruning_only.items() if v is not None)
    if given:
        raise ValueError(
            f"method='tome' merges r tokens after every block; {', '.join(given)} apply to method='prune' "
            "(for merging at chosen locations use method='prune' with removed='merge')"
        )
    opts = dict(options)
    merge_kw = dict(entropy_weight=float(opts.pop("entropy_weight", 0.0)),
                    merge_order=str(opts.pop("merge_order", "entropy")))  # fmt: skip
    if opts:
        raise ValueError(f"method tome takes no option {', '.join(sorted(opts))}")
    a = alpha[0] if isinstance(alpha, (list, tuple)) else alpha
    if budget is not None:
        if model is None:
            raise ValueError("a budget is solved for a model: pass the model")
        return plan_for_budget(model, "tome", budget, schedule=schedule, alpha=a, **merge_kw)
    return MergePlan(r=tuple(r) if isinstance(r, (list, tuple)) else int(r), schedule=schedule, alpha=a,
                     **merge_kw)  # fmt: skip

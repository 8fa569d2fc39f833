"""The points a sweep or a tuning run crosses: criteria specs x orders x keep rates (or budgets) x fusion.

``Grid`` holds the crossed values; ``grid_points`` reads criterion specs in the command-line grammar
(``renyi:2``, ``hybrid[base=headvar]``, ``tome[schedule=decreasing]``, ``renyi:2@3+evit@6``) and returns
one ``Point`` per combination, each plan built (and so checked) before any image is read.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.criteria import list_criteria, takes_alpha
from ..core.entropy import parse_alpha
from ..planning.build import PatchArgs, build_plan, spec_args
from ..planning.points import Point
from ..planning.specs import check_options, parse_stages, split_criterion

__all__ = ["Grid", "parse_spec", "grid_points"]


@dataclass(frozen=True)
class Grid:
    """Values crossed with every criterion: keep rates (or compute ``budget`` fractions instead), Rényi
    orders (for criteria that take one), hybrid weights λ, fusion off/on, and the pruning locations."""

    keep: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)
    alpha: Sequence[float] = (0.5, 1.0, 2.0, 3.0, float("inf"))
    lambdas: Sequence[float] = (0.5,)
    fuse: Sequence[bool] = (False,)
    locations: Sequence[int] = (3, 6, 9)
    budget: Sequence[float] = ()


def parse_spec(spec: str, alphas: Sequence[float]) -> tuple[str, list[float], dict]:
    """'renyi:2[removed=merge]' -> ('renyi', [2.0], {'removed': 'merge'}): the criterion (or tome, or a
    per-stage spec), the orders it is crossed with (``alphas`` where it takes one), fixed options."""
    crit, extra = split_criterion(spec)  # 'hybrid[base=headvar]': fixed criterion options
    tuned = takes_alpha(crit, extra)  # hybrid takes an order only while its base is the Rényi score
    alphas = list(alphas) if tuned else [1.0]
    if tuned and "alpha" in extra:  # 'evit_renyi[alpha=inf]' is 'evit_renyi:inf'
        alphas = [parse_alpha(str(extra.pop("alpha")))]
    if "@" in crit:
        parse_stages(crit)
    elif ":" in crit:  # 'hybrid:2': this criterion at one alpha only
        crit, a = crit.split(":", 1)
        alphas = [parse_alpha(a)]
    if crit == "tome":
        return crit, [1.0], extra
    if "@" not in crit and crit not in list_criteria():
        raise ValueError(f"unknown criterion {crit!r}; known: tome, {', '.join(list_criteria())}")
    check_options(crit, extra)  # a misspelt option fails now, before the model is loaded
    return crit, alphas, extra


def _tome_points(extra: dict, budgets: Sequence[float]) -> list[Point]:
    """ToMe does not fuse: one point per budget (r solved), or its r, whatever the fusion setting."""
    if not budgets and "r" not in extra:
        raise ValueError("tome in a sweep needs --budget or an r: tome[r=16]")
    plan = build_plan(spec_args("tome", extra, PatchArgs()))
    return [Point(plan, budget=f) for f in budgets] or [Point(plan)]


def grid_points(grid: Grid, criteria: Sequence[str], adaptive: Sequence[str] = ()) -> list[Point]:
    """Cross ``criteria`` with the grid (the ``adaptive`` ones also in per-image adaptive keep mode);
    unique points in order. Raises ValueError naming the spec that is wrong."""
    points: list[Point] = []
    specs = [(c, False) for c in criteria] + [(c, True) for c in adaptive]
    for fuse, (spec, is_adaptive) in itertools.product(grid.fuse, specs):
        try:
            crit, alphas, extra = parse_spec(spec, grid.alpha)
        except ValueError as e:
            raise ValueError(f"{'--adaptive' if is_adaptive else '--criterion'} {spec!r}: {e}") from None
        if crit == "tome":
            points += _tome_points(extra, grid.budget)
            continue
        lams = grid.lambdas if crit == "hybrid" else [None]
        by_budget = grid.budget and not is_adaptive
        steps = [(1.0, f) for f in grid.budget] if by_budget else [(r, None) for r in grid.keep]
        for a, lam, (r, f) in itertools.product(alphas, lams, steps):
            opts = {**extra, **({"lam": float(lam)} if lam is not None else {})}
            base = PatchArgs(r, alpha=a, locations=tuple(grid.locations), fuse=fuse)
            points.append(Point(build_plan(spec_args(crit, opts, base)), f, is_adaptive))
    return list(dict.fromkeys(points))

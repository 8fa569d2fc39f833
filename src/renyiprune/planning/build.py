"""A plan from ``renyiprune.patch``'s keyword arguments: the one place they are interpreted.

``PatchArgs`` holds those arguments (its fields are ``patch``'s parameter list, listed only here);
``build_plan`` reads the conveniences (one value or one per location, ``alpha`` passed to the criteria
that take it, ``fuse``/``removed``, ``tokens``, ``budget``, ``method="tome"`` with its r-schedule) and
returns a ``PrunePlan`` or ``MergePlan``; with a ``budget`` its keep rate or r is still to be solved for a
model (``budget.plan_for_budget``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..core.criteria import Criterion
from ..core.entropy import parse_alpha
from ..core.plans import MergePlan, PrunePlan, make_stages, parse_stages

__all__ = ["PatchArgs", "build_plan", "spec_args", "PATCH_SIGNATURE", "DEFAULT_KEEP_RATE",
           "DEFAULT_LOCATIONS", "DEFAULT_CRITERION"]  # fmt: skip

DEFAULT_KEEP_RATE = 0.7
DEFAULT_LOCATIONS = (3, 6, 9)
DEFAULT_CRITERION = "renyi"
_POSITIONAL = 5  # keep_rate, criterion, alpha, locations, fuse may be passed by position


@dataclass(frozen=True)
class PatchArgs:
    """The arguments of ``renyiprune.patch`` after the model (see its docstring); ``options`` go to the
    criterion (or, for ``method="tome"``, ``entropy_weight`` and ``merge_order``)."""

    keep_rate: float | Sequence[float] | None = None
    criterion: str | Criterion | Sequence[str | Criterion] | None = None
    alpha: float | Sequence[float] = 1.0
    locations: Sequence[int] | None = None
    fuse: bool = False
    removed: str | None = None
    method: str = "prune"
    r: int | Sequence[int] = 16
    schedule: str = "constant"
    budget: float | None = None
    tokens: int | Sequence[int] | None = None
    fusion: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def bind(cls, *args: Any, **kwargs: Any) -> PatchArgs:
        """``patch``'s arguments after the model, positional or by name; unknown names are options."""
        bound = PATCH_SIGNATURE.bind(None, *args, **kwargs).arguments
        bound.pop("model")
        options = dict(bound.pop("options", {}))
        return cls(**bound, options=options)

    def with_options(self, **options: Any) -> PatchArgs:
        """The same arguments with ``options`` put over the criterion options."""
        return replace(self, options={**self.options, **options})


def _signature() -> inspect.Signature:
    """``patch(model, keep_rate, criterion, alpha, locations, fuse, *, removed, ..., **options)``."""
    P = inspect.Parameter
    params = [P("model", P.POSITIONAL_OR_KEYWORD, annotation="nn.Module")]
    for i, f in enumerate(f for f in fields(PatchArgs) if f.name != "options"):
        kind = P.POSITIONAL_OR_KEYWORD if i < _POSITIONAL else P.KEYWORD_ONLY
        params.append(P(f.name, kind, default=f.default, annotation=f.type))
    return inspect.Signature([*params, P("options", P.VAR_KEYWORD)], return_annotation="nn.Module")


PATCH_SIGNATURE = _signature()


def build_plan(args: PatchArgs) -> PrunePlan | MergePlan:
    """The plan ``renyiprune.patch(model, ...)`` applies for ``args`` (with a budget: before it is solved)."""
    if args.method not in ("prune", "tome"):
        raise ValueError(f"method must be 'prune' or 'tome', got {args.method!r}")
    if args.method == "tome":
        return _merge_plan(args)
    if args.budget is not None and args.tokens is not None:
        raise ValueError("pass either budget or tokens, not both")
    removed = args.removed or ("fuse" if args.fuse else "drop")
    keep = DEFAULT_KEEP_RATE if args.keep_rate is None else args.keep_rate
    stages = make_stages(DEFAULT_LOCATIONS if args.locations is None else args.locations,
                         DEFAULT_CRITERION if args.criterion is None else args.criterion, args.alpha,
                         keep if args.tokens is None else None, args.tokens, args.options)  # fmt: skip
    return PrunePlan(stages, removed=removed, fusion=args.fusion)


def _merge_plan(args: PatchArgs) -> MergePlan:
    """method="tome": ToMe's r-schedule (or the r meeting ``budget``), with an optional merge order."""
    pruning_only = dict(keep_rate=args.keep_rate, criterion=args.criterion, locations=args.locations,
                        tokens=args.tokens, removed=args.removed, fusion=args.fusion, fuse=args.fuse or None)
    given = sorted(k for k, v in pruning_only.items() if v is not None)
    if given:
        raise ValueError(
            f"method='tome' merges r tokens after every block; {', '.join(given)} apply to method='prune' "
            "(for merging at chosen locations use method='prune' with removed='merge')"
        )
    opts = dict(args.options)
    merge_kw = dict(entropy_weight=float(opts.pop("entropy_weight", 0.0)),
                    merge_order=str(opts.pop("merge_order", "entropy")))  # fmt: skip
    if opts:
        raise ValueError(f"method tome takes no option {', '.join(sorted(opts))}")
    a = args.alpha[0] if isinstance(args.alpha, (list, tuple)) else args.alpha
    r = tuple(args.r) if isinstance(args.r, (list, tuple)) else int(args.r)
    return MergePlan(r=r if args.budget is None else 0, schedule=args.schedule, alpha=a, **merge_kw)


_OWN = ("removed", "fusion", "tokens", "r", "schedule")  # bracket options that are patch's own arguments


def spec_args(spec: str, options: Mapping[str, Any], base: PatchArgs) -> PatchArgs:
    """``base`` for a command line's criterion ``spec`` with its bracket ``options``: ``tome`` is ToMe
    (``method="tome"``, ``alpha`` its merge order's), a per-stage ``renyi:2@3+evit@6`` brings its locations
    and orders, and removed, fusion, tokens, r and schedule are ``patch``'s own; the rest go to the
    criterion."""
    opts = dict(options)
    own = {k: opts.pop(k) for k in _OWN if k in opts}
    if spec == "tome":
        alpha = float(parse_alpha(str(opts.pop("alpha")))) if "alpha" in opts else base.alpha
        return PatchArgs(method="tome", alpha=alpha, **own, options=opts)
    crit, alpha, locs = spec, base.alpha, base.locations
    if "@" in spec:
        crit, alpha, locs = parse_stages(spec)
    return replace(base, criterion=crit, alpha=alpha, locations=locs, **own, options={**base.options, **opts})

"""Plans: small, validated descriptions of what ``prune`` and ``merge`` will do to a model.

A ``PrunePlan`` lists its pruning locations (``Stage``: block, keep rate or patch count, criterion and
its options) and the fate of pruned tokens; a ``MergePlan`` is ToMe's r-schedule and merge order.
Plans are plain frozen data: building one checks every value (a bad criterion option fails here, not at
the first forward) but touches no model; ``core.api.prune`` / ``merge`` apply them. ``to_dict`` /
``plan_from_dict`` are the JSON form sweeps record, policies ship and caches key on, and ``label`` the
one name tables and records use; ``UNPRUNED`` (a plan with no stages, label "unpruned") is the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .criteria import CRITERIA, criterion_options, list_criteria, make_criterion, takes_alpha
from .entropy import check_alpha, parse_alpha
from .merge_order import get_merge_order
from .selection import check_fusion, check_keep_rate

__all__ = [
    "Stage", "PrunePlan", "MergePlan", "REMOVED", "UNPRUNED", "tome_schedule", "per_stage", "stage_options",
    "make_stages", "parse_stages", "plan_from_dict", "plan_record", "plan_label",
]  # fmt: skip

REMOVED = ("drop", "fuse", "merge")  # what happens to pruned tokens


@dataclass(frozen=True)
class Stage:
    """One pruning location: after block ``location``'s attention keep ``keep_rate`` of the current patches
    (or ``tokens`` patches) with the highest ``criterion`` scores; ``options`` go to the criterion (its
    Rényi order included: ``{"alpha": 2}``)."""

    location: int
    keep_rate: float | None = None
    tokens: int | None = None
    criterion: str | Callable = "renyi"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.location) != self.location or self.location < 0:
            raise ValueError(f"a pruning location is a block index >= 0, got {self.location!r}")
        object.__setattr__(self, "location", int(self.location))
        if (self.keep_rate is None) == (self.tokens is None):
            raise ValueError("a stage takes either keep_rate or tokens (patches kept), not both or neither")
        if self.keep_rate is not None:
            object.__setattr__(self, "keep_rate", check_keep_rate(self.keep_rate))
        elif int(self.tokens) != self.tokens or self.tokens < 1:
            raise ValueError(f"tokens must be >= 1 patch per location, got {self.tokens!r}")
        else:
            object.__setattr__(self, "tokens", int(self.tokens))
        object.__setattr__(self, "options", dict(self.options))
        make_criterion(self.criterion, **self.options)  # unknown names and bad options fail here

    def __hash__(self) -> int:  # options are a dict: hash their sorted items (plans key sweeps and tables)
        opts = tuple(sorted((k, repr(v)) for k, v in self.options.items()))
        return hash((self.location, self.keep_rate, self.tokens, self.criterion, opts))

    @property
    def name(self) -> str:
        """The criterion's name as ``describe()`` shows it: ``renyi(a=2)``."""
        c = self.criterion
        text = getattr(c, "__name__", "custom") if callable(c) else c
        return f"{text}(a={self.options['alpha']:g})" if "alpha" in self.options else text


class _Recorded:
    """What both plan types share: one label and one JSON form (``plan_label``, ``plan_record``)."""

    @property
    def label(self) -> str:
        """The plan's name in tables and records: ``renyi a=2 r=0.7 +fuse``, ``tome r=16``."""
        return plan_label(self)

    def to_dict(self) -> dict:
        """JSON form (``plan_record``); ``from_dict`` reads it back."""
        return plan_record(self)

    @classmethod
    def from_dict(cls, d: Mapping):
        """Inverse of ``to_dict`` (also reads records written before plans had it)."""
        plan = plan_from_dict(d)
        if not isinstance(plan, cls):
            raise ValueError(f"{d.get('criterion')!r} does not describe a {cls.__name__}")
        return plan


@dataclass(frozen=True)
class PrunePlan(_Recorded):
    """Prune at each ``Stage`` (increasing, distinct locations). ``removed``: ``drop``, ``fuse`` (one extra
    token of the pruned ones weighted by CLS attention; ``fusion`` ``"evit"``, the default, or
    ``"renorm"``, see ``selection``) or ``merge`` (each into its most similar kept token, with
    proportional attention afterwards)."""

    stages: tuple[Stage, ...]
    removed: str = "drop"
    fusion: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not all(isinstance(s, Stage) for s in self.stages):
            raise TypeError("PrunePlan.stages must be Stage objects")
        if self.removed not in REMOVED:
            raise ValueError(f"removed must be drop, fuse or merge, got {self.removed!r}")
        if self.fusion is not None and self.removed != "fuse":
            raise ValueError(
                f"fusion={self.fusion!r} applies to fused pruning only (fuse=True or removed='fuse')"
            )
        object.__setattr__(self, "fusion", check_fusion(self.fusion) if self.removed == "fuse" else None)
        locs = list(self.locations)
        if locs != sorted(set(locs)):
            raise ValueError(f"locations must be increasing and distinct, got {locs}")

    @classmethod
    def uniform(
        cls,
        keep_rate: float | Sequence[float] | None = 0.7,
        criterion: str | Callable | Sequence[str | Callable] = "renyi",
        locations: Sequence[int] = (3, 6, 9),
        *,
        tokens: int | Sequence[int] | None = None,
        removed: str = "drop",
        fusion: str | None = None,
        **options,
    ) -> PrunePlan:
        """The same kind of stage at every location: ``keep_rate``, ``tokens`` and ``criterion`` may be one
        value or one per location; ``options`` go to every stage's criterion as they are."""
        stages = make_stages(locations, criterion, None, keep_rate, tokens, options)
        return cls(stages, removed=removed, fusion=fusion)

    @property
    def locations(self) -> tuple[int, ...]:
        return tuple(s.location for s in self.stages)

    def with_keep_rate(self, keep_rate: float) -> PrunePlan:
        """The same plan keeping ``keep_rate`` of the patches at every location."""
        return replace(self, stages=tuple(replace(s, keep_rate=keep_rate, tokens=None) for s in self.stages))


@dataclass(frozen=True)
class MergePlan(_Recorded):
    """ToMe: merge ``r`` tokens by bipartite soft matching after every block (an int, one int per block, or
    ``schedule="decreasing"``: 2r at the first block down to 0 at the last). ``entropy_weight`` > 0 adds
    that weight x the merge order ``merge_order`` (of Rényi order ``alpha``) to the match similarities."""

    r: int | tuple[int, ...] = 16
    schedule: str = "constant"
    merge_order: str = "entropy"
    entropy_weight: float = 0.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.r, (list, tuple)):
            object.__setattr__(self, "r", tuple(int(v) for v in self.r))
        if self.schedule not in ("constant", "decreasing"):
            raise ValueError(f"schedule must be constant or decreasing, got {self.schedule!r}")
        get_merge_order(self.merge_order)  # unknown names fail here
        object.__setattr__(self, "entropy_weight", float(self.entropy_weight))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        tome_schedule(self.r, self.schedule, len(self.r) if isinstance(self.r, tuple) else 2)  # r >= 0

    def per_block(self, depth: int) -> list[int]:
        """Tokens merged after each of ``depth`` blocks."""
        return tome_schedule(self.r, self.schedule, depth)


UNPRUNED = PrunePlan(())  # the reference: no pruning location


def tome_schedule(r: int | Sequence[int], schedule: str, depth: int) -> list[int]:
    """Tokens merged after each block: constant r, an explicit list, or linearly decreasing 2r -> 0."""
    if isinstance(r, (list, tuple)):
        if len(r) != depth:
            raise ValueError(f"r: got {len(r)} values for {depth} blocks")
        out = [int(v) for v in r]
    elif schedule == "constant":
        out = [int(r)] * depth
    elif schedule == "decreasing":
        out = [round(2 * int(r) * (1 - i / (depth - 1))) if depth > 1 else int(r) for i in range(depth)]
    else:
        raise ValueError(f"schedule must be constant or decreasing, got {schedule!r}")
    if any(v < 0 for v in out):
        raise ValueError(f"r must be >= 0, got {out}")
    return out


def per_stage(value, count: int, what: str) -> list:
    """``value`` repeated for ``count`` locations, or checked to hold one value per location."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{what}: got {len(value)} values for {count} pruning locations")
        return list(value)
    return [value] * count


def stage_options(criterion: str | Callable, alpha: float, options: Mapping[str, Any]) -> dict:
    """``options`` plus ``alpha`` when ``criterion`` is a registered one that takes a Rényi order (a
    convenience that lets one ``alpha`` go with criteria that have none)."""
    opts = dict(options)
    registered = not callable(criterion) and criterion in CRITERIA
    if registered and "alpha" in criterion_options(CRITERIA[criterion]):
        opts["alpha"] = alpha
    return opts


def make_stages(locations, criterion, alpha, keep_rate, tokens, options: Mapping[str, Any]
                ) -> tuple[Stage, ...]:
    """One ``Stage`` per location; criterion, alpha, keep rate or tokens are one value or one per location;
    ``alpha`` (None: none) goes to the registered criteria that take it (``stage_options``)."""
    locs = [int(i) for i in locations]
    n = len(locs)
    crits = per_stage(criterion, n, "criterion")
    alphas = per_stage(alpha, n, "alpha")
    if tokens is not None:
        counts, rates = per_stage(tokens, n, "tokens"), [None] * n
    else:
        rates, counts = per_stage(keep_rate, n, "keep_rate"), [None] * n
    rows = zip(locs, rates, counts, crits, alphas, strict=True)
    return tuple(Stage(loc, r, t, c, options if a is None else stage_options(c, a, options))
                 for loc, r, t, c, a in rows)  # fmt: skip


def parse_stages(spec: str) -> tuple[list[str], list[float], tuple[int, ...]]:
    """Parse a per-stage criterion ``renyi:2@3+evit@6+evit@9`` (``name[:alpha]@block`` joined by ``+``)
    into per-location criteria, alphas (1 where none is given) and locations."""
    crits, alphas, locs = [], [], []
    for part in spec.split("+"):
        head, at, loc = part.strip().partition("@")
        if not at or not loc.strip().isdigit():
            raise ValueError(f"per-stage criterion {part!r} needs name[:alpha]@block, e.g. renyi:2@3")
        name, _, a = head.partition(":")
        if name not in list_criteria():
            raise ValueError(f"unknown criterion {name!r} in {spec!r}; known: {', '.join(list_criteria())}")
        crits.append(name)
        alphas.append(parse_alpha(a) if a else 1.0)
        locs.append(int(loc))
    if locs != sorted(set(locs)):
        raise ValueError(f"per-stage locations must increase: {spec!r}")
    return crits, alphas, tuple(locs)


def _out(v):
    """JSON-safe value: inf as "inf", tuples as lists."""
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return list(v) if isinstance(v, tuple) else v


def _in(v):
    """Inverse of ``_out`` (lists as tuples)."""
    return float(v) if v == "inf" else tuple(v) if isinstance(v, list) else v


def _flat(criterion, keep_rate: float, alpha: float, locations, fuse: bool, options: dict) -> dict:
    return {"criterion": criterion, "keep_rate": keep_rate, "alpha": _out(float(alpha)),
            "locations": list(locations), "fuse": fuse,
            "options": {k: _out(v) for k, v in sorted(options.items())}, "budget": False}  # fmt: skip


def _merge_record(p: MergePlan) -> dict:
    opts: dict = {"r": p.r}
    if p.schedule != "constant":
        opts["schedule"] = p.schedule
    if p.entropy_weight or p.alpha != 1.0:
        opts.update(entropy_weight=p.entropy_weight, alpha=p.alpha)
    if p.merge_order != "entropy":
        opts["merge_order"] = p.merge_order
    return _flat("tome", 1.0, 1.0, (), False, opts)


def _prune_record(p: PrunePlan) -> dict | None:
    """The flat record of ``p``; None where it has none (per-stage keep rates or options, custom criteria)."""
    st = p.stages
    alphas = [s.options.get("alpha") for s in st]
    rest = [{k: v for k, v in s.options.items() if k != "alpha"} for s in st]
    if any(callable(s.criterion) or r != rest[0] for s, r in zip(st, rest, strict=True)):
        return None
    counts = [s.tokens for s in st]
    if len({s.keep_rate for s in st}) != 1 or (None in counts and any(c is not None for c in counts)):
        return None
    opts = dict(rest[0])
    if counts[0] is not None:
        opts["tokens"] = list(counts)
    if p.removed == "merge":
        opts["removed"] = "merge"
    if p.fusion not in (None, "evit"):
        opts["fusion"] = p.fusion
    crit, alpha = st[0].criterion, alphas[0] if alphas[0] is not None else 1.0
    if len({(s.criterion, a) for s, a in zip(st, alphas, strict=True)}) > 1:
        crit, alpha = "+".join(f"{s.criterion}{'' if a in (None, 1.0) else f':{a:g}'}@{s.location}"
                               for s, a in zip(st, alphas, strict=True)), 1.0  # fmt: skip
    d = _flat(crit, st[0].keep_rate or 1.0, alpha, p.locations, p.removed == "fuse", opts)
    if p.removed == "fuse":
        d["fusion"] = p.fusion
    return d


def plan_record(plan: PrunePlan | MergePlan, budget: float | None = None, adaptive: bool = False) -> dict:
    """The JSON form of ``plan``: the flat record (criterion, keep_rate, alpha, locations, fuse, options)
    that sweep logs, policies and probe caches have always held, so their keys stay the same; a plan it
    cannot describe (keep rates or options differing by stage) as its list of stages. ``budget`` (a
    GMACs fraction the keep rate or r is solved for) and ``adaptive`` (per-image keep) are noted as well."""
    d = _merge_record(plan) if isinstance(plan, MergePlan) else \
        _flat(None, 1.0, 1.0, (), False, {}) if not plan.stages else _prune_record(plan)
    if d is None:
        if budget is not None or adaptive:
            raise ValueError("a budget or adaptive keep takes one keep rate and one set of options")
        stages = [{"location": s.location, "keep_rate": s.keep_rate, "tokens": s.tokens,
                   "criterion": s.criterion, "options": {k: _out(v) for k, v in s.options.items()}}
                  for s in plan.stages]  # fmt: skip
        return {"stages": stages, "removed": plan.removed, "fusion": plan.fusion}
    if budget is not None:
        d["keep_rate"] = 1.0
        d["options"] = {k: v for k, v in {**d["options"], "budget": budget}.items() if k != "r"}
        d["options"] = dict(sorted(d["options"].items()))
    d["budget"] = bool(adaptive)
    return d


def plan_from_dict(d: Mapping) -> PrunePlan | MergePlan:
    """The plan of a ``plan_record`` dict (its budget and adaptive flags aside)."""
    if "stages" in d:
        stages = [Stage(s["location"], s.get("keep_rate"), s.get("tokens"), s["criterion"],
                        {k: _in(v) for k, v in s.get("options", {}).items()})
                  for s in d["stages"]]  # fmt: skip
        return PrunePlan(tuple(stages), d.get("removed", "drop"), d.get("fusion"))
    opts = {k: _in(v) for k, v in d.get("options", {}).items() if k != "budget"}
    crit = d["criterion"]
    if crit is None:
        return UNPRUNED
    if crit == "tome":
        merge = {k: opts[k] for k in ("schedule", "merge_order", "entropy_weight", "alpha") if k in opts}
        return MergePlan(r=opts.get("r", 16), **merge)
    removed = opts.pop("removed", "fuse" if d["fuse"] else "drop")
    # a fused record names its fusion rule; those written before EViT's became the default used "renorm"
    fusion = d.get("fusion", opts.get("fusion", "renorm")) if removed == "fuse" else None
    opts.pop("fusion", None)
    tokens = opts.pop("tokens", None)
    alpha, locs = float(_in(d["alpha"])), d["locations"]
    if "@" in crit:
        crit, alpha, locs = parse_stages(crit)
    stages = make_stages(locs, crit, alpha, None if tokens else float(d["keep_rate"]), tokens, opts)
    return PrunePlan(stages, removed, fusion)


def plan_label(plan: PrunePlan | MergePlan, budget: float | None = None, adaptive: bool = False) -> str:
    """The one name of a plan (with its budget or adaptive keep) in tables, records and policies:
    ``renyi a=2 heads=pooled r=0.7 +fuse``, ``tome schedule=decreasing budget=0.5``, ``unpruned``."""
    if isinstance(plan, PrunePlan) and _prune_record(plan) is None and plan.stages:
        rates = ",".join(f"{s.tokens}" if s.tokens is not None else f"{s.keep_rate:g}" for s in plan.stages)
        return f"{'+'.join(f'{s.name}@{s.location}' for s in plan.stages)} r={rates} +{plan.removed}"
    d = plan_record(plan, budget, adaptive)
    crit, opts = d["criterion"], {k: _in(v) for k, v in d["options"].items()}
    if crit is None:
        return "unpruned"
    text = crit + (f" a={float(_in(d['alpha'])):g}" if takes_alpha(crit, opts) else "")
    text += "".join(f" {k}={v}" for k, v in opts.items() if k not in ("budget", "removed", "tokens"))
    if "budget" in opts:
        text += f" budget={opts['budget']:g}"
    elif "tokens" in opts:
        text += f" tokens={','.join(str(t) for t in opts['tokens'])}"
    elif crit != "tome":
        text += f" budget r={d['keep_rate']:g}" if adaptive else f" r={d['keep_rate']:g}"
    removed = opts.get("removed", "fuse" if d["fuse"] else "drop")
    return text + ("" if removed == "drop" or crit == "tome" else f" +{removed}")

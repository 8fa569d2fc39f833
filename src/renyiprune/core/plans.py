"""Plans: small, validated descriptions of what ``prune`` and ``merge`` will do to a model.

A ``PrunePlan`` lists its pruning locations (``Stage``: block, keep rate or patch count, criterion and
its options) and the fate of pruned tokens; a ``MergePlan`` is ToMe's r-schedule and merge order.
Plans are plain frozen data: building one checks every value (a bad criterion option fails here, not at
the first forward) but touches no model; ``core.api.prune`` / ``merge`` apply them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .criteria import CRITERIA, criterion_options, make_criterion
from .entropy import check_alpha
from .merge_order import get_merge_order
from .selection import check_fusion, check_keep_rate

__all__ = ["Stage", "PrunePlan", "MergePlan", "REMOVED", "tome_schedule", "per_stage", "stage_options"]

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

    @property
    def name(self) -> str:
        """The criterion's name as ``describe()`` shows it: ``renyi(a=2)``."""
        c = self.criterion
        text = getattr(c, "__name__", "custom") if callable(c) else c
        return f"{text}(a={self.options['alpha']:g})" if "alpha" in self.options else text


@dataclass(frozen=True)
class PrunePlan:
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
        locs = [int(i) for i in locations]
        crits = per_stage(criterion, len(locs), "criterion")
        if tokens is not None:
            counts, rates = per_stage(tokens, len(locs), "tokens"), [None] * len(locs)
        else:
            rates, counts = per_stage(keep_rate, len(locs), "keep_rate"), [None] * len(locs)
        rows = zip(locs, rates, counts, crits, strict=True)
        stages = [Stage(loc, r, t, c, options) for loc, r, t, c in rows]
        return cls(tuple(stages), removed=removed, fusion=fusion)

    @property
    def locations(self) -> tuple[int, ...]:
        return tuple(s.location for s in self.stages)

    def with_keep_rate(self, keep_rate: float) -> PrunePlan:
        """The same plan keeping ``keep_rate`` of the patches at every location."""
        return replace(self, stages=tuple(replace(s, keep_rate=keep_rate, tokens=None) for s in self.stages))


@dataclass(frozen=True)
class MergePlan:
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

"""``Point``: a plan as an evaluation or a sweep runs it, with a compute budget or per-image adaptive keep.

Both are run settings, not plan fields: a budget becomes a keep rate (or r) only on a model
(``plan_for_budget``), and adaptive keep only with calibration images (``experiments.sweep``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from ..core.plans import UNPRUNED, MergePlan, PrunePlan, plan_from_dict, plan_label, plan_record
from .budget import plan_for_budget
from .build import PatchArgs, build_plan, spec_args

__all__ = ["Point"]


@dataclass(frozen=True)
class Point:
    """``plan``, its keep rate or r re-solved for GMACs <= ``budget`` x unpruned when ``budget`` is given;
    ``adaptive``: each image keeps the patches scoring above a threshold calibrated for the plan's rate."""

    plan: PrunePlan | MergePlan = UNPRUNED
    budget: float | None = None
    adaptive: bool = False

    @property
    def label(self) -> str:
        return plan_label(self.plan, self.budget, self.adaptive)

    def to_dict(self) -> dict:
        """The record form (``plan_record``): what sweep logs hold and key on."""
        return plan_record(self.plan, self.budget, self.adaptive)

    @classmethod
    def from_dict(cls, d: Mapping) -> Point:
        """Inverse of ``to_dict``; reads the records every earlier version wrote."""
        budget = d.get("options", {}).get("budget") if "stages" not in d else None
        return cls(plan_from_dict(d), None if budget is None else float(budget), bool(d.get("budget", False)))

    @classmethod
    def from_spec(cls, spec: str | None, keep_rate: float = 0.7, alpha: float = 1.0,
                  locations: Sequence[int] = (3, 6, 9), fuse: bool = False, options: Mapping | Sequence = (),
                  budget: float | None = None, adaptive: bool = False) -> Point:  # fmt: skip
        """The point a command line names: criterion ``spec`` (``renyi``, ``tome``, per stage
        ``renyi:2@3+evit@6``; None: the unpruned model) with its bracket ``options`` (a dict or pairs), at
        ``keep_rate``, Rényi order ``alpha`` (for the criteria that take one), ``locations``, fused or not."""
        if spec is None:
            return cls(UNPRUNED)
        base = PatchArgs(keep_rate, alpha=alpha, locations=tuple(locations), fuse=fuse)
        return cls(build_plan(spec_args(spec, dict(options), base)), budget, adaptive)

    def resolve(self, model: nn.Module) -> PrunePlan | MergePlan:
        """The plan to apply to ``model``: with a budget, solved for it (``model`` is not changed)."""
        return self.plan if self.budget is None else plan_for_budget(model, self.plan, self.budget)

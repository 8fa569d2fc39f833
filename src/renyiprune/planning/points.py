"""``Point``: a plan as an evaluation or a sweep runs it, with a compute budget or per-image adaptive keep.

Both are run settings, not plan fields: a budget becomes a keep rate (or r) only on a model
(``plan_for_budget``), and adaptive keep only with calibration images (``experiments.sweep``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..core.plans import UNPRUNED, MergePlan, PrunePlan, plan_from_dict, plan_label, plan_record
from .budget import plan_for_budget

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

    def resolve(self, model: nn.Module) -> PrunePlan | MergePlan:
        """The plan to apply to ``model``: with a budget, solved for it (``model`` is not changed)."""
        return self.plan if self.budget is None else plan_for_budget(model, self.plan, self.budget)

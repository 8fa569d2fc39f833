"""Tuning runs as ``tune-alpha`` and ``tune-budget`` make them: choose on a calibration half, report on the
other half, write a policy.

The images are split by a hash of their file name (``tune.split_samples``). Every candidate runs on the
calibration half only (``runs.run_points``, resuming OUT/calibration.jsonl); the choice per keep rate
(``tune_alpha``) or per compute budget (``tune_budget``) is made there, and only then are the chosen
settings and the references run on the evaluation half (OUT/evaluation.jsonl), which the choice never
sees. Each returns the policy it wrote and the rows of its report table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.plans import UNPRUNED
from ..planning.build import PatchArgs, build_plan
from ..planning.points import Point
from ..planning.policy import entry_plan
from ..utils.io import atomic_write_text
from .grid import Grid, grid_points
from .runs import ImageRun, run_points, write_outputs
from .stats import compare_records, format_difference
from .tune import choose, policy_document, split_samples

__all__ = ["Tuning", "Tuned", "ALPHA_REFERENCES", "BUDGET_REFERENCE", "calibrate_alpha", "tune_alpha",
           "tune_budget", "halves"]  # fmt: skip

ALPHA_REFERENCES = ("evit", "shannon")  # what tune-alpha's choice is reported against
BUDGET_REFERENCE = "tome"  # ToMe, constant r: what users pick today


@dataclass(frozen=True)
class Tuning:
    """The candidates (``criteria``: sweep specs) crossed with ``grid`` (keep rates, or budgets for
    ``tune_budget``), the work folder ``out`` (calibration/evaluation jsonl) and the policy file
    ``policy_out`` (default OUT/policy.json); ``base_policy``: what a budget section is added to;
    ``report_all``: tune-budget also runs every candidate on the evaluation half."""

    grid: Grid
    criteria: Sequence[str]
    out: Path
    policy_out: Path | None = None
    base_policy: dict | None = None
    report_all: bool = False

    def __post_init__(self) -> None:
        grid_points(self.grid, self.criteria)  # a bad candidate fails here, before any image is read

    @property
    def policy_path(self) -> Path:
        return self.policy_out or self.out / "policy.json"


@dataclass(frozen=True)
class Tuned:
    """A tuning's outcome: the policy written to ``path``, its report rows, and the halves' sizes."""

    policy: dict
    path: Path
    rows: list[list[str]]
    calibration_images: int
    evaluation_images: int


def halves(samples: Sequence) -> tuple[list, list]:
    """The calibration and evaluation halves of ``samples``; both must hold images."""
    calib, evals = split_samples(samples)
    if not calib or not evals:
        raise ValueError(f"{len(samples)} images split into {len(calib)} + {len(evals)}; need both halves")
    return calib, evals


def calibrate_alpha(run: ImageRun, tuning: Tuning, calib: Sequence) -> dict[float, dict]:
    """Run the candidates and the references on the calibration images; choose per keep rate."""
    if len(tuning.grid.fuse) != 1:
        raise ValueError("tune-alpha tunes for one fusion setting: --fuse on or --fuse off")
    candidates = grid_points(tuning.grid, tuning.criteria)
    refs = grid_points(replace(tuning.grid, alpha=(1.0,)), ALPHA_REFERENCES)
    configs = list(dict.fromkeys(candidates + refs))
    records, _ = run_points(run, calib, configs, tuning.out / "calibration.jsonl", "calibration")
    rec = dict(zip(configs, records, strict=True))
    chosen = {}
    for r in tuning.grid.keep:
        entry = choose([rec[c] for c in candidates if c.plan.stages[0].keep_rate == r])
        entry["reference"] = {c.plan.stages[0].criterion: {"calibration_top1": rec[c]["top1"],
                                                            "gmacs": rec[c]["gmacs"]}
                              for c in refs if c.plan.stages[0].keep_rate == r}  # fmt: skip
        chosen[r] = entry
    return chosen


def _alpha_points(chosen: dict[float, dict], grid: Grid) -> dict[tuple, Point]:
    """Per keep rate: the chosen setting, the best per criterion and the references, as points."""
    fuse, locs = grid.fuse[0], tuple(grid.locations)
    points: dict[tuple, Point] = {}
    for r, entry in chosen.items():
        for name, setting in [("best", entry["best"]), *entry["by_criterion"].items()]:
            points[(r, name)] = Point(entry_plan(setting, r, locs, fuse))
        for ref in ALPHA_REFERENCES:
            points[(r, ref + "_ref")] = Point(build_plan(PatchArgs(r, ref, locations=locs, fuse=fuse)))
    return points


def _alpha_row(r: float, entry: dict, ev: dict, points: dict[tuple, Point]) -> list[str]:
    """Fill ``entry`` with its evaluation-half numbers; its report row."""
    entry["best"]["evaluation_top1"] = ev[points[(r, "best")]]["top1"]
    for name, setting in entry["by_criterion"].items():
        setting["evaluation_top1"] = ev[points[(r, name)]]["top1"]
    for ref in ALPHA_REFERENCES:
        e = ev[points[(r, ref + "_ref")]]
        entry["reference"][ref].update(evaluation_top1=e["top1"], gmacs=e["gmacs"])
    b, ref = entry["best"], entry["reference"]
    # Paired on the same evaluation images: is the difference more than which images disagree?
    pair = compare_records(ev[points[(r, "best")]], ev[points[(r, "evit_ref")]])
    if pair is not None:
        b["evaluation_vs_evit"] = pair
    return [f"{r:g}", b["label"], f"{b['calibration_top1']:.2f}", f"{ref['evit']['calibration_top1']:.2f}",
            f"{b['evaluation_top1']:.2f}", f"{ref['evit']['evaluation_top1']:.2f}",
            f"{ref['shannon']['evaluation_top1']:.2f}", *format_difference(pair),
            f"{b['gmacs'] / ref['evit']['gmacs']:.3f}"]  # fmt: skip


def tune_alpha(run: ImageRun, tuning: Tuning, calib: Sequence, evals: Sequence) -> Tuned:
    """Choose α (and λ) per keep rate on the ``calib`` images; report the choice, Shannon and EViT on
    ``evals``; write the policy (``eval --alpha auto --policy FILE`` / ``--criterion best``)."""
    chosen = calibrate_alpha(run, tuning, calib)
    points = _alpha_points(chosen, tuning.grid)  # only now is the evaluation half read
    uniq = list(dict.fromkeys(points.values()))
    records, _ = run_points(run, evals, uniq, tuning.out / "evaluation.jsonl", "evaluation")
    ev = dict(zip(uniq, records, strict=True))
    rows = [_alpha_row(r, entry, ev, points) for r, entry in chosen.items()]
    policy = policy_document(run.model_name, {f"{r:g}": entry for r, entry in chosen.items()},
                             locations=tuple(tuning.grid.locations), fuse=tuning.grid.fuse[0],
                             images=(len(calib), len(evals)),
                             candidates=tuning.criteria, alphas=tuning.grid.alpha,
                             lambdas=tuning.grid.lambdas)  # fmt: skip
    atomic_write_text(tuning.policy_path, json.dumps(policy, indent=2, allow_nan=False) + "\n")
    return Tuned(policy, tuning.policy_path, rows, len(calib), len(evals))


def _budget(c: Point) -> float:
    return float(c.budget)


def _calibrate_budget(run: ImageRun, tuning: Tuning, calib: Sequence, refs: list[Point]
                      ) -> tuple[list[Point], dict[float, dict]]:  # fmt: skip
    """Every candidate and ToMe at every budget on the calibration half; the best per budget."""
    candidates = grid_points(tuning.grid, tuning.criteria)
    configs = list(dict.fromkeys(candidates + refs))
    records, _ = run_points(run, calib, configs, tuning.out / "calibration.jsonl", "calibration")
    cal = dict(zip(configs, records, strict=True))
    chosen = {}
    for f in tuning.grid.budget:
        entry = choose([cal[c] for c in candidates if _budget(c) == f])
        ref = next(c for c in refs if _budget(c) == f)
        entry["reference"] = {"tome": {"calibration_top1": cal[ref]["top1"], "gmacs": cal[ref]["gmacs"]}}
        chosen[f] = entry
    return candidates, chosen


def _budget_row(f: float, entry: dict, ev: dict, picked: Point, ref: Point) -> list[str]:
    """Fill ``entry`` with its evaluation-half numbers (the choice, and ToMe at ``f``); its report row."""
    best = entry["best"]
    best["evaluation_top1"] = ev[picked]["top1"]
    entry["reference"]["tome"].update(evaluation_top1=ev[ref]["top1"], gmacs=ev[ref]["gmacs"])
    t = entry["reference"]["tome"]
    pair = compare_records(ev[picked], ev[ref])  # paired on the same evaluation images
    if pair is not None:
        best["evaluation_vs_tome"] = pair
    return [f"{f:g}", best["label"], f"{best['calibration_top1']:.2f}", f"{t['calibration_top1']:.2f}",
            f"{best['evaluation_top1']:.2f}", f"{t['evaluation_top1']:.2f}", *format_difference(pair),
            f"{best['gmacs'] / t['gmacs']:.3f}"]  # fmt: skip


def tune_budget(run: ImageRun, tuning: Tuning, calib: Sequence, evals: Sequence) -> Tuned:
    """Choose a token-reduction method per compute budget on the ``calib`` images; report it against ToMe
    on ``evals`` (tables and Pareto plot in OUT); the policy is ``base_policy`` with its budget section
    (``patch(model, criterion="best", budget=F)``, ``eval --criterion best --budget F``)."""
    refs = grid_points(replace(tuning.grid, alpha=(1.0,)), [BUDGET_REFERENCE])
    candidates, chosen = _calibrate_budget(run, tuning, calib, refs)
    # Only now is the evaluation half read.
    picked = {f: Point.from_dict(e["best"]["config"]) for f, e in chosen.items()}
    todo = [Point(UNPRUNED), *picked.values(), *refs, *(candidates if tuning.report_all else [])]
    todo = list(dict.fromkeys(todo))
    records, _ = run_points(run, evals, todo, tuning.out / "evaluation.jsonl", "evaluation")
    ev = dict(zip(todo, records, strict=True))
    write_outputs(tuning.out, records, f"{run.model_name}, evaluation half ({len(evals)} images)")
    rows = []
    for f, entry in chosen.items():
        rows.append(_budget_row(f, entry, ev, picked[f], next(c for c in refs if _budget(c) == f)))
        if tuning.report_all:
            entry["evaluation"] = {ev[c]["label"]: ev[c]["top1"] for c in candidates if _budget(c) == f}
    policy = dict(tuning.base_policy or {"model": run.model_name})
    policy["budget_candidates"] = list(tuning.criteria)
    policy["budget_split"] = {"calibration_images": len(calib), "evaluation_images": len(evals)}
    policy["budget"] = {f"{f:g}": e for f, e in chosen.items()}
    atomic_write_text(tuning.policy_path, json.dumps(policy, indent=2, allow_nan=False) + "\n")
    return Tuned(policy, tuning.policy_path, rows, len(calib), len(evals))

"""``renyiprune tune-budget``: choose a token-reduction method per compute budget on a calibration half.

Every candidate (pruning with drop / fuse / merge, ToMe and its entropy-aware variants, schedules)
runs at each budget F, its keep rate or r solved for GMACs <= F x unpruned, on the calibration half
only (``policy.split_samples``). The best per budget goes into the policy's ``budget`` section, which
``patch(model, criterion="best", budget=F)`` and ``eval --criterion best --budget F`` use. Then the
chosen methods and plain ToMe (the baseline to beat) run on the evaluation half, which the choice
never sees.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.plans import UNPRUNED
from ..experiments.grid import Grid, grid_points
from ..experiments.runs import run_points, write_outputs
from ..experiments.stats import compare_records, format_difference
from ..experiments.tune import DEFAULT_BUDGET_CANDIDATES, choose, split_samples
from ..planning.points import Point
from ..planning.policy import POLICY_DIR
from ..utils.io import atomic_write_text
from . import common
from .images import add_image_args, check_image_args, image_run, load_checked_model, read_source

REFERENCE = "tome"  # ToMe, constant r: what users pick today


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune-budget",
        help="choose the best token-reduction method per compute budget on a calibration half",
        description="Split the images by a hash of the file name; evaluate every candidate method at every "
        "budget on the calibration half, pick the best per budget, evaluate it against ToMe on the "
        "evaluation half and write the policy's budget section.",
    )
    add_image_args(p)
    p.add_argument("--budget", type=common.budgets, default=[0.9, 0.75, 0.65, 0.5],
                   help="compute budget(s) F in (0, 1]: GMACs <= F x unpruned")
    common.add_old_spelling(p, "--budgets", "budget", type=common.budgets)
    p.add_argument("--criterion", type=common.names, default=list(DEFAULT_BUDGET_CANDIDATES),
                   help="candidate methods, comma list of sweep specs: tome, tome[schedule=decreasing], "
                   "tome[entropy_weight=0.05;alpha=1], evit[removed=merge], renyi:2[removed=fuse], ...")
    common.add_old_spelling(p, "--candidates", "criterion", type=common.names)
    p.add_argument("--report-all", action="store_true",
                   help="also run every candidate on the evaluation half (for reports; the choice is made "
                   "before, on the calibration half)")
    p.add_argument("--base-policy", type=common.policy_file, default=None,
                   help="policy whose keep-rate section is kept (default: the one shipped for --model)")
    p.add_argument("--out", type=common.output_path, required=True,
                   help="work folder (calibration/evaluation jsonl)")
    p.add_argument("--policy-out", type=common.output_path, default=None,
                   help="policy JSON (default OUT/policy.json)")
    p.set_defaults(run=run)


def _configs(args: argparse.Namespace, specs) -> list[Point]:
    return grid_points(Grid(keep=(1.0,), alpha=(1.0,), locations=tuple(args.locations),
                            budget=tuple(args.budget)), specs)  # fmt: skip


def _budget(c: Point) -> float:
    return float(c.budget)


def run(args: argparse.Namespace) -> int:
    check_image_args(args)
    candidates = _configs(args, args.criterion)
    refs = _configs(args, [REFERENCE])
    samples = read_source(args)
    calib, evals = split_samples(samples)
    if not calib or not evals:
        raise ValueError(f"{len(samples)} images split into {len(calib)} + {len(evals)}; need both halves")
    base_path = args.base_policy or POLICY_DIR / f"{args.model}.json"
    policy = json.loads(Path(base_path).read_text()) if Path(base_path).is_file() else {"model": args.model}
    run = image_run(args, load_checked_model(args, samples))

    configs = list(dict.fromkeys(candidates + refs))
    records, _ = run_points(run, calib, configs, args.out / "calibration.jsonl", "calibration")
    cal = dict(zip(configs, records, strict=True))
    chosen = {}
    for f in args.budget:
        entry = choose([cal[c] for c in candidates if _budget(c) == f])
        ref = next(c for c in refs if _budget(c) == f)
        entry["reference"] = {"tome": {"calibration_top1": cal[ref]["top1"], "gmacs": cal[ref]["gmacs"]}}
        chosen[f] = entry

    # Only now is the evaluation half read.
    picked = {f: Point.from_dict(e["best"]["config"]) for f, e in chosen.items()}
    unpruned = Point(UNPRUNED)
    todo = [unpruned, *picked.values(), *refs, *(candidates if args.report_all else [])]
    todo = list(dict.fromkeys(todo))
    records, _ = run_points(run, evals, todo, args.out / "evaluation.jsonl", "evaluation")
    ev = dict(zip(todo, records, strict=True))
    write_outputs(args.out, records, f"{args.model}, evaluation half ({len(evals)} images)")
    rows = []
    for f, entry in chosen.items():
        best = entry["best"]
        best["evaluation_top1"] = ev[picked[f]]["top1"]
        ref = next(c for c in refs if _budget(c) == f)
        entry["reference"]["tome"].update(evaluation_top1=ev[ref]["top1"], gmacs=ev[ref]["gmacs"])
        if args.report_all:
            entry["evaluation"] = {ev[c]["label"]: ev[c]["top1"] for c in candidates if _budget(c) == f}
        t = entry["reference"]["tome"]
        pair = compare_records(ev[picked[f]], ev[ref])  # paired on the same evaluation images
        if pair is not None:
            best["evaluation_vs_tome"] = pair
        rows.append([
            f"{f:g}", best["label"], f"{best['calibration_top1']:.2f}", f"{t['calibration_top1']:.2f}",
            f"{best['evaluation_top1']:.2f}", f"{t['evaluation_top1']:.2f}",
            *format_difference(pair), f"{best['gmacs'] / t['gmacs']:.3f}",
        ])  # fmt: skip
    policy["budget_candidates"] = list(args.criterion)
    policy["budget_split"] = {"calibration_images": len(calib), "evaluation_images": len(evals)}
    policy["budget"] = {f"{f:g}": e for f, e in chosen.items()}
    out = args.policy_out or args.out / "policy.json"
    atomic_write_text(out, json.dumps(policy, indent=2, allow_nan=False) + "\n")
    headers = ["budget", "chosen (calibration)", "cal top-1", "cal ToMe", "eval top-1", "eval ToMe",
               "Δ vs ToMe [95 % CI]", "McNemar p", "GMACs/ToMe"]  # fmt: skip
    print(f"{len(calib)} calibration / {len(evals)} evaluation images; {len(candidates)} candidate configs")
    print(common.format_table(headers, rows))
    print(f"policy written to {out}")
    return 0

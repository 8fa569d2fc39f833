"""``renyiprune tune-alpha``: choose α (and λ) per keep rate on a calibration half, report on the other half.

The images are split by a hash of their file name (``policy.split_samples``). Every candidate runs on
the calibration half only; the chosen setting, Shannon and EViT then run on the evaluation half, which
the choice never sees. The result is a policy JSON for ``eval --alpha auto --policy FILE`` /
``--criterion best``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from ..experiments.grid import grid_points
from ..experiments.runs import ImageRun, run_points
from ..experiments.stats import compare_records, format_difference
from ..experiments.tune import choose, policy_document, split_samples
from ..planning.build import PatchArgs, build_plan
from ..planning.points import Point
from ..planning.policy import entry_plan
from ..utils.io import atomic_write_text
from . import common
from .images import add_grid_args, check_args, grid_of, image_run, load_checked_model, read_source

REFERENCES = ("evit", "shannon")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune-alpha",
        help="choose α/λ per keep rate on a calibration half, report top-1 on the evaluation half",
        description="Split the images by a hash of the file name; sweep the candidates on the calibration "
        "half, pick the best per keep rate, evaluate it against Shannon and EViT on the evaluation half "
        "and write a policy JSON.",
    )
    add_grid_args(p)
    p.set_defaults(keep=[0.5, 0.7, 0.9], fuse=[True])
    p.add_argument(
        "--criterion",
        type=common.names,
        default=["renyi"],
        help="candidate criteria, comma list (renyi, hybrid, headvar, ...); the best overall is 'best'",
    )
    p.add_argument("--out", type=common.output_path, required=True,
                   help="work folder (calibration/evaluation jsonl)")
    p.add_argument("--policy-out", type=common.output_path, default=None,
                   help="policy JSON (default OUT/policy.json)")
    p.set_defaults(run=run)


def calibrate(args: argparse.Namespace, run: ImageRun, calib: list) -> dict[float, dict]:
    """Sweep the candidates and references on the calibration images; choose per keep rate."""
    if len(args.fuse) != 1:
        raise ValueError("tune-alpha tunes for one fusion setting: --fuse on or --fuse off")
    candidates = grid_points(grid_of(args), args.criterion)
    refs = grid_points(replace(grid_of(args), alpha=(1.0,)), REFERENCES)
    configs = list(dict.fromkeys(candidates + refs))
    records, _ = run_points(run, calib, configs, args.out / "calibration.jsonl", "calibration")
    rec = dict(zip(configs, records, strict=True))
    chosen = {}
    for r in args.keep:
        cands = [rec[c] for c in candidates if c.plan.stages[0].keep_rate == r]
        entry = choose(cands)
        entry["reference"] = {
            c.plan.stages[0].criterion: {"calibration_top1": rec[c]["top1"], "gmacs": rec[c]["gmacs"]}
            for c in refs
            if c.plan.stages[0].keep_rate == r
        }
        chosen[r] = entry
    return chosen


def run(args: argparse.Namespace) -> int:
    check_args(args)
    grid_points(grid_of(args), args.criterion)  # a bad criterion spec fails here, before any image is read
    samples = read_source(args)
    calib, evals = split_samples(samples)
    if not calib or not evals:
        raise ValueError(f"{len(samples)} images split into {len(calib)} + {len(evals)}; need both halves")
    run = image_run(args, load_checked_model(args, samples))
    chosen = calibrate(args, run, calib)
    # Only now is the evaluation half read: the chosen settings and the references, per keep rate.
    fuse, locs = args.fuse[0], tuple(args.locations)
    configs: dict[tuple, Point] = {}
    for r, entry in chosen.items():
        for name, setting in [("best", entry["best"]), *entry["by_criterion"].items()]:
            configs[(r, name)] = Point(entry_plan(setting, r, locs, fuse))
        for ref in REFERENCES:
            configs[(r, ref + "_ref")] = Point(build_plan(PatchArgs(r, ref, locations=locs, fuse=fuse)))
    uniq = list(dict.fromkeys(configs.values()))
    records, _ = run_points(run, evals, uniq, args.out / "evaluation.jsonl", "evaluation")
    ev = dict(zip(uniq, records, strict=True))
    rows = []
    for r, entry in chosen.items():
        entry["best"]["evaluation_top1"] = ev[configs[(r, "best")]]["top1"]
        for name, setting in entry["by_criterion"].items():
            setting["evaluation_top1"] = ev[configs[(r, name)]]["top1"]
        for ref in REFERENCES:
            e = ev[configs[(r, ref + "_ref")]]
            entry["reference"][ref].update(evaluation_top1=e["top1"], gmacs=e["gmacs"])
        b, ref = entry["best"], entry["reference"]
        # Paired on the same evaluation images: is the difference more than which images disagree?
        pair = compare_records(ev[configs[(r, "best")]], ev[configs[(r, "evit_ref")]])
        if pair is not None:
            b["evaluation_vs_evit"] = pair
        rows.append(
            [f"{r:g}", b["label"], f"{b['calibration_top1']:.2f}", f"{ref['evit']['calibration_top1']:.2f}",
             f"{b['evaluation_top1']:.2f}", f"{ref['evit']['evaluation_top1']:.2f}",
             f"{ref['shannon']['evaluation_top1']:.2f}",
             *format_difference(pair),
             f"{b['gmacs'] / ref['evit']['gmacs']:.3f}"]
        )  # fmt: skip
    policy = policy_document(
        args.model,
        {f"{r:g}": entry for r, entry in chosen.items()},
        locations=locs,
        fuse=fuse,
        calibration_images=len(calib),
        evaluation_images=len(evals),
        candidates=args.criterion,
        alphas=args.alpha,
        lambdas=args.lambdas,
    )
    out = args.policy_out or args.out / "policy.json"
    atomic_write_text(out, json.dumps(policy, indent=2, allow_nan=False) + "\n")
    headers = ["keep", "chosen (calibration)", "cal top-1", "cal EViT", "eval top-1", "eval EViT",
               "eval Shannon", "Δ vs EViT [95 % CI]", "McNemar p", "GMACs/EViT"]  # fmt: skip
    print(f"{len(calib)} calibration / {len(evals)} evaluation images; fusion {'on' if fuse else 'off'}")
    print(common.format_table(headers, rows))
    print(f"policy written to {out}")
    return 0

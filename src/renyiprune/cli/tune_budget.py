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

from ..experiments.grid import Grid, grid_points
from ..experiments.tune import DEFAULT_BUDGET_CANDIDATES
from ..experiments.tuning import Tuning, halves, tune_budget
from ..planning.policy import POLICY_DIR
from . import common
from .images import add_image_args, check_image_args, image_run, load_checked_model, read_source


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


def tuning_of(args: argparse.Namespace) -> Tuning:
    """The ``experiments.tuning.Tuning`` the flags name: the candidates at every budget, and the policy whose
    keep-rate section is kept (``--base-policy``, or the one shipped for ``--model``)."""
    grid = Grid(keep=(1.0,), alpha=(1.0,), locations=tuple(args.locations), budget=tuple(args.budget))
    base_path = args.base_policy or POLICY_DIR / f"{args.model}.json"
    base = json.loads(Path(base_path).read_text()) if Path(base_path).is_file() else {"model": args.model}
    return Tuning(grid, tuple(args.criterion), args.out, args.policy_out, base, args.report_all)


def run(args: argparse.Namespace) -> int:
    check_image_args(args)
    tuning = tuning_of(args)  # a bad candidate fails here, before any image is read
    calib, evals = halves(read_source(args))
    image = image_run(args, load_checked_model(args, [*calib, *evals]))
    tuned = tune_budget(image, tuning, calib, evals)
    headers = ["budget", "chosen (calibration)", "cal top-1", "cal ToMe", "eval top-1", "eval ToMe",
               "Δ vs ToMe [95 % CI]", "McNemar p", "GMACs/ToMe"]  # fmt: skip
    print(f"{tuned.calibration_images} calibration / {tuned.evaluation_images} evaluation images; "
          f"{len(grid_points(tuning.grid, tuning.criteria))} candidate configs")  # fmt: skip
    print(common.format_table(headers, tuned.rows))
    print(f"policy written to {tuned.path}")
    return 0

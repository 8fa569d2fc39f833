"""``renyiprune tune-alpha``: choose α (and λ) per keep rate on a calibration half, report on the other half.

The images are split by a hash of their file name (``policy.split_samples``). Every candidate runs on
the calibration half only; the chosen setting, Shannon and EViT then run on the evaluation half, which
the choice never sees. The result is a policy JSON for ``eval --alpha auto --policy FILE`` /
``--criterion best``.
"""

from __future__ import annotations

import argparse

from ..experiments.tuning import Tuning, halves, tune_alpha
from . import common
from .images import add_grid_args, check_args, grid_of, image_run, load_checked_model, read_source


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


def tuning_of(args: argparse.Namespace) -> Tuning:
    """The ``experiments.tuning.Tuning`` the flags name (a bad criterion spec fails here)."""
    return Tuning(grid_of(args), tuple(args.criterion), args.out, args.policy_out)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    tuning = tuning_of(args)  # a bad criterion spec fails here, before any image is read
    calib, evals = halves(read_source(args))
    image = image_run(args, load_checked_model(args, [*calib, *evals]))
    tuned = tune_alpha(image, tuning, calib, evals)
    headers = ["keep", "chosen (calibration)", "cal top-1", "cal EViT", "eval top-1", "eval EViT",
               "eval Shannon", "Δ vs EViT [95 % CI]", "McNemar p", "GMACs/EViT"]  # fmt: skip
    print(f"{tuned.calibration_images} calibration / {tuned.evaluation_images} evaluation images; "
          f"fusion {'on' if tuning.grid.fuse[0] else 'off'}")  # fmt: skip
    print(common.format_table(headers, tuned.rows))
    print(f"policy written to {tuned.path}")
    return 0

"""``renyiprune sweep``: many pruning configurations on the same images, resumable, with tables and plots."""

from __future__ import annotations

import argparse
import sys

from ..core.criteria import list_criteria
from ..core.plans import UNPRUNED
from ..experiments.grid import grid_points
from ..experiments.runs import run_grid_sweep
from ..experiments.tables import markdown_tables
from ..planning.points import Point
from ..utils import distributed as D
from . import common
from .images import add_grid_args, check_args, grid_of, image_run, load_checked_model, read_source


class BudgetOrAdaptive(argparse.Action):
    """``--budget F,...``: compute budgets. ``--budget NAMES`` (criteria, not numbers), the old spelling of
    ``--adaptive NAMES``, still selects the per-image adaptive mode, with a note on stderr."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = [t.strip() for t in values.split(",") if t.strip()]
        if items and not any(_is_number(t) for t in items):
            print(f"{parser.prog}: note: --budget {values} (criteria) is deprecated; the per-image adaptive "
                  f"mode is --adaptive {values}", file=sys.stderr)  # fmt: skip
            namespace.adaptive = [*getattr(namespace, "adaptive", []), *items]
            return
        try:
            namespace.budget = common.budgets(values)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="evaluate criteria x alphas x keep rates (or budgets) x fusion on the same images (resumable)",
        description="Decode every image once, run the blocks before the first pruning location once, then "
        "each configuration; finished ones are appended to OUT/results.jsonl and skipped on a rerun. Writes "
        "OUT/results.csv, OUT/results.md and OUT/pareto.png/.svg.",
    )
    add_grid_args(p)
    p.add_argument(
        "--criterion",
        type=common.names,
        default=["evit", "random", "renyi"],
        help=f"comma list of {', '.join(list_criteria())}; renyi:2 = one alpha; hybrid[base=headvar] = "
        "with options (k=v;k=v); per-stage: renyi:2@3+evit@6+evit@9",
    )
    common.add_old_spelling(p, "--criteria", "criterion", type=common.names)
    p.add_argument("--budget", action=BudgetOrAdaptive, default=None,
                   help="compute budget(s) F in (0, 1] instead of keep rates: each method's keep rate / r is "
                   "solved for GMACs <= F x unpruned; add tome (tome[schedule=decreasing], "
                   "tome[entropy_weight=0.05;alpha=1]) and merging (evit[removed=merge]) to --criterion")
    common.add_old_spelling(p, "--budgets", "budget", type=common.budgets)
    p.add_argument("--adaptive", type=common.names, default=[],
                   help="criteria also run in per-image adaptive keep mode (keep rates calibrated per image)")
    p.add_argument("--no-unpruned", action="store_true", help="leave out the unpruned reference")
    p.add_argument("--out", type=common.output_path, required=True,
                   help="output folder (results.jsonl is resumed)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    points = grid_points(grid_of(args), args.criterion, args.adaptive)
    if not args.no_unpruned:
        points.insert(0, Point(UNPRUNED))
    samples = read_source(args)
    info = D.init_distributed(args.device)  # under torchrun: one share of the images per process
    args.device = info.device
    try:
        model = load_checked_model(args, samples)  # bad weights, labels or --locations: OUT is not touched
        records, timing = run_grid_sweep(image_run(args, model), points, samples, args.out)
    finally:
        D.cleanup()
    if info.is_main:  # rank 0 reports
        print(markdown_tables(records))
        ran = timing["ran"]
        print(f"{len(points)} configurations ({ran} run now, {len(points) - ran} resumed); "
              f"decode + prefix {timing['cache_s']:.1f} s, configurations {timing['configs_s']:.1f} s; "
              f"outputs in {args.out}")  # fmt: skip
    return 0

"""``renyiprune sweep``: many pruning configurations on the same images, resumable, with tables and plots."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..core.criteria import list_criteria
from ..core.plans import UNPRUNED
from ..data.images import EvalTransform, check_labels
from ..experiments.grid import Grid, grid_points
from ..experiments.sweep import ResultLog, SweepSettings, fingerprint, sweep_samples
from ..experiments.tables import markdown_tables, to_csv
from ..models.model import weights_id
from ..planning.points import Point
from ..utils import distributed as D
from ..utils.io import atomic_write_text, output_lock
from . import common


def _on_off(text: str) -> list[bool]:
    vals = {"off": False, "on": True, "false": False, "true": True, "0": False, "1": True}
    out = []
    for t in text.split(","):
        if t.strip().lower() not in vals:
            raise argparse.ArgumentTypeError(f"expected off,on; got {t!r}")
        out.append(vals[t.strip().lower()])
    return list(dict.fromkeys(out))


def add_image_args(p: argparse.ArgumentParser) -> None:
    """Model, images and pruning locations: what sweep, tune-alpha and tune-budget all take."""
    common.add_model_args(p)
    common.add_data_args(p)
    p.add_argument("--locations", type=common.locations, default=(3, 6, 9), help="0-based pruning blocks")
    p.add_argument("--limit", type=common.integer(1), default=None, help="first N images in listing order")
    p.add_argument("--batch-size", type=common.integer(1), default=64)
    p.add_argument("--workers", type=common.integer(0), default=2,
                   help="DataLoader worker processes (decoding)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--no-progress", action="store_true")


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by sweep and tune-alpha: the images and the grid of keep rates, α, λ, fusion."""
    add_image_args(p)
    p.add_argument("--keep", type=common.keep_rates, default=[0.5, 0.6, 0.7, 0.8, 0.9],
                   help="keep rate(s) in (0, 1]")
    p.add_argument("--alpha", type=common.alphas, default=[0.5, 1.0, 2.0, 3.0, float("inf")],
                   help="Rényi order(s) of the criteria that take one, e.g. 1,2,inf")
    common.add_old_spelling(p, "--alphas", "alpha", type=common.alphas)
    lambdas = common._typed(common._list(common.real(0, 1)), "lambdas")
    p.add_argument("--lambda", dest="lambdas", metavar="LAMBDA", type=lambdas, default=[0.5],
                   help="hybrid: weight(s) of EViT's CLS attention, in [0, 1]")
    common.add_old_spelling(p, "--lambdas", "lambdas", type=lambdas)
    p.add_argument("--fuse", type=_on_off, nargs="?", const=[True], default=[False],
                   help="off, on or off,on (alone: on)")


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


def grid_of(args: argparse.Namespace) -> Grid:
    """The values the grid flags cross (``--keep``, ``--alpha``, ``--lambda``, ``--fuse``, ``--locations``,
    ``--budget``)."""
    return Grid(keep=tuple(args.keep), alpha=tuple(args.alpha), lambdas=tuple(args.lambdas),
                fuse=tuple(args.fuse), locations=tuple(args.locations),
                budget=tuple(getattr(args, "budget", None) or ()))  # fmt: skip


def settings_of(args: argparse.Namespace) -> SweepSettings:
    return SweepSettings(batch_size=args.batch_size, workers=args.workers, device=args.device,
                         skip_bad=args.skip_bad, progress=not args.no_progress and D.rank() == 0)  # fmt: skip


def transform_of(model) -> EvalTransform:
    c = model.pretrained_cfg
    return EvalTransform(c.img_size, c.crop_pct, c.interpolation, c.mean, c.std)


def sweep(args: argparse.Namespace, model, samples: list, points: list[Point], log_path: Path, part: str):
    """``experiments.sweep.sweep_samples`` with what the flags say: the run's fingerprint (model, weights,
    data source, ``part`` of the images), the image transform and the settings; records, timing."""
    source = image_source(args)
    fp = fingerprint(args.model, weights_id(args.model, args.weights), source.key, samples, part)
    transform = source.view(transform_of(model))
    return sweep_samples(model, points, samples, ResultLog(log_path, fp), transform, settings_of(args))


def write_outputs(out: Path, records: list[dict], title: str) -> None:
    """results.csv, results.md and pareto.png/.svg in ``out``, each written atomically."""
    atomic_write_text(out / "results.csv", to_csv(records))
    atomic_write_text(out / "results.md", markdown_tables(records))
    from ..experiments.pareto import pareto_plot

    pareto_plot(records, out / "pareto", title=title)


def check_image_args(args) -> None:
    policy_out = getattr(args, "policy_out", None)  # tune-alpha, tune-budget: written last, checked first
    if policy_out is not None and policy_out.is_dir():
        raise IsADirectoryError(f"--policy-out {policy_out} is a folder; give the policy file's name")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")


def image_source(args: argparse.Namespace) -> common.ImageSource:
    """The images the data flags name (``common.read_images``), read once and kept as ``args.source``: the
    fingerprint and the bottom crop of every ``sweep`` call of a command come from it."""
    if getattr(args, "source", None) is None:
        args.source = common.read_images(args)
    return args.source


def read_source(args: argparse.Namespace) -> list:
    """The samples of :func:`image_source`."""
    return image_source(args).samples


def load_checked_model(args: argparse.Namespace, samples: list):
    """``common.load_model``, after which every label of ``samples`` must be a class of its head and every
    ``--locations`` block one of its blocks (before the first forward, and before anything is written)."""
    model = common.load_model(args)
    check_labels(samples, model.num_classes)
    depth = len(model.blocks)
    if any(i >= depth for i in args.locations):
        raise ValueError(f"--locations {args.locations} out of range for {args.model} ({depth} blocks, "
                         "0-based)")
    return model


def check_args(args) -> None:
    check_image_args(args)
    if any(not 0.0 <= lam <= 1.0 for lam in args.lambdas):
        raise ValueError("--lambda must be in [0, 1]")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    configs = grid_points(grid_of(args), args.criterion, args.adaptive)
    if not args.no_unpruned:
        configs.insert(0, Point(UNPRUNED))
    samples = read_source(args)
    info = D.init_distributed(args.device)  # under torchrun: one share of the images per process
    args.device = info.device
    try:
        model = load_checked_model(args, samples)  # bad weights, labels or --locations: OUT is not touched
        with output_lock(args.out, collective=True):  # a second sweep on OUT stops here (exit 2)
            return _run(args, configs, samples, info.is_main, model)
    finally:
        D.cleanup()


def _run(args: argparse.Namespace, configs: list[Point], samples: list, is_main: bool, model) -> int:
    t0 = time.perf_counter()
    records, timing = sweep(args, model, samples, configs, args.out / "results.jsonl", "all")
    timing["total_s"] = time.perf_counter() - t0
    if not is_main:  # rank 0 writes the outputs and reports
        return 0
    write_outputs(args.out, records, f"{args.model}, {records[0]['images']} images")
    atomic_write_text(args.out / "timing.json", json.dumps(timing, indent=2) + "\n")
    print(markdown_tables(records))
    print(
        f"{len(configs)} configurations ({timing['ran']} run now, {len(configs) - timing['ran']} resumed); "
        f"decode + prefix {timing['cache_s']:.1f} s, configurations {timing['configs_s']:.1f} s; "
        f"outputs in {args.out}"
    )
    return 0

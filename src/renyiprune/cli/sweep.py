"""``renyiprune sweep``: many pruning configurations on the same images, resumable, with tables and plots."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from ..core.criteria import list_criteria, takes_alpha
from ..core.entropy import parse_alpha
from ..data.images import EvalTransform, check_labels
from ..experiments.sweep import ResultLog, run_sweep
from ..experiments.tables import markdown_tables, to_csv
from ..experiments.tune import is_calibration
from ..models.model import weights_id
from ..planning.specs import SweepConfig, check_options, parse_stages, split_criterion
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


def parse_spec(spec: str, alphas) -> tuple[str, list[float], dict]:
    """'renyi:2[removed=merge]' -> ('renyi', [2.0], {'removed': 'merge'}): the criterion (or tome, or a
    per-stage spec), the orders it is crossed with (``alphas`` where it takes one), fixed options."""
    crit, extra = split_criterion(spec)  # 'hybrid[base=headvar]': fixed criterion options
    # crossed with --alpha: criteria with an order (hybrid only while its base is the Rényi score)
    tuned = takes_alpha(crit, extra)
    alphas = list(alphas) if tuned else [1.0]
    if tuned and "alpha" in extra:  # 'evit_renyi[alpha=inf]' is 'evit_renyi:inf'
        alphas = [parse_alpha(str(extra.pop("alpha")))]
    if "@" in crit:
        parse_stages(crit)
    elif ":" in crit:  # 'hybrid:2': this criterion at one alpha only
        crit, a = crit.split(":", 1)
        alphas = [parse_alpha(a)]
    if crit == "tome":
        if "alpha" in extra:  # entropy-aware ToMe: its order is an option
            extra["alpha"] = float(parse_alpha(str(extra["alpha"])))
        return crit, [1.0], extra
    if "@" not in crit and crit not in list_criteria():
        raise ValueError(f"unknown criterion {crit!r}; known: tome, {', '.join(list_criteria())}")
    check_options(crit, extra)  # a misspelt option fails now, before the model is loaded
    return crit, alphas, extra


def build_configs(args: argparse.Namespace, criteria, adaptive=()) -> list[SweepConfig]:
    """Cross criteria (alphas, lambdas where they apply) with keep rates (or compute budgets) and fusion;
    the ``adaptive`` criteria also in per-image adaptive keep mode. Reads ``args.keep``, ``fuse``,
    ``locations``, ``lambdas``, ``alpha`` and ``budget`` (absent: keep rates)."""
    configs = []
    locs = tuple(args.locations)
    budgets = getattr(args, "budget", None) or []
    for fuse, (spec, is_budget) in itertools.product(
        args.fuse, [(c, False) for c in criteria] + [(c, True) for c in adaptive]
    ):
        with common.naming("--adaptive" if is_budget else "--criterion", spec):
            crit, alphas, extra = parse_spec(spec, args.alpha)
        if crit == "tome":
            if budgets:  # ToMe does not fuse: one config per budget whatever --fuse says
                configs += [SweepConfig("tome", 1.0, 1.0, (), False,
                                        tuple(sorted({**extra, "budget": f}.items()))) for f in budgets]
            elif "r" in extra:
                configs.append(SweepConfig("tome", 1.0, 1.0, (), False, tuple(sorted(extra.items()))))
            else:
                raise ValueError("tome in a sweep needs --budget or an r: tome[r=16]")
            continue
        lams = args.lambdas if crit == "hybrid" else [None]
        points = [(r, None) for r in args.keep] if not budgets or is_budget else [(1.0, f) for f in budgets]
        for a, lam, (r, f) in itertools.product(alphas, lams, points):
            opts = {**extra, **({"lam": float(lam)} if lam is not None else {})}
            if f is not None:
                opts["budget"] = f
            configs.append(SweepConfig(crit, r, a, locs, fuse, tuple(sorted(opts.items())), budget=is_budget))
    return list(dict.fromkeys(configs))


def fingerprint(args: argparse.Namespace, samples: list, part: str = "all") -> dict:
    """What makes results comparable: model, weights (the SHA-256 of their bytes), data folder (or data
    set, split and root), image list, which part of it."""
    names = "\n".join(s.path.name for s in samples).encode()
    return {
        "model": args.model,
        "weights": weights_id(args.model, args.weights),
        "data": image_source(args).key,
        "images": len(samples),
        "part": part,
        "list_sha256": hashlib.sha256(names).hexdigest()[:16],
    }


def transform_of(model) -> EvalTransform:
    c = model.pretrained_cfg
    return EvalTransform(c.img_size, c.crop_pct, c.interpolation, c.mean, c.std)


def loader_of(samples, transform, args):
    from torch.utils.data import DataLoader

    from ..data.images import ImageDataset, collate

    return DataLoader(
        ImageDataset(samples, transform), batch_size=args.batch_size, shuffle=False,
        num_workers=args.workers, collate_fn=collate,
    )  # fmt: skip


def _global_batches(loader, positions: torch.Tensor):
    """The loader's batches with ``indices`` mapped from positions in a shard to the whole sample list."""
    for batch in loader:
        yield batch._replace(indices=positions[batch.indices])


def sweep_samples(args, samples, configs, log_path: Path, part: str, model) -> tuple[list[dict], dict]:
    """Run ``configs`` on ``samples`` (resuming ``log_path``); returns records and timing.

    Under torchrun (a joined process group) this process decodes and runs only its share of the
    images (``distributed.batch_shard``); the records are gathered as one process makes them. The log's
    folder is locked meanwhile (``output_lock``: one writer per folder; re-entrant for ``run``).
    """
    with output_lock(log_path.parent, collective=True):
        return _sweep_samples(args, samples, configs, log_path, part, model)


def _sweep_samples(args, samples, configs, log_path: Path, part: str, model) -> tuple[list[dict], dict]:
    log = ResultLog(log_path, fingerprint(args, samples, part))
    transform = image_source(args).view(transform_of(model))
    world = torch.distributed.get_world_size() if D.is_distributed() else 1
    positions = torch.tensor(D.batch_shard(len(samples), args.batch_size, D.rank(), world), dtype=torch.int64)
    mine = [samples[int(i)] for i in positions]
    return run_sweep(
        model,
        configs,
        lambda: _global_batches(loader_of(mine, transform, args), positions),
        total=len(mine),
        log=log,
        batch_size=args.batch_size,
        device=args.device,
        skip_bad=args.skip_bad,
        calibration=lambda idx: torch.tensor(
            [is_calibration(samples[int(i)].path) for i in idx], dtype=torch.bool
        ),  # dtype: a process may hold no image
        progress=not args.no_progress and D.rank() == 0,
    )


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
    fingerprint and the bottom crop of every ``sweep_samples`` call of a command come from it."""
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
    configs = build_configs(args, args.criterion, args.adaptive)
    if not args.no_unpruned:
        configs.insert(0, SweepConfig(None, 1.0, 1.0, (), False))
    samples = read_source(args)
    info = D.init_distributed(args.device)  # under torchrun: one share of the images per process
    args.device = info.device
    try:
        model = load_checked_model(args, samples)  # bad weights, labels or --locations: OUT is not touched
        with output_lock(args.out, collective=True):  # a second sweep on OUT stops here (exit 2)
            return _run(args, configs, samples, info.is_main, model)
    finally:
        D.cleanup()


def _run(args: argparse.Namespace, configs: list[SweepConfig], samples: list, is_main: bool, model) -> int:
    t0 = time.perf_counter()
    records, timing = sweep_samples(args, samples, configs, args.out / "results.jsonl", "all", model)
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

"""``renyiprune bench``: images/s, latency, GMACs and peak memory of the unpruned model and pruned configs."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from ..core.criteria import list_criteria
from ..core.merge_order import list_merge_orders
from ..experiments.benchmark import DTYPES, BenchSettings, benchmark_configs, machine_info
from ..models.model import create_model
from ..planning.points import Point
from . import common
from . import eval as eval_cli


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput, latency, GMACs and peak memory of pruning configurations (random weights are fine)",
        description="Time the unpruned model and each configuration side by side in one process: "
        "warm-up, then interleaved rounds; medians, spread and paired speedups. Every method eval takes: "
        "criteria by keep rate or --budget, --removed merge/fuse, ToMe (tome, --tome-r or --budget, "
        "--entropy-weight), best (the tuned policy). Peak memory of the whole forward and of the pruned "
        "part (blocks from the first that removes tokens). Progress on stderr. The input is random "
        "(timing does not depend on the pixels), so bench reads no images and takes no data set.",
    )
    p.add_argument("--model", type=common.model_name, default="deit_tiny_patch16_224",
                   help="model name (default: DeiT-Tiny, as every command)")
    p.add_argument("--weights", type=common.existing_file, default=None, help="weights (default: random)")
    p.add_argument("--keep", type=common.keep_rates, default=[0.9, 0.7, 0.5], help="keep rate(s) in (0, 1]")
    arg = p.add_argument
    arg("--criterion", type=common.names, default=["evit", "renyi"],
        help=f"comma list of: tome, best, {', '.join(list_criteria())} (those with an order take each "
        "--alpha), options in brackets over the flags (renyi[cls_key=exclude]), or a per-stage spec "
        "renyi:2@3,evit@6,evit@9; the unpruned model always runs")
    common.add_old_spelling(p, "--criteria", "criterion", type=common.names)
    arg("--fuse", action="store_true", help="fuse the pruned tokens into one (EViT)")
    arg("--removed", choices=["drop", "fuse", "merge"], default=None,
        help="what happens to pruned tokens: drop, fuse (= --fuse) or merge into the most similar kept token")
    arg("--alpha", type=common.alphas, default=[2.0], help="Rényi order(s), e.g. 1,2,inf")
    arg("--locations", type=common.locations, default=(3, 6, 9), help="0-based pruning blocks")
    arg("--budget", type=common.budgets, default=None,
        help="compute budget(s) F in (0, 1] instead of --keep: keep rate / ToMe r solved for GMACs <= F")
    arg("--tokens", type=common.token_counts, default=None,
        help="patches kept at each location, instead of --keep")
    arg("--method", choices=["prune", "tome"], default="prune", help="tome: same as --criterion tome")
    arg("--tome-r", type=common.tome_rs, default=[16],
        help="tome: tokens merged after every block (comma list)")
    arg("--schedule", choices=["constant", "decreasing"], default="constant", help="tome: r schedule")
    arg("--entropy-weight", type=common.real(), default=0.0,
        help="tome: weight of the z-scored Rényi row entropy (order: first --alpha) in the merge order")
    arg("--merge-order", choices=list_merge_orders(), default="entropy", help="tome: merge order")
    arg("--policy", type=common.policy_file, default=None, help="tuned policy JSON for best")
    arg("--direction", choices=["row", "column"], default=None, help="renyi: row or column")
    arg("--heads", choices=["mean", "pooled"], default=None, help="renyi: head aggregation")
    arg("--cls-key", choices=["include", "exclude"], default=None, help="renyi: CLS key")
    arg("--seed", type=common.integer(0, 2**32 - 1), default=None, help="random criterion seed")
    p.add_argument("--batch-size", type=common.integer(1), default=64)
    p.add_argument("--image-size", type=common.integer(1), default=224)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype below float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=common.integer(1), default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="also measure each configuration via torch.compile")
    p.add_argument("--warmup", type=common.integer(0), default=2, help="untimed rounds")
    p.add_argument("--reps", type=common.integer(1), default=5, help="timed interleaved rounds")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def configs_from_args(args: argparse.Namespace) -> list[Point]:
    """The configurations to time: every registered criterion at each keep rate (or budget, or token
    schedule) and, where it takes one, each --alpha, grouped by keep rate; then eval's configurations
    for tome, best and per-stage specs."""
    ns = argparse.Namespace(**{**_eval_defaults(), **vars(args)})
    criteria = eval_cli._criteria(args.criterion)
    if ns.method == "tome" and "tome" not in criteria:
        criteria = ["tome"]
    if ns.tokens is not None and ns.budget is not None:
        raise ValueError("--tokens and --budget both set the schedule; pass one")
    ns.method = "prune"
    plain, other = [], []
    for spec in criteria:
        crit, _ = common.criterion_spec(spec)  # 'renyi[cls_key=exclude]': options over the flags
        if crit in eval_cli.UNPRUNED:
            continue  # the unpruned model is always measured
        if crit not in ("tome", "best") and "@" not in crit and crit not in list_criteria():
            raise ValueError(f"--criterion {spec!r}: unknown criterion {crit!r}; choose from tome, best, "
                             f"{', '.join(list_criteria())}")
        (other if crit in ("tome", "best") or "@" in crit else plain).append(spec)
    steps = [{}] if ns.tokens is not None else [{"budget": [f]} for f in ns.budget] if ns.budget is not None \
        else [{"keep": [r]} for r in ns.keep]
    points = [p for step in steps for spec in plain
              for p in eval_cli.spec_points(argparse.Namespace(**{**vars(ns), **step}), spec)]  # fmt: skip
    points += [p for spec in other for p in eval_cli.spec_points(ns, spec)]
    return list(dict.fromkeys(points))


def _eval_defaults() -> dict:
    """eval's option defaults, for the parts of its config builder that bench reuses."""
    return dict(alpha=[1.0], keep=[0.7], locations=(3, 6, 9), tokens=None, fuse=False, removed=None,
                tome_r=[16], schedule="constant", method="prune", entropy_weight=0.0, merge_order="entropy",
                budget=None, direction=None, heads=None, cls_key=None, seed=None, policy=None,
                model="deit_tiny_patch16_224")  # fmt: skip


def _check(args: argparse.Namespace) -> None:
    for name in ("batch_size", "image_size", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        print("bench: float16 autocast on CPU is slow and for testing only", file=sys.stderr)


def _fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = configs_from_args(args)
    torch.manual_seed(0)
    model = create_model(args.model, weights=args.weights, img_size=args.image_size).to(args.device)
    depth = len(model.blocks)
    if any(i >= depth for i in args.locations):
        raise ValueError(f"--locations {args.locations} out of range for {args.model} ({depth} blocks)")
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)

    def say(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    settings = BenchSettings(DTYPES[args.dtype], args.warmup, args.reps, args.compile)
    rows = benchmark_configs(model, configs, x, settings, progress=say)
    weights = str(args.weights) if args.weights else "random (speed only; accuracy is meaningless)"
    setup = dict(
        model=args.model,
        weights=weights,
        batch_size=args.batch_size,
        image_size=args.image_size,
        dtype=args.dtype,
        locations=list(args.locations),
        warmup=args.warmup,
        reps=args.reps,
    )
    if args.json:
        common.print_json(dict(setup, machine=machine_info(args.device), results=[r.to_dict() for r in rows]))
        return 0
    info = machine_info(args.device)
    print(
        f"{args.model}, weights: {weights}; batch {args.batch_size}, {args.image_size} px, {args.dtype}, "
        f"{info['device']}, {info['threads']} threads, torch {info['torch']}; "
        f"median of {args.reps} interleaved rounds"
    )
    print(format_rows(rows))
    return 0


def format_rows(rows) -> str:
    """The bench table: one line per configuration. ``fewer GMACs``: the unpruned model's GMACs ÷ this
    configuration's (1.54x: 1.54 times fewer; ``efficiency`` = speedup ÷ that). ``peak MB`` / ``mem ratio``:
    the whole forward; ``pruned MB`` / ``pruned ratio``: the blocks from the first that removes tokens,
    against the unpruned model's same blocks."""
    headers = [
        "config",
        "images/s",
        "ms/batch",
        "spread",
        "speedup",
        "GMACs",
        "fewer GMACs",
        "efficiency",
        "peak MB",
        "mem ratio",
        "pruned MB",
        "pruned ratio",
        "vs evit",
    ]
    body = [
        [
            r.config,
            f"{r.images_per_s:.1f}",
            f"{r.latency_ms:.0f}",
            f"{100 * r.spread:.0f}%",
            f"{r.speedup:.2f}",
            f"{r.gmacs:.2f}",
            f"{r.gmacs_ratio:.2f}x",
            f"{r.efficiency:.2f}",
            f"{r.peak_mb:.0f}",
            _fmt_ratio(r.memory_ratio),
            "-" if r.pruned_peak_mb is None or r.pruned_from is None else f"{r.pruned_peak_mb:.0f}",
            "-" if r.pruned_from is None else _fmt_ratio(r.pruned_memory_ratio),
            _fmt_ratio(r.vs_evit, 3),
        ]
        for r in rows
    ]
    return common.format_table(headers, body)

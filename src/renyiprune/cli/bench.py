"""``renyiprune bench``: images/s, latency, GMACs and peak memory of the unpruned model and pruned configs."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from ..benchmark import DTYPES, benchmark_configs, machine_info
from ..criteria import list_criteria, takes_alpha
from ..evaluate import PruneConfig
from ..model import create_model
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput, latency, GMACs and peak memory of pruning configurations (random weights are fine)",
        description="Time the unpruned model and each (criterion, keep rate) side by side in one process: "
        "warm-up, then interleaved rounds; medians, spread and paired speedups. Progress on stderr.",
    )
    p.add_argument("--model", type=common.model_name, default="deit_small_patch16_224")
    p.add_argument("--weights", type=common.existing_path, default=None, help="weights (default: random)")
    p.add_argument("--keep", type=common.keep_rates, default=[0.9, 0.7, 0.5], help="keep rates")
    p.add_argument("--criteria", type=common.names, default=["evit", "renyi"],
                   help=f"any of {', '.join(list_criteria())}; those with an order take each --alpha")
    p.add_argument("--fuse", action="store_true", help="fuse the pruned tokens into one (EViT)")
    p.add_argument("--alpha", type=common.alphas, default=[2.0], help="Rényi order(s), e.g. 1,2,inf")
    p.add_argument("--locations", type=common.locations, default=(3, 6, 9), help="0-based pruning blocks")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype below float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="also measure each configuration via torch.compile")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    p.add_argument("--reps", type=int, default=5, help="timed interleaved rounds")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def configs_from_args(args: argparse.Namespace) -> list[PruneConfig]:
    configs = []
    fuse = bool(getattr(args, "fuse", False))
    for crit in args.criteria:
        if crit not in list_criteria():
            raise ValueError(f"unknown criterion {crit!r}; choose from {', '.join(list_criteria())}")
        for r in args.keep:
            for a in args.alpha if takes_alpha(crit) else [1.0]:
                configs.append(PruneConfig(crit, r, a, tuple(args.locations), fuse))
    return list(dict.fromkeys(configs))


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

    rows = benchmark_configs(
        model,
        configs,
        x,
        dtype=DTYPES[args.dtype],
        warmup=args.warmup,
        reps=args.reps,
        compile=args.compile,
        progress=say,
    )
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
    """The bench table: one line per configuration."""
    headers = [
        "config",
        "images/s",
        "ms/batch",
        "spread",
        "speedup",
        "GMACs",
        "GMACs ratio",
        "efficiency",
        "peak MB",
        "mem ratio",
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
            f"{r.gmacs_ratio:.2f}",
            f"{r.efficiency:.2f}",
            f"{r.peak_mb:.0f}",
            _fmt_ratio(r.memory_ratio),
            _fmt_ratio(r.vs_evit, 3),
        ]
        for r in rows
    ]
    return common.format_table(headers, body)

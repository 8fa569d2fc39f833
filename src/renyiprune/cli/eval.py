"""``renyiprune eval``: accuracy and compute of the unpruned model and pruning criteria on one image set."""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace

import torch

from ..core.criteria import list_criteria, takes_alpha
from ..core.entropy import parse_alpha
from ..core.merge_order import list_merge_orders
from ..core.plans import UNPRUNED as UNPRUNED_PLAN
from ..core.selection import FUSIONS
from ..data.datasets import TRANSFORMS, eval_transform
from ..data.images import check_labels, sample_loader
from ..experiments.evaluate import evaluate, pruned_view
from ..planning.build import PatchArgs, build_plan, spec_args
from ..planning.points import Point
from ..planning.policy import best, budget_plan, entry_args, load_policy, policy_entry
from ..utils.distributed import cleanup, init_distributed
from . import common

UNPRUNED = {"none", "unpruned", "baseline"}


def _alphas_or_auto(text: str) -> list:
    """Comma list of Rényi orders; 'auto' takes the tuned order from the policy."""
    return common._list(lambda t: "auto" if t.strip().lower() == "auto" else parse_alpha(t))(text)


def _criteria(values: list[str]) -> list[str]:
    """Join 'renyi:2@3,evit@6,evit@9' (all items per-stage) into one spec 'renyi:2@3+evit@6+evit@9'."""
    if len(values) > 1 and all("@" in v and "+" not in v for v in values):
        return ["+".join(values)]
    return values


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5, GMACs and images/s of pruning configurations on an image folder",
        description="Evaluate the unpruned model and/or pruning criteria on the same images. Several "
        "--criterion and --alpha/--keep values are crossed and evaluated in one pass.",
    )
    common.add_model_args(p)
    common.add_data_args(p)
    add_config_args(p)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="run the forwards under torch.autocast in this dtype (entropy stays float32)")
    p.add_argument("--transform", choices=TRANSFORMS, default="center-crop",
                   help="center-crop: the model's ImageNet view (default); resize: the whole image squashed "
                   "to the input size (fine-grained data, as probe and train --transform resize)")
    p.add_argument("--limit", type=common.integer(1), default=None,
                   help="evaluate the first N images in listing order")
    p.add_argument("--batch-size", type=common.integer(1), default=64)
    p.add_argument("--workers", type=common.integer(0), default=2, help="DataLoader worker processes")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images (counted) instead of stopping"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The arguments that make up the pruning configurations (read by ``configs_from_args``): eval's,
    and probe's unchanged."""
    p.add_argument(
        "--criterion",
        type=common.names,
        default=["renyi"],
        help=f"comma list of: none (unpruned), tome (token merging), best (tuned policy's choice), "
        f"{', '.join(list_criteria())}; options in brackets override the flags for that criterion: "
        "renyi[cls_key=exclude;heads=pooled]; or one per-stage spec renyi:2@3,evit@6,evit@9 (several: "
        "join stages with +)",
    )
    p.add_argument(
        "--alpha",
        type=common._typed(_alphas_or_auto, "alphas"),
        default=[1.0],
        help="Rényi order(s): 0.5,1,2,inf, or auto (from --policy)",
    )
    p.add_argument("--policy", type=common.policy_file, default=None,
                   help="tuned policy JSON for --alpha auto / --criterion best (default: the one shipped)")
    p.add_argument("--keep", type=common.keep_rates, default=[0.7], help="keep rate(s) in (0, 1]")
    p.add_argument("--locations", type=common.locations, default=(3, 6, 9), help="0-based pruning blocks")
    p.add_argument("--tokens", type=common.token_counts, default=None,
                   help="patches kept at each location (one count, or one per location), instead of --keep")
    p.add_argument("--fuse", action="store_true", help="fuse pruned tokens into one extra token (EViT)")
    p.add_argument("--removed", choices=["drop", "fuse", "merge"], default=None,
                   help="what happens to pruned tokens: drop, fuse (= --fuse) or merge into the most "
                   "similar kept token (proportional attention afterwards)")
    p.add_argument("--fusion", choices=list(FUSIONS), default=None,
                   help="with --fuse: evit (default; EViT's rule: raw CLS-attention weights, the fused token "
                   "ranked like a patch at later locations) or renorm (renormalized weights, never ranked)")
    p.add_argument("--tome-r", type=common.tome_rs, default=[16],
                   help="criterion tome: tokens merged after every block (comma list)")
    p.add_argument("--schedule", choices=["constant", "decreasing"], default="constant",
                   help="criterion tome: constant r, or 2r at the first block down to 0")
    p.add_argument("--method", choices=["prune", "tome"], default="prune",
                   help="tome: evaluate token merging (same as adding tome to --criterion)")
    p.add_argument("--entropy-weight", type=common.real(), default=0.0,
                   help="tome: weight of the z-scored Rényi row entropy (order --alpha) in the merge order")
    p.add_argument("--merge-order", choices=list_merge_orders(), default="entropy",
                   help="tome with --entropy-weight: which tokens merge first (entropy: diffuse attention; "
                   "cls_attention: least attended by CLS)")
    p.add_argument("--budget", type=common.budgets, default=None,
                   help="compute budget(s) F in (0, 1]: solve keep rate / r for GMACs <= F x unpruned")
    p.add_argument("--direction", choices=["row", "column"], default=None, help="renyi: row or column")
    p.add_argument("--heads", choices=["mean", "pooled"], default=None, help="renyi: head aggregation")
    p.add_argument("--cls-key", choices=["include", "exclude"], default=None, help="renyi: CLS key")
    p.add_argument("--seed", type=common.integer(0, 2**32 - 1), default=None, help="random criterion seed")


def _fusion(args: argparse.Namespace) -> str | None:
    """The fusion rule asked for with --fusion (None: not given)."""
    fusion = getattr(args, "fusion", None)
    if fusion is not None and not (args.fuse or args.removed == "fuse"):
        raise ValueError("--fusion applies to fused pruning: add --fuse (or --removed fuse)")
    return fusion


def _base(args: argparse.Namespace) -> PatchArgs:
    """What the flags say for every pruning configuration: locations, fate of pruned tokens, fusion."""
    fusion = _fusion(args)
    return PatchArgs(locations=tuple(args.locations), fuse=args.fuse, removed=args.removed, fusion=fusion)


def configs_from_args(args: argparse.Namespace) -> list[Point]:
    """The configurations an ``eval`` command line stands for; ``--alpha`` goes to every criterion that
    takes an order (``criteria.takes_alpha``), 1 elsewhere."""
    criteria = _criteria(args.criterion)
    if args.method == "tome" and "tome" not in criteria:
        criteria = [c for c in criteria if c in UNPRUNED] + ["tome"]
    return list(dict.fromkeys(p for spec in criteria for p in spec_points(args, spec)))  # unique, in order


def spec_points(args: argparse.Namespace, spec: str) -> list[Point]:
    """The configurations of one ``--criterion`` item."""
    crit, given = common.criterion_spec(spec)  # 'renyi[cls_key=exclude]': options over the flags
    if (crit in UNPRUNED or crit == "best") and given:
        raise ValueError(f"--criterion {spec!r}: criterion {crit} takes no options in brackets")
    if crit in UNPRUNED:
        return [Point(UNPRUNED_PLAN)]
    if crit == "best":
        return _best_points(args)
    if "@" in crit:
        with common.naming("--criterion", crit):
            return [Point(build_plan(spec_args(crit, given, replace(_base(args), keep_rate=r))))
                    for r in args.keep]  # fmt: skip
    if crit == "tome":
        return _tome_points(args, given)
    if crit not in list_criteria():
        raise ValueError(f"--criterion {spec!r}: unknown criterion {crit!r}; choose from none, tome, "
                         f"best, {', '.join(list_criteria())}")
    return _criterion_points(args, crit, given)


def _criterion_points(args: argparse.Namespace, crit: str, given: dict) -> list[Point]:
    """A registered criterion at every --alpha (where it takes one) x --keep, --budget or --tokens."""
    opts: dict = {}
    if crit in ("renyi", "shannon"):
        opts = {k: v for k in ("direction", "heads", "cls_key") if (v := getattr(args, k)) is not None}
    elif crit == "random" and args.seed is not None:
        opts = {"seed": args.seed}
    given = dict(given)
    fixed_alpha = given.pop("alpha", None)  # 'renyi[alpha=inf]': this criterion at one order only
    opts.update(given)
    alphas = [parse_alpha(str(fixed_alpha))] if fixed_alpha is not None else \
        args.alpha if takes_alpha(crit, opts) else [1.0]
    base = _base(args)
    if args.tokens is not None:
        if args.budget is not None:
            raise ValueError("--tokens and --budget both set the schedule; pass one")
        if len(args.tokens) not in (1, len(args.locations)):
            raise ValueError(f"--tokens: {len(args.tokens)} counts for {len(args.locations)} locations")
        base = replace(base, alpha=alphas[0], tokens=args.tokens)
        return [Point(build_plan(spec_args(crit, opts, base)))]
    if args.budget is not None:  # a compute budget: the keep rate is solved on the model
        return [Point(build_plan(spec_args(crit, opts, replace(base, alpha=a))), budget=f)
                for a, f in itertools.product(alphas, args.budget)]  # fmt: skip
    points = []
    for a, r in itertools.product(alphas, args.keep):
        these = opts
        if a == "auto":
            entry = policy_entry(_policy(args), r, crit)
            a, these = float(entry.get("alpha", 1.0)), {**opts, **entry.get("options", {}), **given}
        points.append(Point(build_plan(spec_args(crit, these, replace(base, keep_rate=r, alpha=a)))))
    return points


def _tome_points(args: argparse.Namespace, given: dict | None = None) -> list[Point]:
    """ToMe baselines: one per r (or per budget, solving r); options ``given`` in brackets
    (tome[r=8;schedule=decreasing]) over the flags."""
    extra: dict = {}
    if args.entropy_weight:
        extra = {"entropy_weight": args.entropy_weight, "alpha": args.alpha[0]}
        if args.merge_order != "entropy":
            extra["merge_order"] = args.merge_order
    if args.budget is not None:
        if "r" in (given or {}):
            raise ValueError("tome[r=...] with --budget: the budget solves r; give one of them")
        plan = build_plan(spec_args("tome", {**extra, **(given or {})}, PatchArgs()))
        return [Point(plan, budget=f) for f in args.budget]
    sched = {"schedule": args.schedule} if args.schedule != "constant" else {}
    specs = [{"r": r, **sched, **extra, **(given or {})} for r in args.tome_r]
    return [Point(build_plan(spec_args("tome", o, PatchArgs()))) for o in specs]


def _policy(args: argparse.Namespace) -> dict:
    return load_policy(getattr(args, "policy", None), getattr(args, "model", "deit_tiny_patch16_224"))


def _best_points(args: argparse.Namespace) -> list[Point]:
    """'best': the policy's choice per keep rate, or per budget (the method chosen at the nearest tuned
    budget, its schedule solved on the model; a policy tuned per keep rate: its choice at the keep rate
    that meets the budget)."""
    policy, base = _policy(args), _base(args)
    if args.budget is None:
        return [Point(build_plan(entry_args(policy_entry(policy, r), replace(base, keep_rate=r))))
                for r in args.keep]  # fmt: skip
    if not policy.get("budget"):
        model = getattr(args, "model", "deit_tiny_patch16_224")
        path = getattr(args, "policy", None)
        return [Point(best(model, budget=f, path=path, args=base)) for f in args.budget]
    return [Point(budget_plan(policy, f), budget=f) for f in args.budget]


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    configs = configs_from_args(args)
    source = common.read_images(args)
    dist_info = init_distributed(args.device)  # under torchrun: one shard of the images per process
    args.device = dist_info.device
    try:
        return _run(args, configs, source, dist_info)
    finally:
        cleanup()


def _run(args: argparse.Namespace, configs: list[Point], source: common.ImageSource, dist_info) -> int:
    model = common.load_model(args)
    check_labels(source.samples, model.num_classes)  # before the first forward
    transform = source.view(eval_transform(args.transform, model.pretrained_cfg))
    loader, shard = sample_loader(
        source.samples, transform, batch_size=args.batch_size, workers=args.workers,
        shard=(dist_info.rank, dist_info.world_size),
    )
    depth = len(model.blocks)
    if any(i >= depth for i in args.locations):
        raise ValueError(
            f"--locations {args.locations} out of range for {args.model} ({depth} blocks, 0-based)"
        )
    views = {c.label: pruned_view(model, c) for c in configs}
    results = evaluate(
        views,
        loader,
        device=args.device,
        skip_bad=args.skip_bad,
        total=len(shard),
        progress=not args.no_progress and dist_info.is_main,
        dtype=getattr(torch, args.dtype),
        reference="unpruned" if "unpruned" in views else None,
    )
    if not dist_info.is_main:
        return 0
    if args.json:
        rows = [r.to_dict() for r in results]
        common.print_json(rows[0] if len(rows) == 1 else {"results": rows, "images": results[0].images})
        return 0
    base = next((r for r in results if r.config == "unpruned"), None)
    headers = ["config", "top-1 %", "top-5 %", "GMACs", "images/s"]
    if base:
        headers += ["Δtop-1", "95 % CI", "fewer GMACs"]  # unpruned ÷ this config: 1.54x fewer GMACs
    rows = []
    for r in results:
        row = [r.config, f"{r.top1:.2f}", f"{r.top5:.2f}", f"{r.gmacs:.3f}", f"{r.images_per_s:.1f}"]
        if base:
            lo, hi = r.paired["ci95"] if r.paired else (0.0, 0.0)
            row += [f"{r.top1 - base.top1:+.2f}", f"[{lo:+.2f}, {hi:+.2f}]", f"{base.gmacs / r.gmacs:.2f}x"]
        rows.append(row)
    print(
        f"{args.model} on {source.label} ({results[0].images} images"
        + (f", {results[0].skipped} unreadable skipped" if results[0].skipped else "")
        + ")"
    )
    print(common.format_table(headers, rows))
    sys.stdout.flush()
    return 0

"""``renyiprune visualize``: entropy maps, pruning masks, entropy histograms and attention distance.

The command checks its arguments and hands the figures to ``viz.figures.write_figures``, which renders
them into a scratch folder and then writes them into ``--out`` atomically (index.html last).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..core.criteria import list_criteria, takes_alpha
from ..core.entropy import parse_alpha
from ..core.selection import check_keep_rate
from ..data.images import DataError
from ..viz import inspect_attention as ia
from ..viz.figures import FORMATS, FigureRequest, write_figures
from . import common

HELP = "figures of attention entropy, pruning masks, histograms and attention distance"
DESCRIPTION = ("Render entropy maps and pruning masks per image, and histograms and entropy vs attention "
               "distance over all images, into --out with an index.html.")  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser("visualize", help=HELP, description=DESCRIPTION)
    common.add_model_args(p)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (or use --data or --dataset)")
    common.add_data_args(p)
    p.add_argument("--limit", type=common.integer(1), default=None,
                   help="use the first N images of --data / --dataset")
    _add_pruning_args(p)
    p.add_argument("--out", type=common.output_path, required=True, help="output folder")
    p.add_argument("--format", default="png", help="comma list of png, svg, pdf")
    p.add_argument("--image-figures", type=common.integer(0), default=8,
                   help="per-image figures for at most N images")
    p.add_argument("--batch-size", type=common.integer(1), default=16)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def _add_pruning_args(p: argparse.ArgumentParser) -> None:
    """What is pruned and how: orders, keep rate, locations, criteria and their options."""
    p.add_argument("--alpha", default="1,2,inf", help="Rényi order(s), e.g. 1,2,inf")
    common.add_old_spelling(p, "--alphas", "alpha")
    p.add_argument("--keep", default="0.7", help="one keep rate in (0, 1]")
    p.add_argument("--locations", type=common.locations, default=(3, 6, 9), help="0-based pruning blocks")
    p.add_argument("--blocks", type=common.locations, default=None, help="blocks of the entropy maps (all)")
    p.add_argument("--criterion", default="renyi,evit,random",
                   help="comma list of criteria, one mask row each (one per α for those that take α); "
                   "options in brackets override the flags for that criterion: renyi[cls_key=exclude]")
    common.add_old_spelling(p, "--criteria", "criterion")
    p.add_argument("--fuse", action="store_true", help="fuse pruned tokens into one extra token (EViT)")
    p.add_argument("--direction", choices=["row", "column"], default=None, help="renyi: row or column")
    p.add_argument("--heads", choices=["mean", "pooled"], default=None, help="renyi: head aggregation")
    p.add_argument("--cls-key", choices=["include", "exclude"], default=None, help="renyi: CLS key")
    p.add_argument("--seed", type=common.integer(0, 2**32 - 1), default=0,
                   help="seed of the random criterion")


@dataclass
class Options:
    """Validated arguments."""

    alphas: list[float]
    keep: float
    formats: list[str]
    specs: list[ia.MaskSpec]
    renyi_opts: dict
    paths: list[Path]
    out: Path
    crop_bottom: int = 0  # pixel rows cut off the bottom of every image (FGVC-Aircraft's banner)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _mask_specs(names: list[str], alphas: list[float], renyi_opts: dict, seed: int) -> list[ia.MaskSpec]:
    from ..viz.plots import alpha_label

    known = list_criteria()
    specs = []
    for text in names:
        name, given = common.criterion_spec(text)  # 'renyi[cls_key=exclude]': options over the flags
        if name not in known:
            raise ValueError(f"--criterion {text!r}: unknown criterion {name!r}; choose from "
                             f"{', '.join(known)}")
        fixed_alpha = given.pop("alpha", None)  # 'renyi[alpha=2]': one row, at that order
        base = {"renyi": renyi_opts, "shannon": renyi_opts, "random": {"seed": seed}}.get(name, {})
        opts = tuple({**base, **given}.items())
        label = name + (f"[{';'.join(f'{k}={v}' for k, v in given.items())}]" if given else "")
        if takes_alpha(name, dict(opts)):  # one row per --alpha order (renyi, evit_renyi, hybrid, ...)
            orders = [parse_alpha(str(fixed_alpha))] if fixed_alpha is not None else alphas
            specs += [ia.MaskSpec(f"{label} α={alpha_label(a)}", name, a, opts) for a in orders]
        else:
            specs.append(ia.MaskSpec(label, name, 1.0, opts))
    if not specs:
        raise ValueError("--criterion names no criterion")
    return specs


def _image_paths(args: argparse.Namespace) -> tuple[list[Path], int]:
    """The image files to draw, and the pixel rows to crop off their bottom."""
    data_flags = any(getattr(args, f) is not None for f in ("data", "dataset", "split", "data_root"))
    if args.images and data_flags:
        raise ValueError("give IMAGE files or --data / --dataset, not both")
    if not args.images and not data_flags:
        raise ValueError("give at least one IMAGE, --data DIR or --dataset NAME --data-root DIR")
    if data_flags:
        source = common.read_images(args)
        return [s.path for s in source.samples], source.crop_bottom
    if any(not p.strip() for p in args.images):  # '' would be the current folder
        raise ValueError("an IMAGE argument is empty: give image files")
    paths = [Path(p).expanduser() for p in args.images]
    for p in paths:
        if not p.is_file():
            raise DataError(f"image not found: {p}")
    return paths, 0


def parse_options(args: argparse.Namespace) -> Options:
    """Check every argument before any work is done; ValueError/DataError name the bad one."""
    with common.naming("--alpha", args.alpha):
        alphas = [parse_alpha(a) for a in _split(args.alpha)]
    if not alphas:
        raise ValueError("--alpha needs at least one order")
    alphas = list(dict.fromkeys(alphas))
    if len(_split(args.keep)) > 1:
        raise ValueError(f"--keep: visualize draws one keep rate, got {args.keep!r}")
    try:
        keep = check_keep_rate(float(args.keep))
    except ValueError:
        raise ValueError(f"--keep must be a number in (0, 1], got {args.keep!r}") from None
    formats = list(dict.fromkeys(f.lower() for f in _split(args.format)))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--format must be a comma list of {', '.join(FORMATS)}; got {args.format!r}")
    if args.image_figures < 0 or args.batch_size < 1:
        raise ValueError("--image-figures must be >= 0 and --batch-size >= 1")
    renyi_opts = {
        k: v
        for k, v in (("direction", args.direction), ("heads", args.heads), ("cls_key", args.cls_key))
        if v
    }
    specs = _mask_specs(_split(args.criterion), alphas, renyi_opts, args.seed)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    paths, crop_bottom = _image_paths(args)
    return Options(alphas, keep, formats, specs, renyi_opts, paths, out, crop_bottom=crop_bottom)


def run(args: argparse.Namespace) -> int:
    opt = parse_options(args)
    model = common.load_model(args)
    depth = len(model.blocks)
    blocks = list(args.blocks) if args.blocks is not None else list(range(depth))
    for what, locs in (("--locations", args.locations), ("--blocks", blocks)):
        if any(i >= depth for i in locs):
            raise ValueError(f"{what} {tuple(locs)} out of range for {args.model} ({depth} blocks, 0-based)")
    if not args.locations:
        raise ValueError("--locations needs at least one pruning block")
    request = FigureRequest(
        args.model, str(args.weights) if args.weights else "official download", opt.alphas, opt.keep,
        opt.specs, tuple(args.locations), blocks, renyi_opts=opt.renyi_opts, fuse=args.fuse,
        formats=opt.formats, seed=args.seed, image_figures=args.image_figures, batch_size=args.batch_size,
        device=args.device, progress=not args.no_progress, crop_bottom=opt.crop_bottom,
    )  # fmt: skip
    count = write_figures(model, opt.paths, opt.out, request)
    print(f"wrote {count} figures and index.html to {opt.out}")
    return 0

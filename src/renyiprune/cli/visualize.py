"""``renyiprune visualize``: entropy maps, pruning masks, entropy histograms and attention distance.

Every figure is rendered into a private scratch folder first; only when all of them and ``index.html``
are complete are they written into ``--out``, each file atomically (``utils.io.atomic_write``), index.html
last. A failed run leaves ``--out`` as it was. ``figures.json`` lists the files a run wrote; a later run
into the same folder removes those of them it did not write again (and nothing else).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.criteria import list_criteria, takes_alpha
from ..core.entropy import parse_alpha
from ..core.selection import check_keep_rate
from ..data.datasets import open_sample
from ..data.images import BadImageError, DataError, EvalTransform
from ..utils.io import atomic_write, atomic_write_text
from ..viz import inspect_attention as ia
from ..viz.report_html import FigureEntry, render_index
from . import common

FORMATS = ("png", "svg", "pdf")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "visualize",
        help="figures of attention entropy, pruning masks, histograms and attention distance",
        description="Render entropy maps and pruning masks per image, and histograms and entropy vs "
        "attention distance over all images, into --out with an index.html.",
    )
    common.add_model_args(p)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (or use --data or --dataset)")
    common.add_data_args(p)
    p.add_argument("--limit", type=common.integer(1), default=None,
                   help="use the first N images of --data / --dataset")
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
    p.add_argument("--out", type=common.output_path, required=True, help="output folder")
    p.add_argument("--format", default="png", help="comma list of png, svg, pdf")
    p.add_argument("--image-figures", type=common.integer(0), default=8,
                   help="per-image figures for at most N images")
    p.add_argument("--batch-size", type=common.integer(1), default=16)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


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
    config: dict = field(default_factory=dict)
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


def _blocks_text(locs: tuple[int, ...]) -> str:
    """``(3, 6, 9)`` -> ``blocks 4, 7, 10 (indices 3, 6, 9)``: counted as people do, with the 0-based
    indices --locations takes."""
    return (f"blocks {', '.join(str(i + 1) for i in locs)} "
            f"(indices {', '.join(str(i) for i in locs)})")  # fmt: skip


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "image"


def _load(path: Path, crop_bottom: int = 0):
    try:
        return open_sample(path, crop_bottom)
    except Exception as e:  # PIL raises many types; one line naming the file
        raise BadImageError(str(path), f"{type(e).__name__}: {e}") from None


class _Writer:
    """Saves figures in every requested format into the scratch folder and remembers the entries."""

    def __init__(self, folder: Path, formats: list[str], seed: int):
        self.folder, self.formats, self.seed = folder, formats, seed
        self.entries: list[FigureEntry] = []
        self.sizes: dict[str, list[int]] = {}

    def add(self, fig, stem: str, section: str, title: str, caption: str) -> None:
        from ..viz.plots import DPI, save_figure

        files = []
        for fmt in self.formats:
            name = f"{stem}.{fmt}"
            save_figure(fig, self.folder / name, self.seed)
            files.append(name)
        w, h = fig.get_size_inches()
        self.sizes[stem] = [round(w * DPI), round(h * DPI)]
        self.entries.append(FigureEntry(section, title, tuple(files), caption))


def run(args: argparse.Namespace) -> int:
    from ..viz import plots

    opt = parse_options(args)
    model = common.load_model(args)
    depth = len(model.blocks)
    blocks = list(args.blocks) if args.blocks is not None else list(range(depth))
    for what, locs in (("--locations", args.locations), ("--blocks", blocks)):
        if any(i >= depth for i in locs):
            raise ValueError(f"{what} {tuple(locs)} out of range for {args.model} ({depth} blocks, 0-based)")
    if not args.locations:
        raise ValueError("--locations needs at least one pruning block")
    cfg = model.pretrained_cfg
    tf = EvalTransform(cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    grid, ps = model.patch_embed.grid_size, model.patch_embed.patch_size[0]
    locs = tuple(args.locations)
    a_txt = ", ".join(plots.alpha_label(a) for a in opt.alphas)
    opt.config = {
        "model": args.model,
        "weights": str(args.weights) if args.weights else "official download",
        "images": len(opt.paths),
        "alphas": a_txt,
        "keep rate": opt.keep,
        "pruning locations (0-based, --locations)": _blocks_text(locs),
        "fuse": args.fuse,
        "criteria": ", ".join(s.label for s in opt.specs),
        "renyi options": ", ".join(f"{k}={v}" for k, v in opt.renyi_opts.items()) or "row, mean, include",
        "seed": args.seed,
    }

    earlier = owned_files(opt.out)  # what an earlier run into --out wrote (its figures.json)
    with tempfile.TemporaryDirectory(prefix="renyiprune-visualize-") as scratch:
        writer = _Writer(Path(scratch), opt.formats, args.seed)
        _render(args, opt, model, tf, grid, ps, blocks, locs, writer)
        names = sorted(p.name for p in Path(scratch).iterdir())
        manifest = {"config": opt.config, "locations": list(locs), "blocks": blocks, "files": names,
                    "sizes_px": writer.sizes}  # fmt: skip
        index = render_index("renyiprune visualize", opt.config, writer.entries)
        for name in names:
            atomic_write(opt.out / name, partial(shutil.copyfile, Path(scratch) / name))
    atomic_write_text(opt.out / "figures.json", json.dumps(manifest, indent=2, default=str) + "\n")
    atomic_write_text(opt.out / "index.html", index)  # last: it shows the files written before it
    for name in sorted(earlier - set(names)):  # the earlier run's figures that this run did not redraw
        (opt.out / name).unlink(missing_ok=True)
    print(f"wrote {len(writer.entries)} figures and index.html to {opt.out}")
    return 0


def owned_files(out: Path) -> set[str]:
    """The figure files an earlier visualize run wrote into ``out``, as its figures.json lists them (from
    its ``files``, or for older runs its figure stems in every format); empty when there is none."""
    try:
        manifest = json.loads((out / "figures.json").read_text(encoding="utf-8"))
        names = manifest.get("files") or [f"{s}.{f}" for s in manifest.get("sizes_px", {}) for f in FORMATS]
    except (OSError, ValueError, AttributeError, TypeError):  # none, or not a manifest visualize wrote
        return set()
    # plain names of figure files only: never a path elsewhere, never figures.json or index.html
    suffixes = tuple(f".{f}" for f in FORMATS)
    return {n for n in names if isinstance(n, str) and n == Path(n).name and n.endswith(suffixes)}


ENTROPY_CAPTION = (
    "Rényi entropy H_α (nats) of each patch's attention as the renyi criterion computes it ({opts}), in the "
    "unpruned model: one row per α, one column per block, one colour scale per α row. Dark = focused "
    "attention, kept first by renyi pruning."
)
MASKS_CAPTION = "Patches left after each pruning stage (grey = pruned), one row per criterion; {cfg}."
FUSED_NOTE = " The fused token's share is the number (and fraction) of original patches merged into it."
HIST_CAPTION = (
    "For renyi pruning at each α: the entropy of every candidate patch at each pruning stage, split into "
    "kept and pruned, over {count} images; standardized per panel (mean and std in nats in the title) so "
    "that shapes compare across α (values beyond ±4 std are drawn at the edges); densities. {cfg}."
)
DIST_CAPTION = (
    "One point per block and head of the unpruned model: mean attention distance in pixels (Raghu et al. "
    "2021: sum_j a_ij·|pos_i − pos_j| over patch keys, attention renormalized without CLS, averaged over "
    "patch queries) against the mean row entropy H_α of that head's patch queries, coloured by block; "
    "{count} images."
)


class _Totals:
    """Sums over all images: attention distance and entropy per head, stage entropies for histograms."""

    def __init__(self, depth: int, heads: int, alphas: list[float], stages: int):
        self.count = 0
        self.distance = torch.zeros(depth, heads, dtype=torch.float64)
        self.entropy = {a: torch.zeros(depth, heads, dtype=torch.float64) for a in alphas}
        self.hist: dict[float, list[list]] = {a: [[] for _ in range(stages)] for a in alphas}

    def add_logits(self, logits: list[torch.Tensor], grid, patch_size: int) -> None:
        for b, lg in enumerate(logits):
            self.distance[b] += ia.attention_distance(lg, grid, patch_size).double().sum(0).cpu()
            for a, total in self.entropy.items():
                total[b] += ia.head_entropy(lg, a).double().sum(0).cpu()
        self.count += logits[0].shape[0]

    def histogram_data(self) -> dict:
        return {
            a: [
                (torch.cat([h for h, _ in st]).numpy(), torch.cat([k for _, k in st]).numpy())
                for st in stages
            ]
            for a, stages in self.hist.items()
        }


@torch.inference_mode()
def _render(args, opt: Options, model, tf, grid, ps, blocks, locs, writer: _Writer) -> None:
    from ..viz import plots

    cfg_txt = f"{args.model}, keep {opt.keep:g} after {_blocks_text(locs)}"
    cfg_txt += ", fused" if args.fuse else ""
    n_patches = grid[0] * grid[1]
    totals = _Totals(len(model.blocks), model.blocks[0].attn.num_heads, opt.alphas, len(locs))
    bar = tqdm(total=len(opt.paths), unit="img", desc="visualize", disable=args.no_progress, leave=False)
    for start in range(0, len(opt.paths), args.batch_size):
        paths = opt.paths[start : start + args.batch_size]
        pil = [_load(p, opt.crop_bottom) for p in paths]
        x = torch.stack([tf(im) for im in pil]).to(args.device)
        logits = ia.block_logits(model, x)
        totals.add_logits(logits, grid, ps)
        wanted = [i for i in range(len(paths)) if start + i < args.image_figures]
        masks = {}
        for a in opt.alphas:  # renyi pruning at each α: histogram data, and its mask rows for free
            spec = ia.MaskSpec("", "renyi", a, tuple(opt.renyi_opts.items()))
            records = ia.prune_records(model, x, spec, opt.keep, locs, args.fuse)
            for s, pair in enumerate(ia.stage_entropies(records)):
                totals.hist[a][s].append(pair)
            masks[spec] = ia.masks_from_records(records, n_patches, args.fuse)
        if wanted:
            for spec in opt.specs:
                key = replace(spec, label="")
                if key not in masks:
                    masks[key] = ia.pruning_masks(model, x, spec, opt.keep, locs, args.fuse)
        for i in wanted:
            crop = np.asarray(tf.center_crop(tf.resize(pil[i])))
            name, stem = paths[i].name, f"{start + i:03d}_{_safe(paths[i].stem)}"
            one = [lg[i : i + 1] for lg in logits]
            maps = {
                a: m.numpy()
                for a, m in ia.entropy_maps(one, opt.alphas, blocks, grid, **opt.renyi_opts).items()
            }
            fig = plots.entropy_maps_figure(crop, maps, blocks, f"Per-patch attention entropy: {name}")
            caption = ENTROPY_CAPTION.format(opts=opt.config["renyi options"])
            writer.add(fig, f"{stem}_entropy", f"Image {name}", f"Entropy maps: {name}", caption)
            rows = []
            for spec in opt.specs:
                kept, fused = masks[replace(spec, label="")]
                rows.append((spec.label, kept[i].numpy(), fused[i].tolist()))
            fig = plots.masks_figure(crop, rows, locs, grid, f"Pruned patches after each stage: {name}")
            caption = MASKS_CAPTION.format(cfg=cfg_txt) + (FUSED_NOTE if args.fuse else "")
            writer.add(fig, f"{stem}_masks", f"Image {name}", f"Pruning masks: {name}", caption)
        bar.update(len(paths))
    bar.close()

    n = totals.count
    fig = plots.histograms_figure(
        totals.histogram_data(), locs, f"Entropy of kept vs pruned patches ({n} images)"
    )
    caption = HIST_CAPTION.format(count=n, cfg=cfg_txt)
    writer.add(fig, "histograms", "Over all images", "Entropy of kept vs pruned patches", caption)
    dist = (totals.distance / n).numpy()
    ent = {a: (v / n).numpy() for a, v in totals.entropy.items()}
    fig = plots.distance_figure(dist, ent, f"Entropy vs mean attention distance per head ({n} images)")
    caption = DIST_CAPTION.format(count=n)
    writer.add(fig, "distance", "Over all images", "Entropy vs attention distance", caption)

"""The figures ``renyiprune visualize`` writes: entropy maps and pruning masks per image, entropy
histograms and entropy vs attention distance over all images, with ``index.html`` and ``figures.json``.

Every figure is rendered into a private scratch folder first; only when all of them and ``index.html``
are complete are they written into the output folder, each file atomically (``utils.io.atomic_write``),
index.html last. A failed run leaves the folder as it was. ``figures.json`` lists the files a run wrote;
a later run into the same folder removes those of them it did not write again (and nothing else).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data.datasets import eval_transform, open_sample
from ..data.images import BadImageError
from ..utils.io import atomic_write, atomic_write_text
from . import inspect_attention as ia
from .report_html import FigureEntry, render_index

__all__ = ["FORMATS", "FigureRequest", "write_figures", "owned_files"]

FORMATS = ("png", "svg", "pdf")

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


@dataclass
class FigureRequest:
    """What to draw and how: Rényi orders, one keep rate, the mask rows (``specs``), the pruning
    ``locations`` and entropy-map ``blocks`` (0-based), the formats, and the run's description."""

    model_name: str
    weights: str  # how the weights are named on the page: a path or "official download"
    alphas: list[float]
    keep: float
    specs: list[ia.MaskSpec]
    locations: tuple[int, ...]
    blocks: list[int]
    renyi_opts: dict = field(default_factory=dict)  # direction / heads / cls_key of the entropy maps
    fuse: bool = False
    formats: list[str] = field(default_factory=lambda: ["png"])
    seed: int = 0  # of the random criterion and of the saved files' metadata
    image_figures: int = 8  # per-image figures for at most this many images
    batch_size: int = 16
    device: str = "cpu"
    progress: bool = True
    crop_bottom: int = 0  # pixel rows cut off the bottom of every image (FGVC-Aircraft's banner)


def blocks_text(locs: Sequence[int]) -> str:
    """``(3, 6, 9)`` -> ``blocks 4, 7, 10 (indices 3, 6, 9)``: counted as people do, with the 0-based
    indices --locations takes."""
    return (f"blocks {', '.join(str(i + 1) for i in locs)} "
            f"(indices {', '.join(str(i) for i in locs)})")  # fmt: skip


def settings_table(request: FigureRequest, images: int) -> dict:
    """The run's settings as index.html and figures.json show them."""
    from .plots import alpha_label

    return {
        "model": request.model_name,
        "weights": request.weights,
        "images": images,
        "alphas": ", ".join(alpha_label(a) for a in request.alphas),
        "keep rate": request.keep,
        "pruning locations (0-based, --locations)": blocks_text(request.locations),
        "fuse": request.fuse,
        "criteria": ", ".join(s.label for s in request.specs),
        "renyi options": _renyi_text(request),
        "seed": request.seed,
    }


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
        from .plots import DPI, save_figure

        files = []
        for fmt in self.formats:
            name = f"{stem}.{fmt}"
            save_figure(fig, self.folder / name, self.seed)
            files.append(name)
        w, h = fig.get_size_inches()
        self.sizes[stem] = [round(w * DPI), round(h * DPI)]
        self.entries.append(FigureEntry(section, title, tuple(files), caption))


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


def _masks(model: nn.Module, x: torch.Tensor, request: FigureRequest, totals: _Totals, drawn: bool) -> dict:
    """Renyi pruning at each α (its stage entropies into ``totals``, its masks for free) and, when
    figures are ``drawn``, the mask rows of the other specs: {spec without label: (kept, fused)}."""
    n_patches = model.patch_embed.grid_size[0] * model.patch_embed.grid_size[1]
    locs = tuple(request.locations)
    masks = {}
    for a in request.alphas:
        spec = ia.MaskSpec("", "renyi", a, tuple(request.renyi_opts.items()))
        records = ia.prune_records(model, x, spec, request.keep, locs, request.fuse)
        for s, pair in enumerate(ia.stage_entropies(records)):
            totals.hist[a][s].append(pair)
        masks[spec] = ia.masks_from_records(records, n_patches, request.fuse)
    if drawn:
        for spec in request.specs:
            key = replace(spec, label="")
            if key not in masks:
                masks[key] = ia.pruning_masks(model, x, spec, request.keep, locs, request.fuse)
    return masks


def _image_figures(writer: _Writer, request: FigureRequest, crop: np.ndarray, maps: dict, rows: list,
                   grid: tuple[int, int], path: Path, index: int) -> None:  # fmt: skip
    """One image's figures: its entropy maps and its pruning masks (``rows``: label, kept, fused)."""
    from . import plots

    name, stem = path.name, f"{index:03d}_{_safe(path.stem)}"
    fig = plots.entropy_maps_figure(crop, maps, request.blocks, f"Per-patch attention entropy: {name}")
    caption = ENTROPY_CAPTION.format(opts=_renyi_text(request))
    writer.add(fig, f"{stem}_entropy", f"Image {name}", f"Entropy maps: {name}", caption)
    locs = tuple(request.locations)
    fig = plots.masks_figure(crop, rows, locs, grid, f"Pruned patches after each stage: {name}")
    caption = MASKS_CAPTION.format(cfg=_cfg_text(request)) + (FUSED_NOTE if request.fuse else "")
    writer.add(fig, f"{stem}_masks", f"Image {name}", f"Pruning masks: {name}", caption)


def _mask_rows(masks: dict, specs: list[ia.MaskSpec], i: int) -> list:
    """Image ``i``'s mask rows, one per spec: (label, kept per stage, fused share per stage)."""
    rows = []
    for spec in specs:
        kept, fused = masks[replace(spec, label="")]
        rows.append((spec.label, kept[i].numpy(), fused[i].tolist()))
    return rows


def _renyi_text(request: FigureRequest) -> str:
    return ", ".join(f"{k}={v}" for k, v in request.renyi_opts.items()) or "row, mean, include"


def _cfg_text(request: FigureRequest) -> str:
    return (f"{request.model_name}, keep {request.keep:g} after {blocks_text(request.locations)}"
            + (", fused" if request.fuse else ""))  # fmt: skip


def _summary_figures(writer: _Writer, request: FigureRequest, totals: _Totals) -> None:
    """The figures over all images: entropy histograms of kept vs pruned, entropy vs distance."""
    from . import plots

    n = totals.count
    fig = plots.histograms_figure(
        totals.histogram_data(), tuple(request.locations), f"Entropy of kept vs pruned patches ({n} images)"
    )
    caption = HIST_CAPTION.format(count=n, cfg=_cfg_text(request))
    writer.add(fig, "histograms", "Over all images", "Entropy of kept vs pruned patches", caption)
    dist = (totals.distance / n).numpy()
    ent = {a: (v / n).numpy() for a, v in totals.entropy.items()}
    fig = plots.distance_figure(dist, ent, f"Entropy vs mean attention distance per head ({n} images)")
    caption = DIST_CAPTION.format(count=n)
    writer.add(fig, "distance", "Over all images", "Entropy vs attention distance", caption)


@torch.inference_mode()
def _render(model: nn.Module, paths: Sequence[Path], request: FigureRequest, writer: _Writer) -> None:
    """Every figure into ``writer``: the per-image ones batch by batch, then those over all images."""
    tf = eval_transform("center-crop", model.pretrained_cfg)
    grid, ps = model.patch_embed.grid_size, model.patch_embed.patch_size[0]
    heads = model.blocks[0].attn.num_heads
    totals = _Totals(len(model.blocks), heads, request.alphas, len(request.locations))
    bar = tqdm(total=len(paths), unit="img", desc="visualize", disable=not request.progress, leave=False)
    for start in range(0, len(paths), request.batch_size):
        batch = paths[start : start + request.batch_size]
        pil = [_load(p, request.crop_bottom) for p in batch]
        x = torch.stack([tf(im) for im in pil]).to(request.device)
        logits = ia.block_logits(model, x)
        totals.add_logits(logits, grid, ps)
        wanted = [i for i in range(len(batch)) if start + i < request.image_figures]
        masks = _masks(model, x, request, totals, bool(wanted))
        for i in wanted:
            crop = np.asarray(tf.center_crop(tf.resize(pil[i])))
            one = [lg[i : i + 1] for lg in logits]
            maps = {a: m.numpy() for a, m in
                    ia.entropy_maps(one, request.alphas, request.blocks, grid, **request.renyi_opts).items()}
            rows = _mask_rows(masks, request.specs, i)
            _image_figures(writer, request, crop, maps, rows, grid, batch[i], start + i)
        bar.update(len(batch))
    bar.close()
    _summary_figures(writer, request, totals)


def write_figures(model: nn.Module, paths: Sequence[Path], out: Path, request: FigureRequest) -> int:
    """Render every figure of ``paths`` and write them, figures.json and index.html (last) into ``out``;
    the figures an earlier run wrote there and this one did not are removed. Returns the figure count."""
    config = settings_table(request, len(paths))
    locs, blocks = tuple(request.locations), list(request.blocks)
    earlier = owned_files(out)  # what an earlier run into out wrote (its figures.json)
    with tempfile.TemporaryDirectory(prefix="renyiprune-visualize-") as scratch:
        writer = _Writer(Path(scratch), request.formats, request.seed)
        _render(model, paths, request, writer)
        names = sorted(p.name for p in Path(scratch).iterdir())
        manifest = {"config": config, "locations": list(locs), "blocks": blocks, "files": names,
                    "sizes_px": writer.sizes}  # fmt: skip
        index = render_index("renyiprune visualize", config, writer.entries)
        for name in names:
            atomic_write(out / name, partial(shutil.copyfile, Path(scratch) / name))
    atomic_write_text(out / "figures.json", json.dumps(manifest, indent=2, default=str) + "\n")
    atomic_write_text(out / "index.html", index)  # last: it shows the files written before it
    for name in sorted(earlier - set(names)):  # the earlier run's figures that this run did not redraw
        (out / name).unlink(missing_ok=True)
    return len(writer.entries)


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

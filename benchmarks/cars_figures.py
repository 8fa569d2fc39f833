"""Entropy maps and pruning masks of Stanford Cars images, Rényi next to EViT, as the probe sees them.

The figures of ``renyiprune visualize`` (``inspect_attention`` + ``plots``), drawn on the probe's input:
the whole image resized to 224 x 224 (``--transform resize``), not the ImageNet center crop.

    python benchmarks/cars_figures.py --data CARS/val --out docs/figures --count 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from renyiprune.core.entropy import parse_alpha
from renyiprune.data.datasets import eval_transform
from renyiprune.data.images import list_samples, load_image
from renyiprune.models.model import create_model
from renyiprune.viz import inspect_attention as ia
from renyiprune.viz import plots

WEIGHTS = Path(__file__).resolve().parents[1] / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"
LOCS = (3, 6, 9)


def pick(samples, count: int, stride: int) -> list:
    """``count`` images of different classes, every ``stride``-th class from the first."""
    out, seen = [], set()
    for s in samples:
        if s.label % stride == 0 and s.label not in seen:
            seen.add(s.label)
            out.append(s)
        if len(out) == count:
            break
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--stride", type=int, default=40, help="take classes 0, stride, 2*stride, ...")
    ap.add_argument("--alphas", default="1,2,inf", help="Rényi orders of the mask rows and entropy maps")
    ap.add_argument("--keep", default="0.7,0.5")
    args = ap.parse_args()
    alphas = [parse_alpha(a) for a in args.alphas.split(",")]
    keeps = [float(k) for k in args.keep.split(",")]
    model = create_model("deit_tiny_patch16_224", weights=WEIGHTS)
    tf = eval_transform("resize", model.pretrained_cfg)
    grid, n = model.patch_embed.grid_size, model.patch_embed.num_patches
    classes = [ln.strip() for ln in (args.data.parent / "classes.txt").read_text().splitlines() if ln.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    for s in pick(list_samples(args.data), args.count, args.stride):
        img = load_image(s.path)
        shown = np.asarray(img.resize((224, 224)))
        x = tf(img)[None]
        name = f"{classes[s.label]} ({s.path.name})"
        stem = f"cars_{s.path.stem}"
        logits = ia.block_logits(model, x)
        maps = {a: m.numpy() for a, m in ia.entropy_maps(logits, alphas, LOCS, grid).items()}
        fig = plots.entropy_maps_figure(shown, maps, LOCS, f"Per-patch attention entropy: {name}")
        plots.save_figure(fig, args.out / f"{stem}_entropy.png")
        rows = []
        specs = [ia.MaskSpec("EViT", "evit")] + [
            ia.MaskSpec(f"Rényi α={plots.alpha_label(a)}", "renyi", a) for a in alphas
        ]
        for r in keeps:
            for spec in specs:
                kept, fused = ia.pruning_masks(model, x, spec, r, LOCS, fuse=True)
                rows.append((f"{spec.label}, keep {r:g}", kept[0].numpy(), fused[0].tolist()))
        fig = plots.masks_figure(shown, rows, LOCS, grid, f"Kept patches (fused, {n} patches): {name}")
        plots.save_figure(fig, args.out / f"{stem}_masks.png")
        print(f"{stem}: {name}")


if __name__ == "__main__":
    main()

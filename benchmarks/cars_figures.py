"""Entropy maps and pruning masks of Stanford Cars images, Rényi next to EViT, as the probe sees them.

The figures of ``renyiprune visualize`` (``inspect_attention`` + ``plots``), drawn on the probe's input:
the whole image resized to 224 x 224 (``--transform resize``), not the ImageNet center crop. The mask
rows are EViT, Rényi at each ``--alpha`` and the ``--criterion`` extras (the best training-free ones);
``--runs`` draws fine-tuned models instead, a row each with its own weights and configuration.

    python benchmarks/cars_figures.py --data CARS/val --out docs/figures --count 3
    python benchmarks/cars_figures.py --data CARS/val --out docs/figures --tag finetuned --no-entropy \
        --runs runs/cars-ft/evit-k0.7 runs/cars-ft/renyi-a1-k0.7
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from renyiprune.core.criteria import takes_alpha
from renyiprune.core.entropy import parse_alpha
from renyiprune.data.datasets import eval_transform, load_split
from renyiprune.data.images import list_samples, load_image
from renyiprune.models.model import create_model
from renyiprune.models.weights import read_state_dict
from renyiprune.training.checkpoint import load_checkpoint
from renyiprune.training.train import CHECKPOINT
from renyiprune.training.train import WEIGHTS as WEIGHTS_FILE
from renyiprune.viz import inspect_attention as ia
from renyiprune.viz import plots

WEIGHTS = Path(__file__).resolve().parents[1] / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"
LOCS = (3, 6, 9)


def shown_image(x: torch.Tensor, cfg) -> np.ndarray:
    """The model's input (1, 3, H, W), un-normalized to an (H, W, 3) uint8 picture: what the model sees."""
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (((x[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0)).numpy()


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


def load_model(path: Path) -> torch.nn.Module:
    """DeiT-Tiny with ``path``'s weights, whatever its head size (ImageNet's 1000 or a cars head)."""
    weights = read_state_dict(path)
    return create_model(
        "deit_tiny_patch16_224", weights=weights, num_classes=int(weights["head.weight"].shape[0])
    )


def finetuned_rows(runs: list[Path]) -> list[tuple[str, torch.nn.Module, ia.MaskSpec, float]]:
    """One mask row per fine-tuned run (``cars_finetune.py``'s OUT/<name>/): its own weights, pruned with
    the configuration it was trained with (read from its checkpoint)."""
    rows = []
    for run in runs:
        cfg = load_checkpoint(run / CHECKPOINT)["config"]
        a = float(cfg["alpha"])
        label = "EViT" if cfg["criterion"] == "evit" else cfg["criterion"]
        if takes_alpha(cfg["criterion"]):
            label = f"Rényi α={plots.alpha_label(a)}" if cfg["criterion"] == "renyi" else f"{label} α={a:g}"
        spec = ia.MaskSpec(f"{label} tuned", cfg["criterion"], a)
        rows.append((spec.label, load_model(run / WEIGHTS_FILE), spec, float(cfg["keep"])))
    return rows


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="a split folder with labels.tsv")
    ap.add_argument("--dataset", default=None, help="or a named data set (flowers102, ...) under --data-root")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--split", default="val")
    ap.add_argument("--transform", default="resize", help="resize (cars) or center-crop (flowers)")
    ap.add_argument("--prefix", default="cars", help="file names: PREFIX_<image>[_tag]_masks.png")
    ap.add_argument("--cls-readings", action="store_true",
                    help="Rényi with the CLS key in and out: entropy maps and mask rows for both")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--stride", type=int, default=40, help="take classes 0, stride, 2*stride, ...")
    ap.add_argument("--alpha", "--alphas", default="1,2,inf", help="Rényi orders (masks, entropy maps)")
    ap.add_argument("--criterion", default="pagerank", help="more mask rows (comma list)")
    ap.add_argument("--keep", default="0.7,0.5")
    ap.add_argument("--weights", type=Path, default=WEIGHTS, help="DeiT-Tiny weights (any head size)")
    ap.add_argument(
        "--runs",
        type=Path,
        nargs="+",
        default=None,
        help="fine-tuned runs: a row each, own model",
    )
    ap.add_argument("--tag", default="", help="appended to the file names (cars_<image>[_tag]_masks.png)")
    ap.add_argument("--no-entropy", action="store_true", help="draw the masks only")
    args = ap.parse_args()
    alphas = [parse_alpha(a) for a in args.alpha.split(",")]
    model = load_model(args.weights)
    if args.runs:
        rows = finetuned_rows(args.runs)
    else:
        cls_in = " CLS in" if args.cls_readings else ""
        specs = (
            [ia.MaskSpec("EViT", "evit")]
            + [ia.MaskSpec(f"Rényi α={plots.alpha_label(a)}{cls_in}", "renyi", a) for a in alphas]
            + [ia.MaskSpec(f"Rényi α={plots.alpha_label(a)} CLS out", "renyi", a, (("cls_key", "exclude"),))
               for a in (alphas if args.cls_readings else [])]
            + [ia.MaskSpec(c, c) for c in args.criterion.split(",") if c]
        )  # fmt: skip
        rows = [(s.label, model, s, float(r)) for r in args.keep.split(",") for s in specs]
    tf = eval_transform(args.transform, model.pretrained_cfg)
    grid, n = model.patch_embed.grid_size, model.patch_embed.num_patches
    if args.dataset:
        samples = load_split(args.dataset, args.data_root, args.split).samples
        names = args.data_root / "classes.txt"
    else:
        samples, names = list_samples(args.data), args.data.parent / "classes.txt"
    classes = [ln.strip() for ln in names.read_text().splitlines() if ln.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    for s in pick(samples, args.count, args.stride):
        img = load_image(s.path)
        x = tf(img)[None]
        shown = shown_image(x, model.pretrained_cfg)
        name = f"{classes[s.label]} ({s.path.name})"
        stem = f"{args.prefix}_{s.path.stem}" + (f"_{args.tag}" if args.tag else "")
        if not args.no_entropy:
            logits = ia.block_logits(model, x)
            readings = [("", {})] + ([("_clsout", {"cls_key": "exclude"})] if args.cls_readings else [])
            for suffix, opts in readings:
                maps = {a: m.numpy() for a, m in ia.entropy_maps(logits, alphas, LOCS, grid, **opts).items()}
                which = " (CLS key out)" if opts else (" (CLS key in)" if args.cls_readings else "")
                title = f"Per-patch attention entropy{which}: {name}"
                fig = plots.entropy_maps_figure(shown, maps, LOCS, title)
                plots.save_figure(fig, args.out / f"{stem}_entropy{suffix}.png")
        drawn = []
        for label, m, spec, r in rows:
            kept, fused = ia.pruning_masks(m, x, spec, r, LOCS, fuse=True)
            drawn.append((f"{label}, keep {r:g}", kept[0].numpy(), fused[0].tolist()))
        fig = plots.masks_figure(shown, drawn, LOCS, grid, f"Kept patches (fused, {n} patches): {name}")
        plots.save_figure(fig, args.out / f"{stem}_masks.png")
        print(f"{stem}: {name}")


if __name__ == "__main__":
    main()

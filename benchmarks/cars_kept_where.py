"""Where each criterion's kept patches lie on Stanford Cars images: the share of the surviving original
patches that sit in the image's border ring, stage by stage, over many images.

Cars are photographed centred and fill most of the frame, so the outer ring of patches (``--ring`` patches
wide; 2 of 14 by default: 96 of the 196 patches, 49 %) is mostly backdrop, road or sky. A criterion that
keeps the car keeps fewer border patches than that 49 %; one that spends its budget on plain background
keeps more. ``random`` shows the chance level. Rows: the pretrained model with EViT, Rényi at each
``--alpha`` and the ``--criterion`` extras at each ``--keep``; ``--runs`` adds fine-tuned models
(``cars_finetune.py``'s OUT/<name>/), each with its own weights and configuration.

    python benchmarks/cars_kept_where.py --data CARS/val --limit 300 --runs runs/cars-ft/evit-k0.7 ... \
        --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from cars_figures import LOCS, WEIGHTS, finetuned_rows, load_model
from cars_probe_sweep import READINGS, reading_options
from torch.utils.data import DataLoader

from renyiprune.core.entropy import parse_alpha
from renyiprune.data.datasets import eval_transform, load_split
from renyiprune.data.images import ImageDataset, check_bad, collate, list_samples
from renyiprune.viz import inspect_attention as ia
from renyiprune.viz import plots


def reading_name(reading: tuple[str, str, str]) -> str:
    """'row, CLS out, head-mean' style label of a (direction, cls_key, heads) reading."""
    direction, cls_key, heads = reading
    cls = "in" if cls_key == "include" else "out"
    return f"{direction}, CLS {cls}, {'per-head' if heads == 'mean' else 'pooled'}"


def border_mask(grid: tuple[int, int], ring: int) -> torch.Tensor:
    """(num_patches,) bool: the patches within ``ring`` patches of the image's edge (row-major grid)."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    edge = (ys < ring) | (xs < ring) | (ys >= grid[0] - ring) | (xs >= grid[1] - ring)
    return edge.flatten()


@torch.inference_mode()
def border_share(model, loader, spec: ia.MaskSpec, keep: float, border: torch.Tensor) -> list[float]:
    """Per pruning stage, the share (%) of surviving original patches that lie in ``border``, pooled over
    the images (every image keeps the same number, so pooled = mean over images)."""
    inside, total = torch.zeros(len(LOCS)), torch.zeros(len(LOCS))
    for batch in loader:
        check_bad(batch, False)
        kept, _ = ia.pruning_masks(model, batch.images, spec, keep, LOCS, fuse=True)
        inside += (kept & border).sum(dim=(0, 2)).float()
        total += kept.sum(dim=(0, 2)).float()
    return (100.0 * inside / total).tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="a Stanford Cars split folder (labels.tsv)")
    ap.add_argument("--dataset", default=None, help="or a named data set (flowers102, ...) under --data-root")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--split", default="val")
    ap.add_argument("--transform", default="resize", help="resize (cars) or center-crop (flowers)")
    ap.add_argument("--readings", action="store_true",
                    help="rows for Rényi in every reading (cars_probe_sweep.READINGS) at each --alpha")
    ap.add_argument("--limit", type=int, default=300, help="the first N images")
    ap.add_argument("--ring", type=int, default=2, help="border width in patches")
    ap.add_argument("--alpha", default="0.5,1,2,inf", help="Rényi orders of the pretrained rows")
    ap.add_argument("--criterion", default="pagerank,column_norm,random", help="more pretrained rows")
    ap.add_argument("--keep", default="0.7,0.5")
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="fine-tuned runs, a row each")
    ap.add_argument("--no-pretrained", action="store_true", help="the fine-tuned rows only")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.dataset:
        samples = load_split(args.dataset, args.data_root, args.split).samples[: args.limit]
    elif args.data is not None and args.data.is_dir():
        samples = list_samples(args.data)[: args.limit]
    else:
        print(f"--data {args.data}: no such folder (or give --dataset NAME --data-root DIR)", file=sys.stderr)
        return 2
    model = load_model(args.weights)
    alphas = [parse_alpha(a) for a in args.alpha.split(",")]
    specs = (
        [ia.MaskSpec("EViT", "evit")]
        + [ia.MaskSpec(f"Rényi α={plots.alpha_label(a)}", "renyi", a) for a in alphas]
        + [ia.MaskSpec(c, c) for c in args.criterion.split(",") if c]
    )
    if args.readings:  # the default reading is already among the Rényi rows
        specs += [ia.MaskSpec(f"Rényi α={plots.alpha_label(a)} {reading_name(rd)}", "renyi", a,
                              reading_options(*rd)) for rd in READINGS[1:] for a in alphas]  # fmt: skip
    rows = (
        []
        if args.no_pretrained
        else [(s.label, model, s, float(r)) for r in args.keep.split(",") for s in specs]
    )
    rows += finetuned_rows(args.runs)
    tf = eval_transform(args.transform, model.pretrained_cfg)
    loader = DataLoader(ImageDataset(samples, tf), batch_size=args.batch_size, collate_fn=collate)
    grid = model.patch_embed.grid_size
    border = border_mask(grid, args.ring)
    chance = 100.0 * float(border.float().mean())
    print(f"{len(samples)} images; border ring {args.ring} patches wide: {int(border.sum())} of "
          f"{border.numel()} patches ({chance:.1f} %)\n")  # fmt: skip
    print("| model | criterion | keep | " + " | ".join(f"after block {b + 1}" for b in LOCS) + " |")
    print("|---|---|---:|" + "---:|" * len(LOCS))
    out = []
    for label, m, spec, keep in rows:
        share = border_share(m, loader, spec, keep, border)
        tuned = label.endswith(" tuned")
        name = label.removesuffix(" tuned")
        cells = " | ".join(f"{v:.1f}" for v in share)
        print(f"| {'fine-tuned' if tuned else 'pretrained'} | {name} | {keep:g} | {cells} |", flush=True)
        out.append({"model": "fine-tuned" if tuned else "pretrained", "criterion": spec.criterion,
                    "options": dict(spec.options),
                    "alpha": plots.alpha_label(spec.alpha), "label": name, "keep": keep,
                    "border_share": share})  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"images": len(samples), "ring": args.ring, "chance": chance, "rows": out}, indent=1)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

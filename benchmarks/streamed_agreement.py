"""Streamed against explicit pruning attention on real images: same predictions, same kept sets?

    python benchmarks/streamed_agreement.py [--limit 1000] [--keep 0.7] [--json F]

Each batch is decoded once and run through two copies of the same patched DeiT-Tiny (float32): one on
the default streamed path, one with ``model.renyiprune.attention = "explicit"`` (the full attention
matrix). Per configuration it counts images whose top-1 prediction differs, top-1 of both, the
fraction of kept sets that are identical per stage, and the largest logit difference.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import renyiprune as rp
from renyiprune.core.api import share_parameters
from renyiprune.data.images import EvalTransform, list_samples, load_image
from renyiprune.models.model import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
CONFIGS = {"evit": ("evit", 1.0), "renyi α=1": ("renyi", 1.0), "renyi α=2": ("renyi", 2.0),
           "renyi α=∞": ("renyi", math.inf)}  # fmt: skip


@torch.inference_mode()
def agreement(data: Path, weights: Path, limit: int | None = None, keep: float = 0.7, batch_size: int = 50,
              configs: dict = CONFIGS, progress: bool = True) -> dict:  # fmt: skip
    """Per configuration: images, differing predictions, top-1 of both paths, identical kept sets per
    stage (fraction of images), max |logit difference|."""
    samples = list_samples(data)[:limit]
    transform = EvalTransform(224, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    base = rp.create_model("deit_tiny_patch16_224", weights=weights).eval()
    pairs = {}
    for name, (crit, alpha) in configs.items():
        streamed = rp.patch(share_parameters(base), keep_rate=keep, criterion=crit, alpha=alpha)
        explicit = rp.patch(share_parameters(base), keep_rate=keep, criterion=crit, alpha=alpha)
        explicit.renyiprune.attention = "explicit"
        pairs[name] = (streamed, explicit)
    stats = {name: dict(images=0, differ=0, hit_streamed=0, hit_explicit=0, same_kept=[0, 0, 0],
                        max_logit_diff=0.0) for name in configs}  # fmt: skip
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        x = torch.stack([transform(load_image(s.path)) for s in chunk])
        y = torch.tensor([s.label for s in chunk])
        for name, (ms, me) in pairs.items():
            a, b = ms(x), me(x)
            st = stats[name]
            st["images"] += len(chunk)
            st["differ"] += int((a.argmax(1) != b.argmax(1)).sum())
            st["hit_streamed"] += int((a.argmax(1) == y).sum())
            st["hit_explicit"] += int((b.argmax(1) == y).sum())
            st["max_logit_diff"] = max(st["max_logit_diff"], float((a - b).abs().max()))
            for s, (ra, rb) in enumerate(zip(ms.renyiprune.records, me.renyiprune.records, strict=True)):
                st["same_kept"][s] += int((ra.kept == rb.kept).all(dim=1).sum())
        if progress:
            print(f"{i + len(chunk)}/{len(samples)} images", flush=True)
    for st in stats.values():
        st["same_kept"] = [c / st["images"] for c in st["same_kept"]]
        st["top1_streamed"] = 100.0 * st.pop("hit_streamed") / st["images"]
        st["top1_explicit"] = 100.0 * st.pop("hit_explicit") / st["images"]
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "imagenet-sample-1000")
    p.add_argument("--weights", type=Path, default=SHARED / "weights" / "deit_tiny_patch16_224.safetensors")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    stats = agreement(args.data, args.weights, args.limit, args.keep)
    for name, st in stats.items():
        kept = ", ".join(f"{100 * f:.1f} %" for f in st["same_kept"])
        print(f"{name}: {st['images']} images, {st['differ']} different predictions, top-1 "
              f"{st['top1_streamed']:.2f} (streamed) / {st['top1_explicit']:.2f} (explicit), identical kept "
              f"sets per stage {kept}, max |logit diff| {st['max_logit_diff']:.2e}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()

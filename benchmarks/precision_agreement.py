"""bfloat16 vs float32 on real images: per-stage kept-set agreement and top-1, per criterion.

    python benchmarks/precision_agreement.py [--limit 1000] [--keep 0.7] [--how autocast|weights]
        [--ranking-projection native|float32] [--json F]

Each batch is decoded once and run through a float32 and a bfloat16 copy of the same patched DeiT-Tiny;
kept sets are compared per image and stage (|kept32 ∩ kept16| / k), top-1 is counted for both. Also
reports the images whose prediction flips either way, so a top-1 difference can be read against them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

import renyiprune as rp
from renyiprune.data.images import EvalTransform, list_samples, load_image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
SETTINGS = {
    "unpruned": None,
    "evit": ("evit", 1.0),
    "renyi α=2": ("renyi", 2.0),
    "renyi α=∞": ("renyi", float("inf")),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "imagenet-sample-1000")
    p.add_argument("--weights", type=Path,
                   default=SHARED / "weights" / "deit_tiny_patch16_224.safetensors")  # fmt: skip
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--how", choices=("autocast", "weights"), default="autocast")
    p.add_argument("--ranking-projection", choices=("native", "float32"), default="native",
                   help="model.renyiprune.ranking_projection of the bfloat16 models (autocast only)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    samples = list_samples(args.data)[: args.limit]
    t = EvalTransform(224, 0.875, "bicubic", rp.models.model.IMAGENET_MEAN, rp.models.model.IMAGENET_STD)

    def build(setting, half):
        m = rp.create_model("deit_tiny_patch16_224", weights=args.weights)
        m = m.bfloat16() if half and args.how == "weights" else m
        if setting is None:
            return m
        m = rp.patch(m, keep_rate=args.keep, criterion=setting[0], alpha=setting[1])
        m.renyiprune.ranking_projection = args.ranking_projection
        return m

    models = {name: (build(s, False), build(s, True)) for name, s in SETTINGS.items()}
    stats = {name: {"agree": [0, 0, 0], "total": [0, 0, 0], "hit32": 0, "hit16": 0, "up": 0, "down": 0}
             for name in SETTINGS}  # fmt: skip
    for i in tqdm(range(0, len(samples), args.batch_size), desc="batches"):
        chunk = samples[i : i + args.batch_size]
        x = torch.stack([t(load_image(s.path)) for s in chunk])
        y = torch.tensor([s.label for s in chunk])
        for name, (m32, m16) in models.items():
            with torch.no_grad():
                a = m32(x).argmax(1)
                if args.how == "weights":
                    b = m16(x.bfloat16()).argmax(1)
                else:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        b = m16(x).argmax(1)
            st = stats[name]
            st["hit32"] += int((a == y).sum())
            st["hit16"] += int((b == y).sum())
            st["up"] += int(((b == y) & (a != y)).sum())
            st["down"] += int(((a == y) & (b != y)).sum())
            if SETTINGS[name] is None:
                continue
            for s, (r32, r16) in enumerate(zip(m32.renyiprune.records, m16.renyiprune.records, strict=True)):
                for p32, p16 in zip(r32.patch_index.tolist(), r16.patch_index.tolist(), strict=True):
                    st["agree"][s] += len(set(p32) & set(p16))
                    st["total"][s] += len(p32)
    n = len(samples)
    how = args.how + (f", {args.ranking_projection} ranking projection" if args.how == "autocast" else "")
    print(f"\nDeiT-Tiny, keep {args.keep}, {n} images, bfloat16 {how} vs float32\n")
    print("| criterion | top-1 fp32 | top-1 bf16 | Δ | flips up / down | agreement per stage | all stages |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name, st in stats.items():
        st["top1_fp32"], st["top1_bf16"] = 100 * st["hit32"] / n, 100 * st["hit16"] / n
        ag = [a / t for a, t in zip(st["agree"], st["total"], strict=True) if t]
        st["agreement"] = ag
        st["agreement_all"] = sum(st["agree"]) / sum(st["total"]) if sum(st["total"]) else None
        stages = " / ".join(f"{100 * a:.1f}" for a in ag) or "-"
        allst = f"{100 * st['agreement_all']:.1f} %" if ag else "-"
        d = st["top1_bf16"] - st["top1_fp32"]
        flips = f"{st['up']} / {st['down']}"
        top1 = f"{st['top1_fp32']:.1f} | {st['top1_bf16']:.1f} | {d:+.1f}"
        print(f"| {name} | {top1} | {flips} | {stages} | {allst} |")
    if args.json:
        doc = {"keep": args.keep, "how": args.how, "ranking_projection": args.ranking_projection, "images": n,
               "stats": stats}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()

"""Which evaluation transform suits Stanford Cars: center crop vs resizing the whole image.

Unpruned DeiT-Tiny and EViT (keep 0.5, fused) probes, fitted and scored on two halves of the cars
*training* folder only (split by a hash of the file name), so that the choice never sees val/.
Features land in the probe cache (--cache), where the full sweep finds them again.

    python benchmarks/cars_transform.py --train ../shared/assets/stanford-cars/train --cache CACHE
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from renyiprune.data.datasets import eval_transform
from renyiprune.data.images import list_samples
from renyiprune.experiments.probe import (
    FeatureCache,
    ImageSet,
    ProbeConfig,
    extract_features,
    fit_probe,
    is_holdout,
)
from renyiprune.experiments.tune import is_calibration
from renyiprune.models.model import create_model
from renyiprune.models.weights import sha256_file
from renyiprune.planning.points import Point

WEIGHTS = Path(__file__).resolve().parents[1] / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the numbers")
    ap.add_argument("--unpruned-only", action="store_true", help="leave out the EViT keep 0.5 probe")
    args = ap.parse_args()
    model = create_model("deit_tiny_patch16_224", weights=args.weights)
    train = ImageSet("train", tuple(list_samples(args.train)))
    fit = torch.tensor([is_calibration(s.path) for s in train.samples])
    y = train.labels
    hold = torch.tensor([is_holdout(s.path) for s in train.samples])
    configs = [Point.from_spec(None), Point.from_spec("evit", 0.5, 1.0, (3, 6, 9), True)]
    configs = configs[:1] if args.unpruned_only else configs
    out = {}
    for kind in ("center-crop", "resize"):
        tf = eval_transform(kind, model.pretrained_cfg)
        weights = sha256_file(args.weights)
        context = {"model": "deit_tiny_patch16_224", "weights": weights, "transform": repr(tf)}
        cache = FeatureCache(args.cache, context)
        t0 = time.perf_counter()
        feats, timing = extract_features(model, configs, [train], tf, ProbeConfig(cache=cache, workers=1))
        for ci, c in enumerate(configs):
            x = feats[(ci, 0)]
            head = fit_probe(x[fit], y[fit], 196, hold[fit])
            top1 = float((head.logits(x[~fit]).argmax(1) == y[~fit]).float().mean()) * 100
            out[f"{kind} {c.label}"] = {"top1": top1, "l2": head.l2, "fit_images": int(fit.sum()),
                                         "scored_images": int((~fit).sum())}
            print(f"{kind:12s} {c.label:22s} top-1 {top1:.2f}  (l2 {head.l2:g})", flush=True)
        out[f"{kind} seconds"] = time.perf_counter() - t0
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

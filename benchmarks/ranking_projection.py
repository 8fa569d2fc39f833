"""Half-precision speed of the two ranking projections, side by side with the scoring-free floor.

    python benchmarks/ranking_projection.py [--batch-size 64] [--keep 0.5] [--reps 5] [--threads 1]
                                            [--dtype bfloat16] [--image-size 224]

DeiT-S with random weights under autocast. Each criterion runs twice, with
``model.renyiprune.ranking_projection`` "native" (the default: q, k, v in the autocast dtype) and
"float32" (projected and attended in float32 at the pruning blocks), in interleaved rounds with the
unpruned model and ``reference_vit.ReferenceViT`` keeping as many tokens without scoring (the floor).
Prints the median time, the speedup over the unpruned model and the efficiency (speedup / fewer GMACs).
"""

from __future__ import annotations

import argparse

import torch
from perf_tables import reference_models

import renyiprune as rp
from renyiprune.experiments.benchmark import time_interleaved
from renyiprune.experiments.evaluate import pruned_view
from renyiprune.planning.flops import count_gmacs
from renyiprune.planning.points import Point

CRITERIA = {"evit": {}, "renyi a=2": {"alpha": 2.0}, "shannon": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = rp.create_model("deit_small_patch16_224", img_size=args.image_size).eval()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    runners = {"unpruned": model}
    for name, options in CRITERIA.items():
        plan = rp.PrunePlan.uniform(args.keep, name.split()[0], **options)
        for projection in ("native", "float32"):
            view = pruned_view(model, plan)
            view.renyiprune.ranking_projection = projection
            runners[f"{name}, {projection}"] = view
    floors = reference_models(model, [Point(plan)], x[:1])  # token counts do not depend on the dtype
    runners["floor (no scoring)"] = floors[f"floor r={args.keep:g}"]
    fewer = count_gmacs(model) / count_gmacs(view)
    timings = time_interleaved(runners, x, warmup=1, reps=args.reps, dtype=dtype,
                               progress=lambda m: print(m, flush=True))  # fmt: skip
    base = timings["unpruned"].median
    print(f"\nDeiT-S {args.image_size} px, batch {args.batch_size}, {args.dtype} autocast, keep {args.keep}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} interleaved rounds "
          f"({fewer:.2f}x fewer GMACs)")  # fmt: skip
    print("| configuration | ms / batch | spread | speedup | efficiency |\n|---|---:|---:|---:|---:|")
    for name, t in timings.items():
        speedup = base / t.median
        efficiency = speedup / fewer if name != "unpruned" else 1.0
        cells = f"{1e3 * t.median:.0f} | {100 * t.spread:.0f} % | {speedup:.2f} | {efficiency:.2f}"
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()

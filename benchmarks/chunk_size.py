"""How long one pruning block's chunked attention takes for each chunk size: the measurement behind
``streamed.CACHE_BYTES``.

    python benchmarks/chunk_size.py [--cases 64x197,16x577] [--images 1,2,4,8,16,all] [--alphas 1,2]
                                    [--reps 7] [--threads 1]

DeiT-S shapes (6 heads, d = 64), float32, random q, k, v laid out as a qkv projection's views. Each
configuration runs ``streamed.attend`` (logits, softmax, row entropies, output rows) with the chunk
buffer forced to hold that many whole images (``Site(chunk_bytes=...)``); rounds are interleaved and the
table gives the median time and its ratio to the fastest chunk size of the same case and order.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from renyiprune.core.attention import Needs, Operands, Site, Statistics
from renyiprune.core.streamed import CACHE_BYTES, attend

HEADS, HEAD_DIM = 6, 64


def operands(batch: int, tokens: int, seed: int = 0) -> Operands:
    """q, k, v (B, H, N, d) as views of one (B, N, 3, H, d) projection, as a block makes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, HEADS, HEAD_DIM, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return Operands(q, k, v, HEAD_DIM**-0.5)


def measure(batch: int, tokens: int, images: list[int], alpha: float, reps: int) -> dict[int, float]:
    """Median seconds of ``attend`` per number of images per chunk."""
    ops, needs = operands(batch, tokens), Needs(row_entropy=(alpha,))
    # the plan divides the budget by every buffer a chunk takes (Shannon's temporary included)
    buffers = Statistics(needs, (batch, HEADS, tokens), ops.query).chunk_buffers()
    per_image = HEADS * tokens * tokens * 4 * buffers
    sites = {i: Site(chunk_bytes=math.ceil(i * per_image)) for i in images}
    times: dict[int, list[float]] = {i: [] for i in images}
    with torch.inference_mode():
        for r in range(reps + 1):  # round 0 warms up
            order = images[r % len(images) :] + images[: r % len(images)]
            for i in order:
                t0 = time.perf_counter()
                attend(ops, needs, sites[i])
                if r:
                    times[i].append(time.perf_counter() - t0)
    return {i: statistics.median(t) for i, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="64x197,16x577", help="batch x tokens, comma-separated")
    ap.add_argument("--images", default="1,2,4,8,16,all", help="whole images per chunk ('all': the batch)")
    ap.add_argument("--alphas", default="1,2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cap = CACHE_BYTES >> 20
    print(f"{args.threads} thread(s), median of {args.reps} interleaved rounds; CACHE_BYTES = {cap} MiB")
    print("| batch x tokens | alpha | images per chunk | buffer MiB | ms | vs fastest |")
    print("|---|---:|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        batch, tokens = (int(v) for v in case.split("x"))
        images = sorted({batch if v == "all" else min(int(v), batch) for v in args.images.split(",")})
        for alpha in (float(a) for a in args.alphas.split(",")):
            got = measure(batch, tokens, images, alpha, args.reps)
            best = min(got.values())
            for i, sec in got.items():
                mib = i * HEADS * tokens * tokens * 4 / 2**20
                row = f"| {case} | {alpha:g} | {i} | {mib:.1f} | {sec * 1e3:.1f} | {sec / best:.2f} |"
                print(row, flush=True)


if __name__ == "__main__":
    main()

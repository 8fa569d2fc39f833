"""The cost model's choice (whole batch or chunks) and the pruned forward's peak memory against the unpruned.

    python benchmarks/cost_model_grid.py [--sizes 224,384] [--batches 1,16,64] [--threads 1,2] [--keep 0.9]

DeiT-S, float32, random weights, pruning at blocks 3, 6, 9. For each cell: the chunk plan(s)
``streamed.chunk_plan`` returned (images x query rows per chunk; ``whole batch`` when one chunk holds the
batch), and the peak memory of one forward (``forward_memory``: live tensor storage) for the unpruned
model, EViT and Rényi alpha = 1 and 2, with the ratio to the unpruned, and the peak inside the first
pruning block (block 3) against the unpruned block 3. Where the cost model chunks, Rényi alpha = 1 is also
measured with the whole batch forced (``chunk_bytes`` without limit): what chunking avoids. Keep 0.9 is
the worst case: the first pruning block sees every token and the blocks after it the most.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from renyiprune.core import streamed
from renyiprune.experiments.benchmark import forward_memory
from renyiprune.experiments.evaluate import pruned_view
from renyiprune.models.model import create_model
from renyiprune.planning.specs import PruneConfig

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("evit", 1.0), ("renyi", 1.0), ("renyi", 2.0)]


def _recording_plans(plans: list):
    original = streamed.chunk_plan

    def chunk_plan(batch, heads, n, bytes_per_logit, budget):
        got = original(batch, heads, n, bytes_per_logit, budget)
        plans.append((batch, n, *got))
        return got

    return original, chunk_plan


def _choice(plans: list) -> str:
    """'whole batch' when every chunk held the batch, else the chunk shapes (images x rows of N)."""
    if not plans:
        return "-"
    if all(images == batch and rows == n for batch, n, images, rows in plans):
        return "whole batch"
    return "chunks " + ", ".join(sorted({f"{i}x{r}/{b}x{n}" for b, n, i, r in plans}))


def _measure(view, x: Tensor, label: str) -> dict:
    plans: list = []
    original, recording = _recording_plans(plans)
    streamed.chunk_plan = recording
    try:
        mem = forward_memory(view, x)
    finally:
        streamed.chunk_plan = original
    return dict(config=label, peak=mem.peak, block3=mem.block_peaks[3], choice=_choice(plans))


def cell(model, size: int, batch: int, keep: float) -> list[dict]:
    x = torch.randn(batch, 3, size, size)
    rows = []
    for c in [PruneConfig(None), *(PruneConfig(n, keep, a, (3, 6, 9)) for n, a in CONFIGS)]:
        rows.append(_measure(pruned_view(model, c), x, c.label))
        if c.criterion == "renyi" and c.alpha == 1.0 and rows[-1]["choice"] != "whole batch":
            view = pruned_view(model, c)
            view.renyiprune.chunk_bytes = 1 << 62
            rows.append(_measure(view, x, c.label + " whole batch forced"))
        last = rows[-1]
        print(f"{size} px batch {batch} {torch.get_num_threads()} thr {last['config']}: "
              f"{last['peak'] / 2**20:.1f} MB {last['choice']}", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda t: [int(v) for v in t.split(",")]  # noqa: E731
    ap.add_argument("--sizes", type=ints, default=[224, 384])
    ap.add_argument("--batches", type=ints, default=[1, 16, 64])
    ap.add_argument("--threads", type=ints, default=[1, 2])
    ap.add_argument("--keep", type=float, default=0.9)
    args = ap.parse_args()
    out = []
    for size in args.sizes:
        torch.manual_seed(0)
        model = create_model("deit_small_patch16_224", img_size=size).eval()
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                rows = cell(model, size, batch, args.keep)
                out.append(dict(size=size, batch=batch, threads=threads, keep=args.keep, rows=rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cost_model_grid.json").write_text(json.dumps(out, indent=1))
    print(render(out))


def render(out: list[dict]) -> str:
    lines = ["| px | batch | threads | config | chunk plan (images x rows / batch x tokens) | peak MB | "
             "vs unpruned | block 3 MB | vs unpruned |",
             "|---:|---:|---:|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for c in out:
        base, base3 = c["rows"][0]["peak"], c["rows"][0]["block3"]
        for r in c["rows"]:
            lines.append(f"| {c['size']} | {c['batch']} | {c['threads']} | {r['config']} | {r['choice']} | "
                         f"{r['peak'] / 2**20:.1f} | {r['peak'] / base:.4f} | {r['block3'] / 2**20:.1f} | "
                         f"{r['block3'] / base3:.4f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()

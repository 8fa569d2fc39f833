"""The cost model's choice (chunk plan) and what it costs: peak memory against the unpruned, and speed
against the plan memory alone would pick.

    python benchmarks/cost_model_grid.py [--sizes 224,384] [--batches 1,16,64] [--threads 1,2] [--keep 0.9]
                                         [--reps 5 (0: no timing)]

DeiT-S, float32, random weights, pruning at blocks 3, 6, 9. For each cell:
- the chunk plans ``streamed.chunk_plan`` returned for Rényi's pruning blocks (images x query rows per
  chunk / batch x tokens; ``whole batch`` when one chunk holds the batch);
- the peak memory of one forward (``forward_memory``: live tensor storage) for the unpruned model, EViT
  and Rényi alpha = 1 and 2, with the ratio to the unpruned, and the peak inside the first pruning block;
- where the cache cap (``streamed.CACHE_BYTES``) changes the plan: Rényi alpha = 1 and 2 timed against
  the plan of the memory budget alone (``CACHE_BYTES = None``), interleaved, ``--reps`` rounds; the
  median of per-round time ratios (memory-only / cost model: above 1 means the cap is faster).
Keep 0.9 is the worst case for memory: the first pruning block sees every token, the blocks after it
the most.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from renyiprune.core import streamed
from renyiprune.core.plans import UNPRUNED, PrunePlan
from renyiprune.experiments.benchmark import forward_memory, paired_ratio, time_interleaved
from renyiprune.experiments.evaluate import pruned_view
from renyiprune.models.model import create_model

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("evit", {}), ("renyi", {"alpha": 1.0}), ("renyi", {"alpha": 2.0})]


@contextlib.contextmanager
def _recording(plans: list, cache_bytes: int | None = streamed.CACHE_BYTES):
    """Record every chunk plan made inside, with ``streamed.CACHE_BYTES`` set to ``cache_bytes``."""
    original, cap = streamed.chunk_plan, streamed.CACHE_BYTES

    def chunk_plan(batch, heads, n, bytes_per_logit, budget, cache=None):
        got = original(batch, heads, n, bytes_per_logit, budget, cache)
        plans.append((batch, n, *got))
        return got

    streamed.chunk_plan, streamed.CACHE_BYTES = chunk_plan, cache_bytes
    try:
        yield
    finally:
        streamed.chunk_plan, streamed.CACHE_BYTES = original, cap


def _choice(plans: list) -> str:
    """'whole batch' when every chunk held the batch, else the chunk shapes (images x rows of N)."""
    if not plans:
        return "-"
    if all(images == batch and rows == n for batch, n, images, rows in plans):
        return "whole batch"
    return "chunks " + ", ".join(sorted({f"{i}x{r}/{b}x{n}" for b, n, i, r in plans}))


def _measure(view, x: Tensor, label: str, cache_bytes: int | None = streamed.CACHE_BYTES) -> dict:
    plans: list = []
    with _recording(plans, cache_bytes):
        mem = forward_memory(view, x)
    return dict(config=label, peak=mem.peak, block3=mem.block_peaks[3], choice=_choice(plans))


def _with_cap(view, cache_bytes: int | None):
    """``view``'s forward with ``streamed.CACHE_BYTES`` set to ``cache_bytes``, without grad."""

    def forward(x: Tensor) -> Tensor:
        with _recording([], cache_bytes), torch.inference_mode():
            return view(x)

    return forward


def cell(model, size: int, batch: int, keep: float, reps: int) -> list[dict]:
    x = torch.randn(batch, 3, size, size)
    rows, timed = [], {}
    plans = [UNPRUNED, *(PrunePlan.uniform(keep, n, (3, 6, 9), **opts) for n, opts in CONFIGS)]
    for plan in plans:
        view = pruned_view(model, plan)
        rows.append(_measure(view, x, plan.label))
        if plan.stages and plan.stages[0].criterion == "renyi":
            memory_only = _measure(view, x, plan.label + " memory budget only", cache_bytes=None)
            if memory_only["choice"] != rows[-1]["choice"]:
                rows.append(memory_only)
                timed[plan.label] = (_with_cap(view, streamed.CACHE_BYTES), _with_cap(view, None))
        last = rows[-1]
        print(f"{size} px batch {batch} {torch.get_num_threads()} thr {last['config']}: "
              f"{last['peak'] / 2**20:.1f} MB {last['choice']}", file=sys.stderr, flush=True)  # fmt: skip
    runners = {(label, "cap"): cap for label, (cap, _) in timed.items()}
    runners.update({(label, "memory"): memory for label, (_, memory) in timed.items()})
    if runners and reps > 0:  # --reps 0: plans and peak memory only
        t = time_interleaved(runners, x, warmup=1, reps=reps)
        for r in rows:
            if r["config"] in timed:
                cap, memory = t[(r["config"], "cap")], t[(r["config"], "memory")]
                r["memory_only_time_ratio"] = paired_ratio(memory, cap)
                r["seconds"] = sorted(cap.seconds)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda t: [int(v) for v in t.split(",")]  # noqa: E731
    ap.add_argument("--sizes", type=ints, default=[224, 384])
    ap.add_argument("--batches", type=ints, default=[1, 16, 64])
    ap.add_argument("--threads", type=ints, default=[1, 2])
    ap.add_argument("--keep", type=float, default=0.9)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    out = []
    for size in args.sizes:
        torch.manual_seed(0)
        model = create_model("deit_small_patch16_224", img_size=size).eval()
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                rows = cell(model, size, batch, args.keep, args.reps)
                out.append(dict(size=size, batch=batch, threads=threads, keep=args.keep, rows=rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cost_model_grid.json").write_text(json.dumps(out, indent=1))
    print(render(out))


def render(out: list[dict]) -> str:
    lines = ["| px | batch | threads | config | chunk plan (images x rows / batch x tokens) | peak MB | "
             "vs unpruned | block 3 MB | vs unpruned | memory-only time / this |",
             "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in out:
        base, base3 = c["rows"][0]["peak"], c["rows"][0]["block3"]
        for r in c["rows"]:
            lines.append(f"| {c['size']} | {c['batch']} | {c['threads']} | {r['config']} | {r['choice']} | "
                         f"{r['peak'] / 2**20:.1f} | {r['peak'] / base:.4f} | {r['block3'] / 2**20:.1f} | "
                         f"{r['block3'] / base3:.4f} | {_ratio(r)} |")  # fmt: skip
    return "\n".join(lines)


def _ratio(row: dict) -> str:
    ratio = row.get("memory_only_time_ratio")
    return "" if ratio is None else f"{ratio:.2f}"


if __name__ == "__main__":
    main()

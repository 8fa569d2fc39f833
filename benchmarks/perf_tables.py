"""Regenerate the speed and memory tables of docs/performance.md: run ``bench`` settings, keep their JSON.

    python benchmarks/perf_tables.py [--only NAME ...] [--reps 5] [--render-only] [--device cuda]

Each setting is one in-process run (unpruned, the SDPA reference ViT of ``reference_vit.py``, and every
criterion x keep rate, interleaved); its JSON goes to ``benchmarks/results/NAME.json`` (CPU) or
``benchmarks/results/gpu/NAME.json`` (``--device cuda``). The tables of all JSON files present are then
written into docs/performance.md between ``<!-- perf:start -->`` and ``<!-- perf:end -->`` (GPU:
``perf-gpu``), with the load average of the machine before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_vit import ReferenceViT  # noqa: E402

from renyiprune.cli.bench import format_rows  # noqa: E402
from renyiprune.experiments.benchmark import DTYPES, BenchRow, benchmark_configs, machine_info  # noqa: E402
from renyiprune.models.model import create_model  # noqa: E402
from renyiprune.planning.specs import PruneConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"
INF = float("inf")
CRITERIA = [("evit", 1.0), ("renyi", 1.0), ("renyi", 2.0), ("renyi", INF)]
KEEPS = (0.9, 0.7, 0.5)

# name: (model, image size, dtype, batch, keep rates)
SETTINGS = {
    "deit_small_224_fp32": ("deit_small_patch16_224", 224, "float32", 64, KEEPS),
    "deit_small_224_bf16": ("deit_small_patch16_224", 224, "bfloat16", 64, KEEPS),
    "deit_small_384_fp32": ("deit_small_patch16_224", 384, "float32", 64, KEEPS),
    "deit_small_384_bf16": ("deit_small_patch16_224", 384, "bfloat16", 64, KEEPS),
    "deit_tiny_224_fp32": ("deit_tiny_patch16_224", 224, "float32", 64, KEEPS),
    "deit_tiny_224_bf16": ("deit_tiny_patch16_224", 224, "bfloat16", 64, KEEPS),
}
# The settings the targets are stated for (DeiT-S, batch 64): run by default.
DEFAULT = ["deit_small_224_fp32", "deit_small_224_bf16", "deit_small_384_fp32", "deit_small_384_bf16"]


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_setting(name: str, reps: int, warmup: int, device: str = "cpu") -> dict:
    model_name, size, dtype, batch, keeps = SETTINGS[name]
    torch.manual_seed(0)
    model = create_model(model_name, img_size=size).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    configs = [PruneConfig(c, r, a, (3, 6, 9)) for r in keeps for c, a in CRITERIA]
    load_before = load_average()
    rows = benchmark_configs(
        model,
        configs,
        x,
        dtype=DTYPES[dtype],
        reps=reps,
        warmup=warmup,
        extra={"reference (SDPA)": ReferenceViT(model)},
        progress=lambda m: print(f"{name}: {m}", file=sys.stderr, flush=True),
    )
    return dict(
        name=name,
        model=model_name,
        image_size=size,
        dtype=dtype,
        batch_size=batch,
        reps=reps,
        load_average_before=load_before,
        load_average_after=load_average(),
        machine=machine_info(device),
        results=[r.to_dict() for r in rows],
    )


def rows_of(res: dict) -> list[BenchRow]:
    """BenchRows from saved JSON (older files lack the newer fields: they take the defaults)."""
    fields = BenchRow.__dataclass_fields__
    out = []
    for r in res["results"]:
        r = {k: v for k, v in r.items() if k in fields}
        for k in ("memory_ratio", "pruned_memory_ratio"):
            if r.get(k) is None and k in r:
                r[k] = float("nan")
        out.append(BenchRow(**r))
    return out


def render(results: list[dict]) -> str:
    out = []
    for res in results:
        m = res["machine"]
        cpu = f"{m['threads']} threads on {m['cpu_count']} cores ({m['cpu']}, {m['cpu_capability']})"
        where = m.get("gpu") or cpu
        load = ""
        if res.get("load_average_before"):
            load = (f"; load average (1, 5, 15 min) {res['load_average_before']} before, "
                    f"{res['load_average_after']} after")  # fmt: skip
        out.append(
            f"**{res['model']}**, {res['image_size']} px, batch {res['batch_size']}, {res['dtype']} — "
            f"median of {res['reps']} interleaved rounds, {where}, torch {m['torch']}, random weights{load}\n"
        )
        out.append("```\n" + format_rows(rows_of(res)) + "\n```\n")
    return "\n".join(out)


def update_doc(text: str, marker: str, doc: Path = DOC) -> None:
    src = doc.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    i, j = src.index(start) + len(start), src.index(end)
    doc.write_text(src[:i] + "\n" + text + "\n" + src[j:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(SETTINGS), default=None, help=f"default: {DEFAULT}")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (results go to benchmarks/results/gpu/)")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the doc from saved JSON")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/performance.md")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    folder = RESULTS / "gpu" if gpu else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    names = args.only or DEFAULT
    if not args.render_only:
        for name in names:
            res = run_setting(name, args.reps, args.warmup, args.device)
            (folder / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
            print(render([res]))
    files = [folder / f"{n}.json" for n in SETTINGS]
    saved = [json.loads(f.read_text()) for f in files if f.exists()]
    if not args.no_doc:
        update_doc(render(saved), "perf-gpu" if gpu else "perf")


if __name__ == "__main__":
    main()

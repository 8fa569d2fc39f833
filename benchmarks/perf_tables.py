"""Regenerate the speed and memory tables of docs/performance.md: run ``bench`` settings, keep their JSON.

    python benchmarks/perf_tables.py [--only NAME ...] [--reps 5] [--keeps 0.7,0.5] [--criteria evit,renyi:2]
                                     [--threads N] [--memory-only] [--render-only] [--device cuda]

Each setting is one in-process run (unpruned, the SDPA reference ViT of ``reference_vit.py`` and its
scoring-free floor per keep rate, and every criterion x keep rate, interleaved); its JSON goes to
``benchmarks/results/NAME.json`` (CPU) or ``benchmarks/results/gpu/NAME.json`` (``--device cuda``).
``--memory-only`` measures only the peak memory (one forward per configuration: deterministic, no
timing) into ``NAME_memory.json``. The tables of all JSON files present are then written into
docs/performance.md between ``<!-- perf:start -->`` and ``<!-- perf:end -->`` (memory: ``memory``; GPU:
``perf-gpu``, ``memory-gpu``), with the load average of the machine before and after each run.
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
from renyiprune.core.state import records  # noqa: E402
from renyiprune.experiments.benchmark import (  # noqa: E402
    DTYPES,
    BenchRow,
    BenchSettings,
    benchmark_configs,
    forward_memory,
    machine_info,
)
from renyiprune.experiments.evaluate import pruned_view  # noqa: E402
from renyiprune.models.model import create_model  # noqa: E402
from renyiprune.planning.points import Point  # noqa: E402

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
    # The speed target of issue 24 (run with --threads 2 --reps 10): efficiency >= 1.0 for each criterion,
    # Rényi / EViT throughput >= 0.97 ("vs evit"), one interleaved run.
    "deit_small_224_fp32_b16": ("deit_small_patch16_224", 224, "float32", 16, (0.5,)),
    # Latency: one image at a time (run with --threads 2 --reps 30).
    "deit_small_224_fp32_b1": ("deit_small_patch16_224", 224, "float32", 1, (0.5,)),
}
# Settings whose criteria are not CRITERIA (``--criteria`` still replaces them).
_TARGET_CRITERIA = [("evit", 1.0), ("shannon", 1.0), ("renyi", 2.0)]
SETTING_CRITERIA = {"deit_small_224_fp32_b16": _TARGET_CRITERIA, "deit_small_224_fp32_b1": _TARGET_CRITERIA}
# The settings the targets are stated for (DeiT-S, batch 64): run by default.
DEFAULT = ["deit_small_224_fp32", "deit_small_224_bf16", "deit_small_384_fp32", "deit_small_384_bf16"]


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def parse_criteria(text: str) -> list[tuple[str, float]]:
    """'evit,renyi:1,renyi:inf' -> [("evit", 1.0), ("renyi", 1.0), ("renyi", inf)]."""
    out = []
    for item in text.split(","):
        name, _, alpha = item.strip().partition(":")
        out.append((name, float(alpha) if alpha else 1.0))
    return out


def _configs(keeps, criteria) -> list[Point]:
    return [Point.from_spec(c, r, a, (3, 6, 9)) for r in keeps for c, a in criteria or CRITERIA]


def reference_models(model: torch.nn.Module, configs: list[Point], image: torch.Tensor) -> dict:
    """The A/A reference, and one floor per keep rate: ``ReferenceViT`` with the token counts of the first
    configuration at that rate (what the smaller matmuls alone give, with no scoring or selection)."""
    out = {"reference (SDPA)": ReferenceViT(model)}
    for c in configs:
        name = f"floor r={c.plan.stages[0].keep_rate:g}"
        if name not in out:
            view = pruned_view(model, c)
            with torch.inference_mode():
                view(image)
            tokens = {r.location: 1 + r.kept.shape[1] + r.num_fused for r in records(view)}
            out[name] = ReferenceViT(model, tokens)
    return out


def run_setting(
    name: str, reps: int, warmup: int, device: str = "cpu", keeps=None, reference: bool = True, criteria=None
) -> dict:
    model_name, size, dtype, batch, default_keeps = SETTINGS[name]
    torch.manual_seed(0)
    model = create_model(model_name, img_size=size).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    configs = _configs(keeps or default_keeps, criteria or SETTING_CRITERIA.get(name))
    load_before = load_average()
    rows = benchmark_configs(
        model,
        configs,
        x,
        BenchSettings(dtype=DTYPES[dtype], reps=reps, warmup=warmup),
        extra=reference_models(model, configs, x[:1]) if reference else None,
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


def memory_setting(name: str, device: str = "cpu", keeps=None, criteria=None) -> dict:
    """Peak memory only (one forward per configuration, whole forward and per block): no timing."""
    model_name, size, dtype, batch, default_keeps = SETTINGS[name]
    torch.manual_seed(0)
    model = create_model(model_name, img_size=size).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    rows = []
    load_before = load_average()
    for c in [Point.from_spec(None), *_configs(keeps or default_keeps, criteria)]:
        print(f"{name}: memory of {c.label}", file=sys.stderr, flush=True)
        mem = forward_memory(pruned_view(model, c), x, DTYPES[dtype])
        rows.append(dict(config=c.label, peak=mem.peak, block_peaks=mem.block_peaks))
    return dict(name=name, model=model_name, image_size=size, dtype=dtype, batch_size=batch,
                load_average_before=load_before, load_average_after=load_average(),
                machine=machine_info(device), results=rows)  # fmt: skip


def render_memory(results: list[dict]) -> str:
    """One table per setting: whole-forward peak and ratio, the pruned part's (blocks 3-11) peak and
    ratio, and the peak inside every block, in MB (2^20 bytes)."""
    out = []
    for res in results:
        rows = res["results"]
        base = rows[0]
        base_part = max(base["block_peaks"][3:])
        out.append(f"**{res['model']}**, {res['image_size']} px, batch {res['batch_size']}, {res['dtype']}: "
                   "peak memory (MB) of one forward, pruning at blocks 3, 6, 9\n")  # fmt: skip
        blocks = " | ".join(f"b{i}" for i in range(12))
        out += [f"| config | peak | ratio | blocks 3-11 | ratio | {blocks} |", "|---|" + "---:|" * 16]
        for r in rows:
            part = max(r["block_peaks"][3:])
            each = " | ".join(f"{b / 2**20:.0f}" for b in r["block_peaks"])
            out.append(f"| {r['config']} | {r['peak'] / 2**20:.0f} | {r['peak'] / base['peak']:.3f} | "
                       f"{part / 2**20:.0f} | {part / base_part:.3f} | {each} |")  # fmt: skip
        out.append("")
    return "\n".join(out)


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


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The timing options every benchmark script shares."""
    ap.add_argument("--reps", type=int, default=5, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (results go to benchmarks/results/gpu/)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the doc from saved JSON")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/performance.md")


def use_device(args: argparse.Namespace) -> bool:
    """Check ``--device`` and apply ``--threads``; True when the run is on a GPU."""
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    return gpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(SETTINGS), default=None, help=f"default: {DEFAULT}")
    add_run_args(ap)
    ap.add_argument("--keeps", type=lambda t: [float(v) for v in t.split(",")], default=None,
                    help="keep rates instead of the setting's 0.9,0.7,0.5")
    ap.add_argument("--criteria", type=parse_criteria, default=None,
                    help="instead of evit,renyi:1,renyi:2,renyi:inf (name[:alpha], comma list)")
    ap.add_argument("--no-reference", action="store_true",
                    help="leave out the SDPA reference ViT and its floors")
    ap.add_argument("--memory-only", action="store_true", help="peak memory only, no timing")
    args = ap.parse_args()
    gpu = use_device(args)
    folder = RESULTS / "gpu" if gpu else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "_memory" if args.memory_only else ""
    if not args.render_only:
        for name in args.only or DEFAULT:
            if args.memory_only:
                res = memory_setting(name, args.device, args.keeps, args.criteria)
                text = render_memory([res])
            else:
                ref = not args.no_reference
                res = run_setting(name, args.reps, args.warmup, args.device, args.keeps, ref, args.criteria)
                text = render([res])
            (folder / f"{name}{suffix}.json").write_text(json.dumps(res, indent=1, default=str))
            print(text)
    files = [folder / f"{n}{suffix}.json" for n in SETTINGS]
    saved = [json.loads(f.read_text()) for f in files if f.exists()]
    if not args.no_doc:
        marker = ("memory" if args.memory_only else "perf") + ("-gpu" if gpu else "")
        update_doc(render_memory(saved) if args.memory_only else render(saved), marker)


if __name__ == "__main__":
    main()

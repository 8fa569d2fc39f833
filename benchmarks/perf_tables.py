"""Regenerate the README "Performance" tables: run ``bench`` settings, keep their JSON, render markdown.

    python benchmarks/perf_tables.py [--only NAME ...] [--reps 5] [--render-only]

Each setting is one in-process run (unpruned, the SDPA reference ViT of ``reference_vit.py``, and every
criterion x keep rate, interleaved); its JSON goes to ``benchmarks/results/NAME.json``. The tables of all
JSON files present are then written between ``<!-- perf:start -->`` and ``<!-- perf:end -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_vit import ReferenceViT  # noqa: E402

from renyiprune.benchmark import DTYPES, benchmark_configs, machine_info  # noqa: E402
from renyiprune.cli.bench import format_rows  # noqa: E402
from renyiprune.evaluate import PruneConfig  # noqa: E402
from renyiprune.model import create_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INF = float("inf")
CRITERIA = [("evit", 1.0), ("renyi", 1.0), ("renyi", 2.0), ("renyi", INF)]

# name: (model, image size, dtype, batch, keep rates)
SETTINGS = {
    "deit_small_224_fp32": ("deit_small_patch16_224", 224, "float32", 64, (0.9, 0.7, 0.5)),
    "deit_small_224_bf16": ("deit_small_patch16_224", 224, "bfloat16", 64, (0.9, 0.7, 0.5)),
    "deit_tiny_224_fp32": ("deit_tiny_patch16_224", 224, "float32", 64, (0.9, 0.7, 0.5)),
    "deit_tiny_224_bf16": ("deit_tiny_patch16_224", 224, "bfloat16", 64, (0.9, 0.7, 0.5)),
    "deit_small_384_fp32": ("deit_small_patch16_224", 384, "float32", 16, (0.7, 0.5)),
}


def run_setting(name: str, reps: int, warmup: int) -> dict:
    model_name, size, dtype, batch, keeps = SETTINGS[name]
    torch.manual_seed(0)
    model = create_model(model_name, img_size=size)
    x = torch.randn(batch, 3, size, size)
    configs = [PruneConfig(c, r, a, (3, 6, 9)) for r in keeps for c, a in CRITERIA]
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
        machine=machine_info("cpu"),
        results=[r.to_dict() for r in rows],
    )


def render(results: list[dict]) -> str:
    from renyiprune.benchmark import BenchRow

    out = []
    for res in results:
        m = res["machine"]
        out.append(
            f"**{res['model']}**, {res['image_size']} px, batch {res['batch_size']}, {res['dtype']} — "
            f"median of {res['reps']} interleaved rounds, {m['threads']} threads on {m['cpu_count']} cores "
            f"({m['cpu']}, {m['cpu_capability']}), torch {m['torch']}, random weights\n"
        )
        rows = [
            BenchRow(**{k: float("nan") if v is None and k == "memory_ratio" else v for k, v in r.items()})
            for r in res["results"]
        ]
        out.append("```\n" + format_rows(rows) + "\n```\n")
    return "\n".join(out)


def update_readme(text: str) -> None:
    readme = ROOT / "README.md"
    src = readme.read_text()
    start, end = "<!-- perf:start -->", "<!-- perf:end -->"
    i, j = src.index(start) + len(start), src.index(end)
    readme.write_text(src[:i] + "\n" + text + "\n" + src[j:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(SETTINGS), default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--render-only", action="store_true", help="only rewrite the README from saved JSON")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        for name in args.only or list(SETTINGS):
            res = run_setting(name, args.reps, args.warmup)
            (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
            print(render([res]))
    files = [RESULTS / f"{n}.json" for n in SETTINGS]
    saved = [json.loads(f.read_text()) for f in files if f.exists()]
    if not args.no_readme:
        update_readme(render(saved))


if __name__ == "__main__":
    main()

"""Accuracy against measured speed: images/s of every method of docs/results.md §4 at each budget.

    python benchmarks/frontier.py [--reps 5] [--warmup 1] [--threads N] [--device cuda] [--render-only]

One interleaved run (``benchmark.benchmark_configs``) times the unpruned DeiT-Tiny and every method at
the compute budgets 0.9 / 0.75 / 0.65 / 0.5 on one batch (64 images, 224 px, float32, random weights:
the token counts, and so the speed, do not depend on the weights). The top-1 of each (method, budget) is
read from the shipped results (docs/results.md §4, evaluation half, 488 images), so accuracy and speed
refer to the same configurations. Writes ``benchmarks/results/frontier.json``, the plot
``docs/figures/frontier.png`` and the tables in docs/performance.md between ``<!-- frontier:start -->``
and ``<!-- frontier:end -->`` (``--device cuda``: ``gpu/`` results, ``frontier_gpu.png``,
``frontier-gpu`` markers).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_tables import add_run_args, load_average, update_doc, use_device  # noqa: E402

from renyiprune.experiments.benchmark import benchmark_configs, machine_info  # noqa: E402
from renyiprune.models.model import create_model  # noqa: E402
from renyiprune.planning.specs import PruneConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
SHIPPED = ROOT / "docs" / "results.md"
BUDGETS = (0.9, 0.75, 0.65, 0.5)
LOCS = (3, 6, 9)
TABLE_HEAD = "| method (evaluation half"


def _tome(**opts) -> Callable[[float], PruneConfig]:
    return lambda f: PruneConfig("tome", options=(("budget", f), *opts.items()))


def _prune(criterion: str, removed: str, alpha: float = 1.0) -> Callable[[float], PruneConfig]:
    return lambda f: PruneConfig(criterion, 1.0, alpha, LOCS, False, (("budget", f), ("removed", removed)))


# (label of the row in docs/results.md §4, family for the plot, configuration at a budget)
METHODS: list[tuple[str, str, Callable[[float], PruneConfig]]] = [
    ("**ToMe** (constant r)", "ToMe", _tome()),
    ("ToMe, decreasing schedule", "ToMe", _tome(schedule="decreasing")),
    ("ToMe + entropy, α=1, weight 0.02", "ToMe + entropy", _tome(entropy_weight=0.02, alpha=1.0)),
    ("ToMe + entropy, α=1, weight 0.05", "ToMe + entropy", _tome(entropy_weight=0.05, alpha=1.0)),
    ("ToMe + entropy, α=1, weight 0.1", "ToMe + entropy", _tome(entropy_weight=0.1, alpha=1.0)),
    ("ToMe + entropy, α=2, weight 0.05", "ToMe + entropy", _tome(entropy_weight=0.05, alpha=2.0)),
    ("ToMe + entropy, α=∞, weight 0.05", "ToMe + entropy", _tome(entropy_weight=0.05, alpha=math.inf)),
    ("ToMe + entropy, α=1, 0.05, decreasing", "ToMe + entropy",
     _tome(schedule="decreasing", entropy_weight=0.05, alpha=1.0)),
    ("EViT, merge", "pruning + merge", _prune("evit", "merge")),
    ("headvar, merge", "pruning + merge", _prune("headvar", "merge")),
    ("Rényi α=2, merge", "pruning + merge", _prune("renyi", "merge", 2.0)),
    ("Rényi α=2 @3, EViT @6, @9, merge", "pruning + merge", _prune("renyi:2@3+evit@6+evit@9", "merge")),
    ("EViT, fuse", "pruning + fuse", _prune("evit", "fuse")),
    ("diverse, merge", "pruning + merge", _prune("diverse", "merge")),
    ("pagerank, merge", "pruning + merge", _prune("pagerank", "merge")),
]  # fmt: skip
UNPRUNED = "unpruned (reference)"


def shipped_top1(path: Path = SHIPPED) -> dict[str, dict[float, tuple[float, float]]]:
    """{method label: {budget: (top-1 %, GMACs)}} from the evaluation-half table of docs/results.md §4."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(TABLE_HEAD)), None)
    if start is None:
        raise ValueError(f"no table starting with {TABLE_HEAD!r} in {path}")
    budgets = [float(b) for b in re.findall(r"budget ([0-9.]+)", lines[start])]
    table: dict[str, dict[float, tuple[float, float]]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        values = {}
        for b, cell in zip(budgets, cells[1:], strict=True):
            top1, gmacs = (float(v.replace("*", "")) for v in cell.split("/"))
            values[b] = (top1, gmacs)
        table[cells[0]] = values
    return table


def run(reps: int, warmup: int, device: str, batch: int) -> dict:
    shipped = shipped_top1()
    missing = [label for label, _, _ in METHODS if label not in shipped]
    if missing:
        raise ValueError(f"methods not in the shipped table: {missing}")
    torch.manual_seed(0)
    model = create_model("deit_tiny_patch16_224").to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    configs = {make(f).label: (label, family, f) for label, family, make in METHODS for f in BUDGETS}
    load_before = load_average()
    rows = benchmark_configs(
        model,
        [make(f) for _, _, make in METHODS for f in BUDGETS],
        x,
        reps=reps,
        warmup=warmup,
        memory=False,
        progress=lambda m: print(f"frontier: {m}", file=sys.stderr, flush=True),
    )
    points = []
    for r in rows:
        label, family, f = configs.get(r.config, (UNPRUNED, "unpruned", None))
        top1, shipped_gmacs = shipped[label][f if f is not None else BUDGETS[0]]
        points.append(dict(method=label, family=family, budget=f, top1=top1, shipped_gmacs=shipped_gmacs,
                           config=r.config, images_per_s=r.images_per_s, speedup=r.speedup, gmacs=r.gmacs,
                           spread=r.spread, latency_ms=r.latency_ms))  # fmt: skip
    return dict(
        model="deit_tiny_patch16_224",
        image_size=224,
        dtype="float32",
        batch_size=batch,
        reps=reps,
        load_average_before=load_before,
        load_average_after=load_average(),
        machine=machine_info(device),
        top1_source="docs/results.md §4, evaluation half (488 images of the 1000 shared ImageNet images)",
        points=points,
    )


def fastest_by_level(points: list[dict], step: float = 0.5) -> list[dict]:
    """For each top-1 level (every ``step`` points from the best down to the lowest ToMe point), the
    fastest (method, budget) reaching it and the fastest ToMe reaching it."""
    top = math.floor(max(p["top1"] for p in points) / step) * step
    low = math.floor(min(p["top1"] for p in points if p["family"].startswith("ToMe")) / step) * step
    levels, out = [], []
    level = top
    while level >= low - 1e-9:
        levels.append(round(level, 2))
        level -= step
    for level in levels:
        ok = [p for p in points if p["top1"] >= level]
        best = max(ok, key=lambda p: p["images_per_s"])
        tome = [p for p in ok if p["method"] == METHODS[0][0]]
        fastest_tome = max(tome, key=lambda p: p["images_per_s"]) if tome else None
        out.append(dict(level=level, best=best, tome=fastest_tome))
    return out


def _name(p: dict) -> str:
    return p["method"].replace("**", "") + ("" if p["budget"] is None else f" @ {p['budget']:g}")


def render(res: dict) -> str:
    m = res["machine"]
    cpu = f"{m['threads']} threads on {m['cpu_count']} cores ({m['cpu']}, {m['cpu_capability']})"
    where = m.get("gpu") or cpu
    load = ""
    if res.get("load_average_before"):
        load = f"; load average {res['load_average_before']} before, {res['load_average_after']} after"
    out = [
        f"DeiT-Tiny, 224 px, batch {res['batch_size']}, float32, median of {res['reps']} interleaved rounds, "
        f"{where}, torch {m['torch']}{load}. Top-1 from {res['top1_source']}.\n",
        "| top-1 at least | fastest method (budget) | images/s | its top-1 | fastest ToMe (budget) "
        "| images/s |",
        "|---:|---|---:|---:|---|---:|",
    ]
    for row in fastest_by_level(res["points"]):
        b, t = row["best"], row["tome"]
        tome = f"{_name(t)} | {t['images_per_s']:.1f}" if t else "— | —"
        speed = f"{b['images_per_s']:.1f}"
        out.append(f"| {row['level']:.1f} | {_name(b)} | {speed} | {b['top1']:.2f} | {tome} |")
    out += ["", "Every method (top-1 % / images/s):", "",
            "| method | " + " | ".join(f"budget {f:g}" for f in BUDGETS) + " |",
            "|---|" + "---:|" * len(BUDGETS)]  # fmt: skip
    by = {}
    for p in res["points"]:
        by.setdefault(p["method"], {})[p["budget"]] = p
    unpruned = by[UNPRUNED][None]
    out.append(f"| unpruned | {unpruned['top1']:.2f} / {unpruned['images_per_s']:.1f} (all budgets) |"
               + " |" * (len(BUDGETS) - 1))  # fmt: skip
    for label, _, _ in METHODS:
        cells = [f"{by[label][f]['top1']:.2f} / {by[label][f]['images_per_s']:.1f}" for f in BUDGETS]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"ToMe": ("tab:blue", "o"), "ToMe + entropy": ("tab:cyan", "s"),
              "pruning + merge": ("tab:orange", "^"), "pruning + fuse": ("tab:red", "v")}  # fmt: skip
    seen = set()
    for p in res["points"]:
        if p["family"] == "unpruned":
            ax.scatter(p["images_per_s"], p["top1"], marker="*", s=180, color="black", label="unpruned",
                       zorder=4)
            continue
        color, marker = styles[p["family"]]
        label = p["family"] if p["family"] not in seen else None
        seen.add(p["family"])
        ax.scatter(p["images_per_s"], p["top1"], color=color, marker=marker, alpha=0.75, label=label)
    # the frontier: points that no other point beats on both speed and top-1
    pts = sorted(res["points"], key=lambda p: -p["images_per_s"])
    front, best = [], -math.inf
    for p in pts:
        if p["top1"] > best:
            front.append(p)
            best = p["top1"]
    ax.plot([p["images_per_s"] for p in front], [p["top1"] for p in front], "k--", lw=1, label="frontier")
    for p in front:
        ax.annotate(_name(p), (p["images_per_s"], p["top1"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"images/s (batch {res['batch_size']}, {res['machine'].get('gpu') or 'CPU'})")
    ax.set_ylabel("top-1 % (evaluation half, 488 images)")
    ax.set_title("DeiT-Tiny: accuracy against measured speed, budgets 0.9 / 0.75 / 0.65 / 0.5")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    add_run_args(ap)
    args = ap.parse_args()
    gpu = use_device(args)
    out = (RESULTS / "gpu" if gpu else RESULTS) / "frontier.json"
    if args.render_only:
        res = json.loads(out.read_text())
    else:
        res = run(args.reps, args.warmup, args.device, args.batch_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=str))
    plot(res, FIGURES / ("frontier_gpu.png" if gpu else "frontier.png"))
    text = render(res)
    print(text)
    if not args.no_doc:
        update_doc(text, "frontier-gpu" if gpu else "frontier")


if __name__ == "__main__":
    main()

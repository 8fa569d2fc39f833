"""Accuracy against measured speed: images/s of every method of docs/results.md §4 at each budget.

    python benchmarks/frontier.py [--reps 5] [--warmup 1] [--threads N] [--device cuda] [--render-only]

One interleaved run (``benchmark.benchmark_configs``) times the unpruned DeiT-Tiny and every method at
the compute budgets 0.9 / 0.75 / 0.65 / 0.5 on one batch (64 images, 224 px, float32, random weights:
the token counts, and so the speed, do not depend on the weights). The top-1 of each (method, budget) is
read from the shipped results (docs/results.md §4) on both halves of the 1000 shared images: the
fastest method per top-1 level is chosen with the calibration half (512 images) and the recorded speeds
only, and reported on the evaluation half (488 images), against plain ToMe. Paired intervals need
per-image outcomes; ``tune-budget`` kept them only for its choice per budget against plain ToMe at that
budget (the shipped policy's ``evaluation_vs_tome``), so other differences are shown without one.
Writes ``benchmarks/results/frontier.json``, the plot ``docs/figures/frontier.png`` and the tables in
docs/performance.md between ``<!-- frontier:start -->`` and ``<!-- frontier:end -->`` (``--device
cuda``: ``gpu/`` results, ``frontier_gpu.png``, ``frontier-gpu`` markers).
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

from renyiprune.experiments.benchmark import BenchSettings, benchmark_configs, machine_info  # noqa: E402
from renyiprune.models.model import create_model  # noqa: E402
from renyiprune.planning.points import Point  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
SHIPPED = ROOT / "docs" / "results.md"
BUDGETS = (0.9, 0.75, 0.65, 0.5)
LOCS = (3, 6, 9)
TABLE_HEAD = "| method (evaluation half"
CAL_HEAD = "| method (calibration half"
POLICY = ROOT / "src" / "renyiprune" / "planning" / "policies" / "deit_tiny_patch16_224.json"


def _tome(**opts) -> Callable[[float], Point]:
    return lambda f: Point.from_spec("tome", options=opts, budget=f)


def _prune(criterion: str, removed: str, alpha: float = 1.0) -> Callable[[float], Point]:
    return lambda f: Point.from_spec(criterion, 1.0, alpha, LOCS, False, {"removed": removed}, budget=f)


# (label of the row in docs/results.md §4, family for the plot, configuration at a budget)
METHODS: list[tuple[str, str, Callable[[float], Point]]] = [
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
TOME = METHODS[0][0]  # plain ToMe, constant r: the reference


def _table(path: Path, head: str) -> dict[str, dict[float, list[float]]]:
    """{row label: {budget: [numbers of the cell]}} of the table of ``path`` whose header starts with
    ``head`` (cells like ``75.61 / 0.625`` or ``**75.98**``)."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(head)), None)
    if start is None:
        raise ValueError(f"no table starting with {head!r} in {path}")
    budgets = [float(b) for b in re.findall(r"budget ([0-9.]+)", lines[start])]
    table: dict[str, dict[float, list[float]]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        table[cells[0]] = {b: [float(v.replace("*", "")) for v in cell.split("/")]
                           for b, cell in zip(budgets, cells[1:], strict=True)}  # fmt: skip
    return table


def shipped_top1(path: Path = SHIPPED) -> dict[str, dict[float, tuple[float, float]]]:
    """{method label: {budget: (top-1 %, GMACs)}} from the evaluation-half table of docs/results.md §4."""
    return {m: {b: (v[0], v[1]) for b, v in row.items()} for m, row in _table(path, TABLE_HEAD).items()}


def calibration_top1(path: Path = SHIPPED) -> dict[str, dict[float, float]]:
    """{method label: {budget: top-1 %}} from the calibration-half table of docs/results.md §4."""
    return {m: {b: v[0] for b, v in row.items()} for m, row in _table(path, CAL_HEAD).items()}


def recorded_pairs(path: Path = POLICY) -> dict[tuple[str, float], dict]:
    """{(method label, budget): paired difference to plain ToMe at that budget, evaluation half} for the
    pairs whose per-image outcomes were compared when they were run: ``tune-budget``'s choice per budget
    (the shipped policy's ``evaluation_vs_tome``). No other frontier pair has recorded outcomes."""
    label_of = {make(f): label for label, _, make in METHODS for f in BUDGETS}
    pairs = {}
    for f, entry in json.loads(path.read_text()).get("budget", {}).items():
        best = entry["best"]
        label = label_of.get(Point.from_dict(best["config"]))
        if label is not None and "evaluation_vs_tome" in best:
            pairs[(label, float(f))] = best["evaluation_vs_tome"]
    return pairs


def with_halves(points: list[dict], calibration: dict[str, dict[float, float]]) -> list[dict]:
    """The recorded points (``top1``: evaluation half) with ``calibration_top1`` and ``evaluation_top1``;
    the unpruned reference has no calibration-half number in results §4 (None)."""
    return [dict(p, evaluation_top1=p["top1"],
                 calibration_top1=None if p["budget"] is None else calibration[p["method"]][p["budget"]])
            for p in points]  # fmt: skip


def run(reps: int, warmup: int, device: str, batch: int) -> dict:
    shipped, calibration = shipped_top1(), calibration_top1()
    missing = [label for label, _, _ in METHODS if label not in shipped or label not in calibration]
    if missing:
        raise ValueError(f"methods not in both shipped tables: {missing}")
    torch.manual_seed(0)
    model = create_model("deit_tiny_patch16_224").to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    configs = {make(f).label: (label, family, f) for label, family, make in METHODS for f in BUDGETS}
    load_before = load_average()
    rows = benchmark_configs(
        model,
        [make(f) for _, _, make in METHODS for f in BUDGETS],
        x,
        BenchSettings(reps=reps, warmup=warmup, memory=False),
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


def _versus(a: dict, ref: dict | None, pairs: dict) -> dict | None:
    """Evaluation-half top-1 of ``a`` minus ``ref``'s; ``ci95`` only where per-image outcomes of the pair
    were recorded (or ``a`` is ``ref``)."""
    if ref is None:
        return None
    if a is ref:
        return dict(delta=0.0, ci95=(0.0, 0.0))
    same_budget_tome = ref["method"] == TOME and ref["budget"] == a["budget"]
    pair = pairs.get((a["method"], a["budget"])) if same_budget_tome else None
    if pair is not None:
        return dict(delta=pair["delta"], ci95=tuple(pair["ci95"]))
    return dict(delta=a["evaluation_top1"] - ref["evaluation_top1"], ci95=None)


def frontier_rows(points: list[dict], pairs: dict | None = None, step: float = 0.5) -> list[dict]:
    """For each top-1 level (every ``step`` points of calibration-half top-1, from the best point down to
    the lowest ToMe-family point): the fastest (method, budget) whose calibration top-1 reaches it, the
    fastest plain ToMe that reaches it, and plain ToMe at the chosen budget, each with its difference on
    the evaluation half. Only ``calibration_top1`` and ``images_per_s`` decide; ``evaluation_top1`` is
    only reported. The unpruned reference (``budget`` None) is not a candidate."""
    pairs = pairs or {}
    pts = [p for p in points if p["budget"] is not None]
    top = math.floor(max(p["calibration_top1"] for p in pts) / step) * step
    low = math.floor(min(p["calibration_top1"] for p in pts if p["family"].startswith("ToMe")) / step) * step
    rows = []
    for i in range(round((top - low) / step) + 1):
        level = round(top - i * step, 2)
        ok = [p for p in pts if p["calibration_top1"] >= level]
        best = max(ok, key=lambda p: p["images_per_s"])
        tome = max((p for p in ok if p["method"] == TOME), key=lambda p: p["images_per_s"], default=None)
        equal = next(p for p in pts if p["method"] == TOME and p["budget"] == best["budget"])
        rows.append(dict(level=level, best=best, tome=tome, equal=equal, vs_tome=_versus(best, tome, pairs),
                         vs_equal=_versus(best, equal, pairs)))  # fmt: skip
    return rows


def _name(p: dict) -> str:
    return p["method"].replace("**", "") + ("" if p["budget"] is None else f" @ {p['budget']:g}")


def _delta(d: dict | None) -> str:
    if d is None:
        return "—"
    if d["ci95"] is None:
        return f"{d['delta']:+.2f} [—]"
    return f"{d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"


def render(res: dict, calibration: dict | None = None, pairs: dict | None = None) -> str:
    calibration = calibration_top1() if calibration is None else calibration
    pairs = recorded_pairs() if pairs is None else pairs
    points = with_halves(res["points"], calibration)
    m = res["machine"]
    cpu = f"{m['threads']} threads on {m['cpu_count']} cores ({m['cpu']}, {m['cpu_capability']})"
    where = m.get("gpu") or cpu
    load = ""
    if res.get("load_average_before"):
        load = f"; load average {res['load_average_before']} before, {res['load_average_after']} after"
    spreads = [p["spread"] for p in points]
    out = [
        f"DeiT-Tiny, 224 px, batch {res['batch_size']}, float32, median of {res['reps']} interleaved rounds "
        f"(spread over the rounds {min(spreads):.0%}-{max(spreads):.0%}), {where}, torch {m['torch']}{load}. "
        "Top-1 from docs/results.md §4: the level and the choice use the **calibration half** (512 images) "
        "and the speeds only; the **evaluation half** (488 other images) reports. Δ: evaluation-half top-1 "
        "of the chosen method minus the ToMe point's; the paired 95 % interval where `tune-budget` "
        "recorded the pair's per-image outcomes (its choice at that budget against plain ToMe), `[—]` "
        "where none were recorded.\n",
        "| cal. top-1 at least | fastest on calibration (budget) | images/s | cal. top-1 | **eval. top-1** "
        "| fastest plain ToMe on cal. (budget) | images/s | its eval. top-1 | Δ vs it (eval.) "
        "| eval. ToMe at equal budget | Δ vs it (eval.) [95 % CI] |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in frontier_rows(points, pairs):
        b, t = row["best"], row["tome"]
        tome = f"{_name(t)} | {t['images_per_s']:.1f} | {t['evaluation_top1']:.2f}" if t else "none | — | —"
        cells = [f"{row['level']:.1f}", _name(b), f"{b['images_per_s']:.1f}", f"{b['calibration_top1']:.2f}",
                 f"**{b['evaluation_top1']:.2f}**", tome, _delta(row["vs_tome"]),
                 f"{row['equal']['evaluation_top1']:.2f}", _delta(row["vs_equal"])]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Every method (calibration top-1 % / evaluation top-1 % / images/s; the evaluation column "
            "chose nothing):", "",
            "| method | " + " | ".join(f"budget {f:g}" for f in BUDGETS) + " |",
            "|---|" + "---:|" * len(BUDGETS)]  # fmt: skip
    by: dict[str, dict] = {}
    for p in points:
        by.setdefault(p["method"], {})[p["budget"]] = p
    unpruned = by[UNPRUNED][None]
    out.append(f"| unpruned | — / {unpruned['evaluation_top1']:.2f} / {unpruned['images_per_s']:.1f} "
               "(all budgets) |" + " |" * (len(BUDGETS) - 1))  # fmt: skip
    for label, _, _ in METHODS:
        cells = [f"{p['calibration_top1']:.2f} / {p['evaluation_top1']:.2f} / {p['images_per_s']:.1f}"
                 for p in (by[label][f] for f in BUDGETS)]  # fmt: skip
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path, calibration: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = with_halves(res["points"], calibration_top1() if calibration is None else calibration)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"ToMe": ("tab:blue", "o"), "ToMe + entropy": ("tab:cyan", "s"),
              "pruning + merge": ("tab:orange", "^"), "pruning + fuse": ("tab:red", "v")}  # fmt: skip
    seen = set()
    for p in points:
        if p["family"] == "unpruned":
            ax.scatter(p["images_per_s"], p["evaluation_top1"], marker="*", s=180, color="black",
                       label="unpruned", zorder=4)  # fmt: skip
            continue
        color, marker = styles[p["family"]]
        label = p["family"] if p["family"] not in seen else None
        seen.add(p["family"])
        ax.scatter(p["images_per_s"], p["evaluation_top1"], color=color, marker=marker, alpha=0.75,
                   label=label)
    # the frontier chosen on the calibration half (no point faster and better there), drawn at the
    # evaluation-half top-1 of its points: where it dips, the calibration half misjudged a point
    front, best = [], -math.inf
    for p in sorted((p for p in points if p["budget"] is not None), key=lambda p: -p["images_per_s"]):
        if p["calibration_top1"] > best:
            front.append(p)
            best = p["calibration_top1"]
    ax.plot([p["images_per_s"] for p in front], [p["evaluation_top1"] for p in front], "k--", lw=1,
            label="frontier chosen on the calibration half")  # fmt: skip
    chosen = {id(row["best"]): row["best"] for row in frontier_rows(points)}  # the table's choices
    for i, p in enumerate(chosen.values(), 1):
        ax.annotate(str(i), (p["images_per_s"], p["evaluation_top1"]), fontsize=8, xytext=(3, 3),
                    textcoords="offset points")
    key = "\n".join(f"{i}: {_name(p)}" for i, p in enumerate(chosen.values(), 1))
    ax.text(0.98, 0.98, "chosen on the calibration half:\n" + key, transform=ax.transAxes, fontsize=7,
            ha="right", va="top", bbox=dict(facecolor="white", alpha=0.8, edgecolor="grey"))
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

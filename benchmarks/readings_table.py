"""Rényi's readings side by side (docs/method.md): for each reading (row or column, CLS key in or out,
entropy per head or of the head-mean) x α x keep rate, top-1 on the calibration and the evaluation half
of the images (``experiments.tune.is_calibration``) and the paired difference to EViT on the evaluation
half; then each reading's mean calibration top-1, the number the default reading is chosen by.

Reads what the sweeps already wrote, computes nothing:

* ``--probe OUT/records.json`` (``cars_probe_sweep.py``/``flowers_probe_sweep.py --report``) with
  ``--dataset NAME --data-root DIR --split val`` (the images, for the calibration half);
* ``--sweep OUT/results.jsonl`` (``renyiprune sweep``) with ``--data DIR``.

    python benchmarks/readings_table.py --probe runs/flowers-probe/records.json --dataset flowers102 \\
        --data-root FLOWERS --json readings-flowers.json
    python benchmarks/readings_table.py --sweep runs/imagenet-readings/results.jsonl --data IMAGENET
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from renyiprune.data.datasets import load_split
from renyiprune.data.images import list_samples
from renyiprune.experiments.stats import paired_summary, select_outcomes, top1_of_outcomes
from renyiprune.experiments.tune import is_calibration

#: (direction, cls_key, heads) -> the name the docs use.
NAMES = {
    ("row", "include", "mean"): "row, CLS key in, per-head (default)",
    ("row", "exclude", "mean"): "row, CLS key out, per-head",
    ("row", "exclude", "pooled"): "row, CLS key out, head-mean",
    ("row", "include", "pooled"): "row, CLS key in, head-mean",
    ("column", "include", "mean"): "column, CLS key in, per-head",
    ("column", "exclude", "mean"): "column, CLS key out, per-head",
}


def reading_of(options: dict) -> tuple[str, str, str]:
    return (options.get("direction", "row"), options.get("cls_key", "include"), options.get("heads", "mean"))


def _alpha(a) -> float:
    return math.inf if a in ("inf", "Infinity") else float(a)


def rows_from_probe(path: Path) -> list[dict]:
    """(criterion, options, alpha, keep, fused, outcomes) of a probe sweep's records.json."""
    out = []
    for r in json.loads(path.read_text())["results"]:
        s = r["settings"]
        out.append({"criterion": s["criterion"], "options": s.get("options", {}), "alpha": _alpha(s["alpha"]),
                    "keep": r["keep_rate"], "fuse": bool(s["fuse"]), "correct": r["correct"]})  # fmt: skip
    return out


def rows_from_sweep(path: Path) -> list[dict]:
    """The same from a ``renyiprune sweep`` results.jsonl."""
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        c = r["config"]
        out.append({"criterion": c["criterion"], "options": c.get("options", {}), "alpha": _alpha(c["alpha"]),
                    "keep": None if c["criterion"] is None else c["keep_rate"], "fuse": bool(c["fuse"]),
                    "correct": r["correct"]})  # fmt: skip
    return out


def table(rows: list[dict], calib: list[bool]) -> tuple[list[str], dict]:
    """Markdown lines and the per-reading summary of the Rényi rows (fused) against EViT."""
    evalh = [not c for c in calib]
    evit = {r["keep"]: r for r in rows if r["criterion"] == "evit" and r["fuse"]}
    lines = [
        "| reading | α | keep | cal. top-1 | eval. top-1 | Δ vs EViT, eval. half [95 % CI] |",
        "|---|---|---:|---:|---:|---|",
    ]
    means: dict[str, list[float]] = {}
    entries = []
    for k in sorted(evit, reverse=True):
        e = evit[k]
        lines.append(f"| EViT | | {k:g} | {top1_of_outcomes(select_outcomes(e['correct'], calib)):.2f} | "
                     f"{top1_of_outcomes(select_outcomes(e['correct'], evalh)):.2f} | |")  # fmt: skip
        ours = [r for r in rows if r["criterion"] == "renyi" and r["fuse"] and r["keep"] == k]
        for r in sorted(ours, key=lambda r: (list(NAMES).index(reading_of(r["options"])), r["alpha"])):
            name = NAMES[reading_of(r["options"])]
            cal = top1_of_outcomes(select_outcomes(r["correct"], calib))
            ev = top1_of_outcomes(select_outcomes(r["correct"], evalh))
            d = paired_summary(select_outcomes(r["correct"], evalh), select_outcomes(e["correct"], evalh))
            a = "∞" if math.isinf(r["alpha"]) else f"{r['alpha']:g}"
            lines.append(f"| {name} | {a} | {k:g} | {cal:.2f} | {ev:.2f} | "
                         f"{d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] |")  # fmt: skip
            means.setdefault(name, []).append(cal)
            entries.append({"reading": name, "alpha": a, "keep": k, "calibration_top1": cal,
                            "evaluation_top1": ev, "evaluation_vs_evit": d})  # fmt: skip
    # the mean over the (α, keep) pairs every reading has, so that no reading is averaged over more points
    points = {n: {(e["alpha"], e["keep"]): e["calibration_top1"] for e in entries if e["reading"] == n}
              for n in means}  # fmt: skip
    common = set.intersection(*(set(p) for p in points.values()))
    summary = {n: sum(p[c] for c in common) / len(common) for n, p in points.items()}
    lines += ["", "| reading | mean cal. top-1 over the α and keep rates all readings have |", "|---|---:|"]
    lines += [f"| {n} | {m:.2f} |" for n, m in sorted(summary.items(), key=lambda t: -t[1])]
    return lines, {"rows": entries, "mean_calibration_top1": summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--probe", type=Path, help="a probe sweep's records.json")
    src.add_argument("--sweep", type=Path, help="a renyiprune sweep's results.jsonl")
    ap.add_argument("--data", type=Path, default=None, help="the sweep's --data folder")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--split", default="val")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and the summary here")
    args = ap.parse_args(argv)
    if args.dataset:
        samples = load_split(args.dataset, args.data_root, args.split).samples
    elif args.data:
        samples = list_samples(args.data)
    else:
        ap.error("give --data DIR or --dataset NAME --data-root DIR")
    rows = rows_from_probe(args.probe) if args.probe else rows_from_sweep(args.sweep)
    if any(len(r["correct"]) != len(samples) for r in rows):
        raise SystemExit("the records were computed on other images than the ones given")
    calib = [is_calibration(s.path) for s in samples]
    lines, summary = table(rows, calib)
    print(f"{len(samples)} images: {sum(calib)} calibration, {len(samples) - sum(calib)} evaluation\n")
    print("\n".join(lines))
    if args.json:
        summary["images"] = len(samples)
        summary["calibration_images"] = sum(calib)
        args.json.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

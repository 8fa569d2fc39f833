"""The paper's three claims as checks, each with a paired 95 % interval, from results already written:

* (a) Rényi at its per-keep-rate α (chosen on the calibration half) is within 0.5 top-1 of EViT, or
  above it, at keep 0.7 (reported on the evaluation half);
* (b) Shannon (α = 1) is the best order at keep 0.9: the α chosen on the calibration half is 1, and
  Shannon against the best other order on the evaluation half;
* (c) the best α grows as the keep rate falls: the α chosen on the calibration half at keep 0.9, 0.7,
  0.5 never decreases.

A source is a fine-tuning report (``cars_finetune.py``/``flowers_finetune.py --report``: report.json,
one run per criterion/α/keep) or a probe sweep's records.json (training-free), each named on the
command line as ``NAME=PATH``; the calibration half is the one stored with the records
(``experiments.tune.is_calibration`` of the file names). Rényi rows are those of ``--reading`` (the
criterion options, default none: the library's default reading).

    python benchmarks/paper_claims.py --finetune flowers=runs/flowers-ft/report.json \\
        --probe flowers=runs/flowers-probe/records.json --images flowers=flowers102:FLOWERS:val
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

TOLERANCE = 0.5  # claim (a): within 0.5 top-1 of EViT


def _alpha(a) -> float:
    return math.inf if a in ("inf", "Infinity") else float(a)


def _fmt(a: float) -> str:
    return "∞" if math.isinf(a) else f"{a:g}"


def load_rows(path: Path, kind: str, reading: dict) -> list[dict]:
    """criterion / α / keep / per-image outcomes of the fused runs: EViT and Rényi in ``reading``."""
    data = json.loads(path.read_text())
    rows = []
    for r in data["runs" if kind == "finetune" else "results"]:
        if kind == "finetune":
            crit, opts, keep, a = r["criterion"], r.get("options", {}), r["keep"], _alpha(r["alpha"])
        else:
            s = r["settings"]
            if not s["fuse"]:
                continue
            crit, opts, keep, a = s["criterion"], s.get("options", {}), r["keep_rate"], _alpha(s["alpha"])
        if crit == "evit" or (crit == "renyi" and opts == reading):
            rows.append({"criterion": crit, "alpha": 1.0 if crit == "evit" else a, "keep": keep,
                         "correct": r["correct"]})  # fmt: skip
    return rows


def _pair(a: str, b: str, mask: list[bool]) -> dict:
    return paired_summary(select_outcomes(a, mask), select_outcomes(b, mask))


def _ci(d: dict) -> str:
    return f"{d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"


def check(rows: list[dict], calib: list[bool]) -> dict:
    """The three claims on one source's rows."""
    evalh = [not c for c in calib]
    cal = {id(r): top1_of_outcomes(select_outcomes(r["correct"], calib)) for r in rows}
    renyi = {}
    for r in rows:
        if r["criterion"] == "renyi":
            renyi.setdefault(r["keep"], []).append(r)
    evit = {r["keep"]: r for r in rows if r["criterion"] == "evit"}
    # per keep rate the α with the best calibration top-1 (ties: the smaller α, the earlier listed)
    chosen = {k: max(sorted(rs, key=lambda r: r["alpha"]), key=lambda r: cal[id(r)])
              for k, rs in renyi.items()}  # fmt: skip
    out: dict = {"chosen_alpha": {f"{k:g}": _fmt(chosen[k]["alpha"]) for k in sorted(chosen, reverse=True)}}
    if 0.7 in chosen and 0.7 in evit:
        d = _pair(chosen[0.7]["correct"], evit[0.7]["correct"], evalh)
        a = _fmt(chosen[0.7]["alpha"])
        out["a"] = {"alpha": a, "vs_evit": d, "holds": d["delta"] >= -TOLERANCE,
                    "text": f"Rényi α = {a} − EViT at keep 0.7: {_ci(d)}"}  # fmt: skip
    if 0.9 in renyi and len(renyi[0.9]) > 1:
        shannon = next((r for r in renyi[0.9] if r["alpha"] == 1.0), None)
        others = [r for r in renyi[0.9] if r["alpha"] != 1.0]
        if shannon is not None:
            rival = max(others, key=lambda r: cal[id(r)])
            d = _pair(shannon["correct"], rival["correct"], evalh)
            a, b = _fmt(chosen[0.9]["alpha"]), _fmt(rival["alpha"])
            out["b"] = {"chosen": a, "rival": b, "vs_rival": d, "holds": chosen[0.9]["alpha"] == 1.0,
                        "text": f"chosen α at keep 0.9: {a}; Shannon − α = {b} (the best other order on "
                        f"calibration): {_ci(d)}"}  # fmt: skip
    keeps = sorted(chosen, reverse=True)
    if len(keeps) > 1:
        alphas = [chosen[k]["alpha"] for k in keeps]
        text = " → ".join(f"keep {k:g}: α = {_fmt(a)}" for k, a in zip(keeps, alphas, strict=True))
        out["c"] = {"keeps": keeps, "alphas": [_fmt(a) for a in alphas], "text": text,
                    "holds": all(b >= a for a, b in zip(alphas, alphas[1:], strict=False))}  # fmt: skip
    return out


def _images(spec: str) -> list:
    """'flowers102:ROOT:val' (a named data set's split) or a folder with labels.tsv."""
    parts = spec.split(":")
    if len(parts) == 3:
        return load_split(parts[0], parts[1], parts[2]).samples
    return list_samples(spec)


def _pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        name, eq, value = it.partition("=")
        if not eq:
            raise SystemExit(f"{it!r}: expected NAME=VALUE")
        out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetune", nargs="*", default=[], help="NAME=report.json of a fine-tuning grid")
    ap.add_argument("--probe", nargs="*", default=[], help="NAME=records.json of a probe sweep")
    ap.add_argument("--images", nargs="+", required=True,
                    help="NAME=DATASET:ROOT:SPLIT or NAME=FOLDER: the images the records were scored on")
    ap.add_argument("--reading", default="", help="Rényi's options, e.g. cls_key=exclude (default: none)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from renyiprune.planning.specs import parse_options

    reading = parse_options(args.reading)
    images = {n: _images(v) for n, v in _pairs(args.images).items()}
    results = {}
    lines = ["| source | claim | holds | measured (evaluation half, paired 95 % CI) |", "|---|---|---|---|"]
    for kind, given in (("finetune", args.finetune), ("probe", args.probe)):
        for name, path in _pairs(given).items():
            rows = load_rows(Path(path), kind, reading)
            calib = [is_calibration(s.path) for s in images[name]]
            if any(len(r["correct"]) != len(calib) for r in rows):
                raise SystemExit(f"{name}: the records were scored on other images than --images {name}")
            res = check(rows, calib)
            results[f"{name} {kind}"] = res
            for claim in ("a", "b", "c"):
                if claim in res:
                    c = res[claim]
                    lines.append(f"| {name}, {'fine-tuned' if kind == 'finetune' else 'probe'} | ({claim}) | "
                                 f"{'yes' if c['holds'] else 'no'} | {c['text']} |")  # fmt: skip
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

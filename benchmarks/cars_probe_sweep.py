"""The Stanford Cars probe sweep: every registered criterion (those with an order at each α) x keep rate,
with fusion, and Rényi / EViT without; α and criterion chosen per keep rate on a calibration half of val.

Two steps, both resumable through the feature cache:

* features (default): decode train + val once, run the blocks before the first pruning location once per
  image, then every configuration in priority order (fused keep 0.5/0.7 first), each stored in --cache as
  soon as it is done; an interrupted run loses at most the configuration in flight.
* --report: from the cached features only (nothing is decoded), fit the heads, score val, split val into
  a calibration and an evaluation half by a hash of the file name (``policy.is_calibration``), choose per
  keep rate on the calibration half, report on the evaluation half with paired intervals vs EViT, and
  write OUT/records.json, OUT/tables.md, OUT/timing.json and the policy file (--policy-out).

    python benchmarks/cars_probe_sweep.py --train CARS/train --val CARS/val --cache C --out O
    python benchmarks/cars_probe_sweep.py --train CARS/train --val CARS/val --cache C --out O --report \
        --policy-out src/renyiprune/planning/policies/deit_tiny_patch16_224-stanford-cars.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from pathlib import Path

from renyiprune.core.criteria import list_criteria, takes_alpha
from renyiprune.data.datasets import eval_transform, load_split
from renyiprune.data.images import list_samples
from renyiprune.experiments.probe import (
    HEADS,
    FeatureCache,
    ImageSet,
    ProbeConfig,
    extract_features,
    run_probe,
    with_references,
)
from renyiprune.experiments.stats import paired_summary, select_outcomes, top1_of_outcomes
from renyiprune.experiments.tune import choose, is_calibration, policy_document
from renyiprune.models.model import create_model
from renyiprune.models.weights import sha256_file
from renyiprune.planning.points import Point

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"
ALPHAS = (0.5, 1.0, 2.0, 3.0, float("inf"))
LOCS = (3, 6, 9)
SCRIPT_PREFIX = {"stanford-cars": "cars", "flowers102": "flowers"}
ENTROPY = ("renyi", "shannon", "evit_renyi", "hybrid")  # the entropy-based criteria


#: The readings of the Rényi criterion (docs/method.md): (direction, CLS key, heads); the first is the
#: library's default. Each is crossed with α and the keep rates by ``reading_configs``.
READINGS = (
    ("row", "include", "mean"), ("row", "exclude", "mean"), ("row", "exclude", "pooled"),
    ("row", "include", "pooled"), ("column", "include", "mean"), ("column", "exclude", "mean"),
)  # fmt: skip


def reading_options(direction: str, cls_key: str, heads: str) -> tuple[tuple[str, object], ...]:
    """The criterion options of one reading, defaults left out (so the default reading is plain renyi)."""
    given = {"cls_key": cls_key, "direction": direction, "heads": heads}
    default = {"cls_key": "include", "direction": "row", "heads": "mean"}
    return tuple((k, v) for k, v in sorted(given.items()) if v != default[k])


def reading_configs(keeps=(0.7, 0.5), alphas=(1.0, 2.0, float("inf"))) -> list[Point]:
    """Rényi in every reading x α x keep rate, fused (the readings comparison of docs/method.md)."""
    return [Point.from_spec("renyi", r, a, LOCS, True, reading_options(*rd))
            for r in keeps for rd in READINGS for a in alphas]  # fmt: skip


def configs(unfused: bool = True) -> list[Point]:
    """Every configuration of the sweep, most wanted first (the targets are fused keep 0.5 and 0.7);
    ``unfused=False``: the fused ones only (the issue's sweep: all criteria x 5 α x 3 keep rates)."""

    def grid(criteria, keeps, fuse):
        out = []
        for r in keeps:
            for c in criteria:
                for a in ALPHAS if takes_alpha(c) else (1.0,):
                    out.append(Point.from_spec(c, r, a, LOCS, fuse))
        return out

    first = ["evit", "renyi"]
    # the criteria that spread the kept set led the earlier shared-head sweep: candidates for "best"
    spread = [c for c in ("column_norm", "pagerank", "diverse", "headvar") if c in list_criteria()]
    single = [c for c in list_criteria() if c not in first + spread and not takes_alpha(c)]
    ordered = [c for c in list_criteria() if c not in first and takes_alpha(c)]
    order = [Point.from_spec(None)]
    order += grid(first, (0.7, 0.5), True)  # the method's setting and its baseline first (the targets)
    order += grid(spread, (0.7, 0.5), True) + grid(first, (0.9,), True)
    order += grid(single, (0.7, 0.5), True) + grid(ordered, (0.7, 0.5), True)
    order += grid(spread + single + ordered, (0.9,), True)
    if unfused:
        order += grid(first, (0.7, 0.5, 0.9), False)
    return list(dict.fromkeys(order))


class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds in a background thread."""

    def __init__(self, every: float = 20.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        s = self.samples
        return {"mean": sum(s) / len(s), "min": min(s), "max": max(s), "samples": len(s)}


def _alpha(a) -> str:
    return "∞" if a == "inf" or (isinstance(a, float) and math.isinf(a)) else f"{float(a):g}"


def pivot(records: list[dict], keeps: list[float]) -> list[str]:
    """Rows criterion (α), columns keep rate x fusion: 'top-1 (Δ vs EViT)' on all of val; '·' not run."""
    cols = [(r, f) for f in (True, False) for r in keeps
            if any(x["keep_rate"] == r and x["fuse"] == f for x in records)]  # fmt: skip
    cell = {}
    for x in records:
        if x["keep_rate"] is not None:
            name = x["criterion"] + (f" α={_alpha(x['alpha'])}" if takes_alpha(x["criterion"]) else "")
            d = x["vs_evit"]
            delta = f" ({d['delta']:+.2f})" if d else ""
            cell[(name, x["keep_rate"], x["fuse"])] = f"{x['top1']:.2f}{delta}"
    names = sorted({k[0] for k in cell}, key=lambda n: (n.split()[0] != "evit", n))
    head = "| criterion | " + " | ".join(f"keep {r:g} {'fused' if f else 'dropped'}" for r, f in cols) + " |"
    out = [head, "|---|" + "---:|" * len(cols)]
    for n in names:
        out.append(f"| {n} | " + " | ".join(cell.get((n, r, f), "·") for r, f in cols) + " |")
    return out


def report(args, records: list[dict], val: ImageSet, timing: dict) -> None:
    calib = [is_calibration(s.path) for s in val.samples]
    evalh = [not c for c in calib]
    for r in records:
        r["calibration_top1"] = top1_of_outcomes(select_outcomes(r["correct"], calib))
        r["evaluation_top1"] = top1_of_outcomes(select_outcomes(r["correct"], evalh))
    by_label = {r["config"]: r for r in records}
    base = by_label["unpruned"]
    keeps = sorted({r["keep_rate"] for r in records if r["keep_rate"] is not None})
    policy_keep, lines = {}, []
    lines.append(
        f"Validation: {len(val.samples)} images ({sum(calib)} calibration, {sum(evalh)} evaluation); "
        f"head: {records[0]['head']}; unpruned top-1 {base['top1']:.2f} (val), "
        f"{base['calibration_top1']:.2f} / {base['evaluation_top1']:.2f} (calibration / evaluation)\n"
    )
    lines.append(
        "| keep | fusion | criterion | α | top-1 val | top-5 val | GMACs | Δ vs EViT [95 % CI] | "
        "Δ vs unpruned | cal. top-1 | eval. top-1 |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(
        records,
        key=lambda r: (r["keep_rate"] or 2, not r["fuse"], r["criterion"], float(r["settings"]["alpha"])),
    ):
        d, u = r["vs_evit"], r["vs_unpruned"]
        ci = f"{d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d else "-"
        keep = "1" if r["keep_rate"] is None else f"{r['keep_rate']:g}"
        fuse = "-" if r["keep_rate"] is None else ("on" if r["fuse"] else "off")
        alpha = _alpha(r["alpha"]) if takes_alpha(r["criterion"]) else ""
        du = f"{u['delta']:+.2f}" if u else "-"
        lines.append(
            f"| {keep} | {fuse} | {r['criterion']} | {alpha} | {r['top1']:.2f} | {r['top5']:.2f} | "
            f"{r['gmacs']:.3f} | {ci} | {du} | {r['calibration_top1']:.2f} | {r['evaluation_top1']:.2f} |"
        )
    choice_lines = [
        "\n| keep | choice | chosen | cal. top-1 | cal. EViT | eval. top-1 | eval. EViT | "
        "Δ vs EViT on eval. half [95 % CI] | McNemar p | GMACs / EViT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in keeps:
        fused = [x for x in records if x["keep_rate"] == r and x["fuse"] and x["criterion"] != "tome"]
        if not fused:
            continue
        evit = next(x for x in fused if x["criterion"] == "evit")
        cand = [
            {
                "config": x["settings"],
                "label": x["config"],
                "top1": x["calibration_top1"],
                "gmacs": x["gmacs"],
            }
            for x in fused
        ]
        entry = choose(cand)
        ent = [c for c in cand if c["config"]["criterion"] in ENTROPY]
        if ent:
            entry["entropy"] = choose(ent)["best"]
        entry["reference"] = {
            "evit": {
                "calibration_top1": evit["calibration_top1"],
                "evaluation_top1": evit["evaluation_top1"],
                "gmacs": evit["gmacs"],
            },
            "unpruned": {
                "calibration_top1": base["calibration_top1"],
                "evaluation_top1": base["evaluation_top1"],
                "gmacs": base["gmacs"],
            },
        }
        rows = [
            ("best", entry["best"]),
            ("entropy", entry.get("entropy")),
            ("renyi", entry["by_criterion"].get("renyi")),
        ]
        for name, setting in rows:
            if setting is None:
                continue
            rec = by_label[setting["label"]]
            pair = paired_summary(
                select_outcomes(rec["correct"], evalh), select_outcomes(evit["correct"], evalh)
            )
            setting["evaluation_top1"] = rec["evaluation_top1"]
            setting["evaluation_vs_evit"] = pair
            lo, hi = pair["ci95"]
            choice_lines.append(
                f"| {r:g} | {name} | {setting['label']} | {rec['calibration_top1']:.2f} | "
                f"{evit['calibration_top1']:.2f} | {rec['evaluation_top1']:.2f} | "
                f"{evit['evaluation_top1']:.2f} | {pair['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
                f"{pair['p_mcnemar']:.2f} | {rec['gmacs'] / evit['gmacs']:.3f} |"
            )
        policy_keep[f"{r:g}"] = entry
    text = "\n".join(lines + choice_lines + [""] + pivot(records, keeps)) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tables.md").write_text(text)
    (args.out / "records.json").write_text(
        json.dumps({"results": records, "timing": timing}, indent=1) + "\n"
    )
    print(text)
    if args.policy_out:
        policy = policy_document(
            "deit_tiny_patch16_224",
            policy_keep,
            locations=LOCS,
            fuse=True,
            images=(sum(calib), sum(evalh)),
            candidates=[x["criterion"] for x in records if x["criterion"] != "none"],
            alphas=ALPHAS,
            dataset=args.dataset_name,
            protocol=f"linear probe ({records[0]['head']} head) on val, transform {args.transform}, "
            f"benchmarks/{SCRIPT_PREFIX.get(args.dataset_name, args.dataset_name)}_probe_sweep.py",
        )
        args.policy_out.write_text(json.dumps(policy, indent=2, allow_nan=False) + "\n")


def image_sets(args) -> tuple[ImageSet, ImageSet]:
    """The training and validation images: two folders, or two splits of ``--dataset``."""
    if args.dataset:
        if args.data_root is None:
            raise SystemExit(f"--dataset {args.dataset} needs --data-root")
        tr, va = (load_split(args.dataset, args.data_root, s) for s in (args.train_split, args.val_split))
        return (ImageSet("train", tuple(tr.samples), tr.crop_bottom),
                ImageSet("val", tuple(va.samples), va.crop_bottom))
    if args.train is None or args.val is None:
        raise SystemExit("give --train and --val folders, or --dataset NAME --data-root DIR")
    return ImageSet("train", tuple(list_samples(args.train))), ImageSet("val", tuple(list_samples(args.val)))


def main(argv: list[str] | None = None, dataset: str = "stanford-cars", transform: str = "resize") -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, default=None, help="training folder (or --dataset's split)")
    ap.add_argument("--val", type=Path, default=None, help="validation folder (or --dataset's split)")
    ap.add_argument("--dataset", default=None, help="a named data set under --data-root (flowers102, ...)")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--readings", choices=["off", "first", "only", "after"], default="off",
                    help="Rényi's readings (READINGS x α 1, 2, ∞ x keep 0.7, 0.5): first, only, or after "
                    "the sweep")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--transform", default=transform)
    ap.add_argument("--head", choices=HEADS, default="unpruned")
    ap.add_argument("--report", action="store_true", help="tables and policy from the cached features only")
    ap.add_argument("--policy-out", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--code-hash", default=None, help="the code hash the features were written with")
    ap.add_argument("--fused-only", action="store_true", help="leave out the unfused EViT/Rényi rows")
    ap.add_argument("--val-only", action="store_true", help="features step: val images only this time")
    args = ap.parse_args(argv)
    args.dataset_name = args.dataset or dataset
    model = create_model("deit_tiny_patch16_224", weights=args.weights)
    tf = eval_transform(args.transform, model.pretrained_cfg)
    context = {"model": "deit_tiny_patch16_224", "weights": sha256_file(args.weights), "transform": repr(tf)}
    if args.code_hash:  # read features that an earlier version of the pruning code wrote
        context["code"] = args.code_hash
    cache = FeatureCache(args.cache, context)
    train, val = image_sets(args)
    sweep = configs(unfused=not args.fused_only)
    readings = reading_configs()
    wanted = {"off": sweep, "first": [*sweep[:5], *readings, *sweep[5:]], "only": [*sweep[:5], *readings],
              "after": [*sweep, *readings]}[args.readings]  # fmt: skip
    wanted = with_references(wanted)[0]  # every configuration's references (unpruned, EViT twin) too
    sets = [train, val]
    unpruned = Point.from_spec(None)

    def needed(c):
        return [0, 1] if args.head == "per-config" or c == unpruned else [1]

    if not args.report:
        load = LoadSampler()
        t0 = time.perf_counter()
        _, timing = extract_features(
            model,
            wanted,
            sets,
            tf,
            ProbeConfig(cache=cache, batch_size=args.batch_size, workers=1),
            needed={i: [1] if args.val_only else needed(c) for i, c in enumerate(wanted)},
        )
        timing["wall_s"] = time.perf_counter() - t0
        timing["load"] = load.stop()
        timing["configs"] = len(wanted)
        timing["code_hash"] = cache.context["code"]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"features-timing-{int(time.time())}.json").write_text(
            json.dumps(timing, indent=1) + "\n"
        )
        print(json.dumps(timing))
        return

    def cached(c):
        return all(cache.load(c, sets[i]) is not None for i in needed(c))

    # a configuration is reported when its features and its references' (unpruned, EViT twin) are cached
    done = [c for c in wanted if all(cached(t) for t in with_references([c])[0])]
    missing = [c.label for c in wanted if c not in done]
    t0 = time.perf_counter()
    records, timing = run_probe(
        model, done, train, [val], tf, ProbeConfig(cache=cache, batch_size=args.batch_size, head=args.head)
    )
    timing["report_s"] = time.perf_counter() - t0
    timing["missing"] = missing
    timing["code_hash"] = cache.context["code"]
    if timing["computed"]:
        raise RuntimeError("the report step computed features; it should read them all from the cache")
    report(args, records, val, timing)
    print(f"{len(done)} of {len(wanted)} configurations reported; missing: {len(missing)}")


if __name__ == "__main__":
    main()

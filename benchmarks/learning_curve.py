"""A fine-tuning run's learning curve from its OUT/metrics.jsonl: val top-1 and training loss after each
epoch, with the seconds each epoch took, as a Markdown table (stdout) and a plot (``--png``).

    python benchmarks/learning_curve.py runs/flowers-ft/unpruned --png docs/figures/flowers_unpruned_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from renyiprune.training.train import METRICS


def curve(run: Path) -> list[dict]:
    """Per epoch: train loss, val top-1 of each evaluated configuration, training seconds and steps. A
    resumed epoch's records are summed: its seconds and steps are those of both pieces."""
    epochs: dict[int, dict] = {}
    for line in (run / METRICS).read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "step":
            e = epochs.setdefault(r["epoch"] + 1, {"epoch": r["epoch"] + 1, "seconds": 0.0, "steps": 0})
            e["seconds"] += r["seconds"]
            e["steps"] += 1
        elif r["kind"] == "eval" and r["epoch"] in epochs:
            e = epochs[r["epoch"]]
            e["train_loss"] = r["train_loss"]
            e["eval_seconds"] = r["eval_seconds"]
            e["top1"] = {x["config"]: x["top1"] for x in r["results"]}
    return [epochs[k] for k in sorted(epochs)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a train --out folder")
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = curve(args.run)
    configs = list(rows[-1].get("top1", {}))
    print("| epoch | steps | train s | " + " | ".join(f"val top-1 {c}" for c in configs) + " | train loss |")
    print("|---:|---:|---:|" + "---:|" * (len(configs) + 1))
    for r in rows:
        tops = " | ".join(f"{r.get('top1', {}).get(c, float('nan')):.2f}" for c in configs)
        loss = r.get("train_loss", float("nan"))
        print(f"| {r['epoch']} | {r['steps']} | {r['seconds']:.0f} | {tops} | {loss:.4f} |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from renyiprune.viz.plots import save_figure

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for c in configs:
            pts = [(r["epoch"], r["top1"][c]) for r in rows if c in r.get("top1", {})]
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"val top-1, {c}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 %")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        pts = [(r["epoch"], r["train_loss"]) for r in rows if "train_loss" in r]
        ax2.plot(*zip(*pts, strict=True), color="gray", linestyle="--", label="train loss")
        ax2.set_ylabel("train loss")
        ax.legend(loc="lower right")
        ax.set_title(f"Learning curve: {args.run.name}")
        fig.tight_layout()
        save_figure(fig, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sweep results as CSV and as Markdown tables (rows = criterion [α], columns = keep rate)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from ..core.criteria import takes_alpha

__all__ = ["row_name", "column_of", "group_name", "to_csv", "markdown_tables", "best_per_keep"]

CSV_FIELDS = [
    "label", "criterion", "alpha", "keep_rate", "fuse", "locations", "options", "budget",
    "top1", "top5", "nll", "gmacs", "images", "seconds",
]  # fmt: skip


def _alpha_text(a) -> str:
    a = float(a)
    return "∞" if math.isinf(a) else f"{a:g}"


def row_name(config: dict) -> str:
    """The criterion part of a config: ``renyi α=2``, ``hybrid α=2 lam=0.5``, ``evit``, ``unpruned``."""
    crit = config.get("criterion")
    if crit is None:
        return "unpruned"
    text = crit
    opts = config.get("options", {})
    if takes_alpha(crit, opts):
        text += f" α={_alpha_text(config['alpha'])}"
    text += "".join(f" {k}={v}" for k, v in sorted(opts.items()) if k != "budget")
    if "budget" in opts and crit != "tome" and "removed" not in opts:
        text += " +fuse" if config.get("fuse") else " drop"
    return text + (" (budget)" if config.get("budget") else "")


def column_of(config: dict) -> float:
    """The table column of a config: its compute budget F if it has one, else its keep rate."""
    opts = config.get("options", {})
    return float(opts["budget"]) if "budget" in opts else float(config["keep_rate"])


def group_name(config: dict) -> str:
    """What a table holds: fusion and pruning locations, or all methods at compute budgets."""
    if "budget" in config.get("options", {}):
        return "all methods at compute budgets F (GMACs <= F x unpruned)"
    locs = ",".join(str(i) for i in config.get("locations", []))
    return f"{'with' if config.get('fuse') else 'without'} fusion, locations {locs}"


def to_csv(records: Sequence[dict]) -> str:
    """One row per record, flat columns."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in records:
        c = r["config"]
        w.writerow(
            {
                "label": r["label"],
                "criterion": c["criterion"] or "none",
                "alpha": c["alpha"],
                "keep_rate": c["keep_rate"] if c["criterion"] else 1.0,
                "fuse": c["fuse"],
                "locations": " ".join(str(i) for i in c["locations"]),
                "options": " ".join(f"{k}={v}" for k, v in sorted(c.get("options", {}).items())),
                "budget": c.get("budget", False),
                "top1": f"{r['top1']:.2f}",
                "top5": f"{r['top5']:.2f}",
                "nll": f"{r['nll']:.4f}" if "nll" in r else "",  # older records have none
                "gmacs": f"{r['gmacs']:.4f}",
                "images": r["images"],
                "seconds": f"{r.get('seconds', 0.0):.2f}",
            }
        )
    return buf.getvalue()


def best_per_keep(records: Sequence[dict]) -> dict[float, dict]:
    """The highest-top-1 pruned record at each keep rate (or budget)."""
    best: dict[float, dict] = {}
    for r in records:
        c = r["config"]
        if c["criterion"] is None:
            continue
        k = column_of(c)
        if k not in best or r["top1"] > best[k]["top1"]:
            best[k] = r
    return best


def markdown_tables(records: Sequence[dict]) -> str:
    """One Markdown table per (fusion, locations) group; cells 'top-1 % / GMACs', best per column bold."""
    unpruned = [r for r in records if r["config"]["criterion"] is None]
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r["config"]["criterion"] is not None:
            groups.setdefault(group_name(r["config"]), []).append(r)
    out = []
    for title, recs in groups.items():
        keeps = sorted({column_of(r["config"]) for r in recs})
        rows = list(dict.fromkeys(row_name(r["config"]) for r in recs))
        cell = {(row_name(r["config"]), column_of(r["config"])): r for r in recs}
        col = "budget" if "budget" in recs[0]["config"].get("options", {}) else "keep"
        best = best_per_keep(recs)
        head = title[0].upper() + title[1:]
        out.append(f"**{head}** ({recs[0]['images']} images; cells: top-1 % / GMACs)\n")
        out.append("| criterion | " + " | ".join(f"{col} {k:g}" for k in keeps) + " |")
        out.append("|---|" + "---:|" * len(keeps))
        for u in unpruned[:1]:
            txt = f"{u['top1']:.2f} / {u['gmacs']:.3f}"
            out.append("| unpruned (reference) | " + " | ".join(txt for _ in keeps) + " |")
        for name in rows:
            cells = []
            for k in keeps:
                r = cell.get((name, k))
                if r is None:
                    cells.append("")
                    continue
                top = f"{r['top1']:.2f}"
                if r["top1"] == best[k]["top1"]:
                    top = f"**{top}**"
                cells.append(f"{top} / {r['gmacs']:.3f}")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)

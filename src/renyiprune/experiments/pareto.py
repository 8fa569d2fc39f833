"""Pareto plot of a sweep: top-1 against GMACs, one line per criterion, the unpruned model as a star."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..utils.io import atomic_path
from ..utils.optional import require
from .tables import group_name, row_name

__all__ = ["pareto_plot"]


def pareto_plot(records: Sequence[dict], path_stem: str | Path, title: str = "") -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` (one panel per fusion/locations group); return the paths.

    matplotlib (Agg) is imported here, so the rest of the library does not need it.
    """
    matplotlib = require("matplotlib", "plotting a Pareto front", "plots")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "plotting a Pareto front", "plots")

    unpruned = [r for r in records if r["config"]["criterion"] is None]
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r["config"]["criterion"] is not None:
            groups.setdefault(group_name(r["config"]), []).append(r)
    n = max(len(groups), 1)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5), squeeze=False, sharey=True)
    for ax, (gname, recs) in zip(axes[0], groups.items(), strict=False):
        lines: dict[str, list[dict]] = {}
        for r in recs:
            lines.setdefault(row_name(r["config"]), []).append(r)
        for i, (name, rs) in enumerate(lines.items()):
            rs = sorted(rs, key=lambda r: r["gmacs"])
            # 10 colors; past them the line style and marker change, so every line stays distinct
            style, marker = [("-", "o"), ("--", "s"), (":", "^")][(i // 10) % 3]
            ax.plot([r["gmacs"] for r in rs], [r["top1"] for r in rs], style, marker=marker,
                    ms=3 if marker == "o" else 4, color=f"C{i % 10}", label=name)  # fmt: skip
        for u in unpruned[:1]:
            ax.plot([u["gmacs"]], [u["top1"]], "k*", ms=12, label="unpruned")
        ax.set_title(gname)
        ax.set_xlabel("GMACs per image")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("top-1 %")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        final = stem.with_name(f"{stem.name}.{ext}")
        with atomic_path(final) as tmp:
            fig.savefig(tmp, format=ext, dpi=130)
        paths.append(final)
    plt.close(fig)
    return paths

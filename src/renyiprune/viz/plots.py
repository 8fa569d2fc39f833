"""Matplotlib figures of what pruning sees and does: entropy maps, masks, histograms, attention distance.

Figures are built on ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state, no display needed) at a
fixed DPI, so a figure's pixel size follows from its layout. matplotlib is imported lazily: the rest of
the library works without it. The data each panel draws is tagged with a ``gid`` on its artist
(``entropy a=2 block=3``, ``mask evit stage=0``) so tests can read back exactly what was drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..utils.optional import require

__all__ = [
    "DPI",
    "alpha_label",
    "block_label",
    "entropy_maps_figure",
    "masks_figure",
    "histograms_figure",
    "distance_figure",
    "save_figure",
]

DPI = 100
PANEL = 1.7  # inches per image panel
GREY = (0.55, 0.55, 0.55, 0.85)  # RGBA of a pruned patch


def _mpl():
    """Import matplotlib on first use with the Agg backend (no display needed)."""
    matplotlib = require("matplotlib", "drawing figures", "plots")
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    return matplotlib, require("matplotlib.figure", "drawing figures", "plots").Figure


def block_label(index: int) -> str:
    """A 0-based block index as people count and as ``--locations`` names it: ``block 4 (index 3)``."""
    return f"block {index + 1} (index {index})"


def alpha_label(alpha: float) -> str:
    """'1', '2', '∞' for display."""
    return "∞" if alpha == float("inf") else f"{alpha:g}"


def _new_figure(width_in: float, height_in: float):
    _, Figure = _mpl()
    # Whole pixels, so that the saved PNG is exactly round(width_in * DPI) x round(height_in * DPI).
    return Figure(figsize=(round(width_in * DPI) / DPI, round(height_in * DPI) / DPI), dpi=DPI)


def _grid(
    fig, rows: int, cols: int, cell: tuple[float, float], left: float, top: float, gap: tuple[float, float]
):
    """Axes on a fixed grid, all sizes in inches from the top-left corner (no layout engine: fast and
    the pixel size of the figure is exactly its figsize times DPI)."""
    W, H = fig.get_size_inches()
    axes = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        for c in range(cols):
            x = left + c * (cell[0] + gap[0])
            y = top + r * (cell[1] + gap[1]) + cell[1]
            axes[r, c] = fig.add_axes((x / W, 1 - y / H, cell[0] / W, cell[1] / H))
    return axes


def _side_axes(fig, x: float, top: float, width: float, height: float):
    """One extra axes (a colorbar) at inches (x, top) from the top-left corner."""
    W, H = fig.get_size_inches()
    return fig.add_axes((x / W, 1 - (top + height) / H, width / W, height / H))


def _image_axes(ax, image: np.ndarray) -> None:
    h, w = image.shape[:2]
    ax.imshow(image, extent=(0, w, h, 0), interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def entropy_maps_figure(
    image: np.ndarray,
    maps: Mapping[float, np.ndarray],
    blocks: Sequence[int],
    title: str,
) -> object:
    """Rows = α, columns = blocks: per-patch entropy (nats) over the image, one colorbar per α row.

    ``image`` (H, W, 3) uint8 is the model's input crop; ``maps[α]`` is (len(blocks), gh, gw).
    """
    alphas = list(maps)
    rows, cols = len(alphas), len(blocks)
    left, top, gap = 0.35, 0.75, (0.08, 0.3)
    fig = _new_figure(left + cols * (PANEL + gap[0]) + 1.0, top + rows * (PANEL + gap[1]) + 0.1)
    axes = _grid(fig, rows, cols, (PANEL, PANEL), left, top, gap)
    h, w = image.shape[:2]
    for r, a in enumerate(alphas):
        m = np.asarray(maps[a], dtype=np.float64)
        vmin, vmax = float(m.min()), float(m.max())
        im = None
        for c, b in enumerate(blocks):
            ax = axes[r, c]
            _image_axes(ax, image)
            im = ax.imshow(
                m[c],
                extent=(0, w, h, 0),
                cmap="magma",
                vmin=vmin,
                vmax=vmax,
                alpha=0.7,
                interpolation="nearest",
            )
            im.set_gid(f"entropy a={alpha_label(a)} block={b}")
            ax.set_title(f"α = {alpha_label(a)}, {block_label(b)}", fontsize=8, pad=3)
        cax = _side_axes(fig, left + cols * (PANEL + gap[0]) + 0.05, top + r * (PANEL + gap[1]), 0.15, PANEL)
        cb = fig.colorbar(im, cax=cax)
        cb.set_label(f"H$_{{{alpha_label(a)}}}$ (nats)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11, y=1 - 0.15 / fig.get_size_inches()[1], va="top")
    return fig


def masks_figure(
    image: np.ndarray,
    rows: Sequence[tuple[str, np.ndarray, Sequence[int]]],
    locations: Sequence[int],
    grid: tuple[int, int],
    title: str,
) -> object:
    """Rows = criteria, columns = the input and the image after each pruning stage, pruned patches grey.

    ``rows``: (label, kept (stages, num_patches) bool, fused patch count per stage (0 without fusion)).
    """
    n = grid[0] * grid[1]
    stages = len(locations)
    left, top, gap = 0.35, 0.75, (0.1, 0.45)
    fig = _new_figure(left + (stages + 1) * (PANEL + gap[0]), top + len(rows) * (PANEL + gap[1]))
    axes = _grid(fig, len(rows), stages + 1, (PANEL, PANEL), left, top, gap)
    h, w = image.shape[:2]
    for r, (label, kept, fused) in enumerate(rows):
        ax = axes[r, 0]
        _image_axes(ax, image)
        ax.set_ylabel(label, fontsize=9)
        ax.set_title(f"{label}: input, {n} patches", fontsize=7, pad=3)
        for s, loc in enumerate(locations):
            ax = axes[r, s + 1]
            _image_axes(ax, image)
            k = kept[s].reshape(grid)
            overlay = np.zeros((*grid, 4))
            overlay[~k] = GREY
            im = ax.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
            im.set_gid(f"mask {label} stage={s}")
            text = f"after {block_label(loc)}:\n{int(k.sum())}/{n} kept"
            if fused[s]:
                text += f"\nfused token ← {fused[s]} ({fused[s] / n:.0%})"
            ax.set_title(text, fontsize=7, pad=3)
    fig.suptitle(title, fontsize=11, y=1 - 0.15 / fig.get_size_inches()[1], va="top")
    return fig


def histograms_figure(
    data: Mapping[float, Sequence[tuple[np.ndarray, np.ndarray]]],
    locations: Sequence[int],
    title: str,
) -> object:
    """Rows = α, columns = stages: standardized entropy of kept vs pruned patches, as densities.

    ``data[α][stage]`` = (entropies, kept mask) of every candidate patch at that stage. Each panel is
    standardized by the mean and std of all its candidates so that shapes compare across α.
    """
    alphas = list(data)
    stages = len(locations)
    left, top, gap, cell = 0.6, 0.95, (0.45, 0.95), (2.4, 1.6)
    fig = _new_figure(left + stages * (cell[0] + gap[0]), top + len(alphas) * (cell[1] + gap[1]) - 0.2)
    axes = _grid(fig, len(alphas), stages, cell, left, top, gap)
    bins = np.linspace(-4.0, 4.0, 41)
    for r, a in enumerate(alphas):
        for s, loc in enumerate(locations):
            ax = axes[r, s]
            h, kept = (np.asarray(v) for v in data[a][s])
            mu, sd = float(h.mean()), float(h.std())
            z = np.clip((h - mu) / (sd if sd > 0 else 1.0), bins[0], bins[-1])
            for sel, name, color in ((kept, "kept", "tab:blue"), (~kept, "pruned", "tab:orange")):
                if sel.any():
                    ax.hist(
                        z[sel],
                        bins=bins,
                        density=True,
                        alpha=0.55,
                        color=color,
                        label=f"{name} ({sel.sum()})",
                    )
            ax.set_title(
                f"α = {alpha_label(a)}, {block_label(loc)}\nmean {mu:.2f}, std {sd:.2f} nats", fontsize=8
            )
            ax.set_xlabel(f"(H$_{{{alpha_label(a)}}}$ − mean) / std", fontsize=8, labelpad=1)
            if s == 0:
                ax.set_ylabel("density", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=11, y=1 - 0.15 / fig.get_size_inches()[1], va="top")
    return fig


def distance_figure(
    distance: np.ndarray,
    entropy: Mapping[float, np.ndarray],
    title: str,
) -> object:
    """One panel per α: mean attention distance (px) vs mean entropy of each head, coloured by block.

    ``distance`` and ``entropy[α]`` are (blocks, heads).
    """
    alphas = list(entropy)
    blocks, heads = distance.shape
    left, top, gap, cell = 0.7, 0.75, (0.75, 0.0), (3.0, 2.6)
    width = left + len(alphas) * (cell[0] + gap[0]) + 0.6
    fig = _new_figure(width, top + cell[1] + 0.6)
    axes = _grid(fig, 1, len(alphas), cell, left, top, gap)[0]
    color = np.repeat(np.arange(blocks), heads)  # 0-based block index, as --locations and --blocks
    matplotlib, _ = _mpl()
    cmap = matplotlib.colormaps["viridis"].resampled(blocks)  # one colour per block
    sc = None
    for ax, a in zip(axes, alphas, strict=True):
        sc = ax.scatter(
            distance.ravel(),
            np.asarray(entropy[a]).ravel(),
            c=color,
            cmap=cmap,
            s=22,
            vmin=-0.5,
            vmax=blocks - 0.5,
        )
        sc.set_gid(f"distance a={alpha_label(a)}")
        ax.set_xlabel("mean attention distance (px)", fontsize=8)
        ax.set_ylabel(f"mean H$_{{{alpha_label(a)}}}$ (nats)", fontsize=8)
        ax.set_title(f"α = {alpha_label(a)}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    cax = _side_axes(fig, width - 0.95, top, 0.15, cell[1])
    cb = fig.colorbar(sc, cax=cax)
    cb.set_label("block index (0-based)", fontsize=8)
    cb.set_ticks(range(0, blocks, max(1, blocks // 12)))
    cb.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11, y=1 - 0.15 / fig.get_size_inches()[1], va="top")
    return fig


def save_figure(fig, path: str | Path, seed: int = 0) -> None:
    """Save ``fig`` to ``path`` (format from the suffix) reproducibly: no dates, fixed SVG ids."""
    matplotlib, _ = _mpl()
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    metadata = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
    with matplotlib.rc_context({"svg.hashsalt": f"renyiprune-{seed}"}):
        fig.savefig(path, format=fmt, dpi=DPI, metadata=metadata)

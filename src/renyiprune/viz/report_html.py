"""A self-contained ``index.html`` listing figures with captions: no scripts, no external resources."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["FigureEntry", "render_index"]

_BROWSER_FORMATS = ("png", "svg")  # shown inline; other formats (pdf) are linked


@dataclass(frozen=True)
class FigureEntry:
    """One figure: a section heading, its files (one per format, relative paths) and a caption."""

    section: str
    title: str
    files: tuple[str, ...]
    caption: str


def _shown(files: Sequence[str]) -> str | None:
    for fmt in _BROWSER_FORMATS:
        for f in files:
            if f.lower().endswith("." + fmt):
                return f
    return None


def render_index(title: str, config: Mapping[str, object], figures: Sequence[FigureEntry]) -> str:
    """HTML page with the run's configuration and every figure (PNG or SVG inline, all formats linked)."""
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in config.items())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #ccc}figure{margin:1.5em 0}"
        "figcaption{color:#333;margin-top:.4em}th{text-align:left;padding-right:1em}</style>",
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        f"<h2>Configuration</h2><table>{rows}</table>",
    ]
    section = None
    for fig in figures:
        if fig.section != section:
            section = fig.section
            parts.append(f"<h2>{e(section)}</h2>")
        shown = _shown(fig.files)
        links = " ".join(f'<a href="{e(f)}">{e(f.rsplit(".", 1)[-1])}</a>' for f in fig.files)
        img = f'<img src="{e(shown)}" alt="{e(fig.title)}">' if shown else ""
        caption = f"<b>{e(fig.title)}</b>. {e(fig.caption)} [{links}]"
        parts.append(f"<figure>{img}<figcaption>{caption}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"

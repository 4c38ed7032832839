"""Concept diagrams, drawn by code (matplotlib) so they are versioned and re-drawn by every run.

One module per notebook topic (`dsv3_lab.diagrams.rope`, `.mla`, `.moe`, ...), each with
`draw_*` functions that return a matplotlib Figure; the notebook shows it and saves it with
`dsv3_lab.plot.savefig`. This module holds the shared primitives, so every diagram looks alike:

    canvas(width, height)            -> (fig, ax) in data units = inches, no axes drawn
    box(ax, x, y, w, h, text, kind)  a rounded box centred at (x, y); kind picks the colour
    arrow(ax, (x0, y0), (x1, y1), text=None, style="-|>")
    label(ax, x, y, text, **kw)      plain text (>= 10 pt)
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

#: Box colours by role: inputs/activations, weights/projections, cached tensors, operations,
#: outputs, and de-emphasised elements.
KINDS = {
    "tensor": ("#e8f1fb", "#1f77b4"),
    "weight": ("#fdecea", "#d62728"),
    "cache": ("#e9f6ec", "#2ca02c"),
    "op": ("#fff4e5", "#ff7f0e"),
    "out": ("#f1ecf8", "#9467bd"),
    "muted": ("#f3f3f3", "#7f7f7f"),
}
FONT = 10.5


def canvas(width: float, height: float):
    """A blank figure of width × height inches whose data coordinates are inches."""
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.subplots_adjust(0, 0, 1, 1)
    return fig, ax


def box(ax, x: float, y: float, w: float, h: float, text: str = "", kind: str = "tensor",
        fontsize: float = FONT, **kw):
    """A rounded box of size w × h centred at (x, y), with centred text."""
    if kind not in KINDS:
        raise ValueError(f"box: kind must be one of {sorted(KINDS)}, got {kind!r}")
    face, edge = KINDS[kind]
    patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                           boxstyle="round,pad=0.02,rounding_size=0.06", facecolor=face,
                           edgecolor=edge, linewidth=1.4, **kw)
    ax.add_patch(patch)
    if text:
        ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    return patch


def arrow(ax, start: tuple[float, float], end: tuple[float, float], text: str | None = None,
          style: str = "-|>", color: str = "#444444", fontsize: float = FONT - 0.5,
          text_offset: tuple[float, float] = (0.08, 0.0), **kw):
    """An arrow from start to end, optionally labelled near its middle."""
    patch = FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color,
                            linewidth=1.2, shrinkA=2, shrinkB=2, **kw)
    ax.add_patch(patch)
    if text:
        mx, my = (start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1]
        ax.text(mx, my, text, ha="left", va="center", fontsize=fontsize, color=color)
    return patch


def label(ax, x: float, y: float, text: str, fontsize: float = FONT, **kw):
    """Plain text at (x, y); at least 10 pt so it stays legible at README size."""
    return ax.text(x, y, text, fontsize=fontsize, **kw)

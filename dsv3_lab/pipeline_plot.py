"""Drawings for notebook 10: Gantt charts of pipeline timelines (in the manner of V3 Figure 5) and
the DualPipe placement diagram. Colours: forward, backward, backward-for-input, backward-for-
weights; the reverse direction of DualPipe in a lighter shade; an overlapped F&B pair drawn as two
half-height cells with one black border.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Rectangle

from dsv3_lab.pipeline import Op

KIND_COLORS = {"F": "#f4a261", "B": "#2a9d8f", "BI": "#8ecae6", "W": "#457b9d"}
REVERSE = {"F": "#fbd5b5", "B": "#9fd8d0", "BI": "#cfe8f3", "W": "#a9c2d6"}
KIND_NAMES = {"F": "forward", "B": "full backward", "BI": "backward for input",
              "W": "backward for weights"}


def _color(kind: str, d: int) -> str:
    return (KIND_COLORS if d == 0 else REVERSE)[kind]


def gantt(ax, timelines: list[list[tuple[float, float, Op]]], title: str = "",
          labels: bool = True, unit: str = "time") -> None:
    """Draw per-rank timelines [(start, end, op)] on `ax`: rank 0 on top."""
    pp = len(timelines)
    for r, tl in enumerate(timelines):
        y = pp - 1 - r
        for start, end, op in tl:
            n = len(op.tasks)
            for i, t in enumerate(op.tasks):
                h = 0.8 / n
                y0 = y - 0.4 + (n - 1 - i) * h
                ax.add_patch(Rectangle((start, y0), end - start, h, facecolor=_color(t.kind, t.dir),
                                       edgecolor="white" if n == 1 else "none", linewidth=0.5))
                if labels and end - start > 0:
                    ax.text((start + end) / 2, y0 + h / 2, str(t.mb), ha="center", va="center",
                            fontsize=6 if n == 1 else 5)
            if n == 2:
                ax.add_patch(Rectangle((start, y - 0.4), end - start, 0.8, facecolor="none",
                                       edgecolor="black", linewidth=1.0))
    end = max((e for tl in timelines for _, e, _ in tl), default=1.0)
    ax.set_xlim(0, end)
    ax.set_ylim(-0.6, pp - 0.4)
    ax.set_yticks(range(pp), [f"rank {r}" for r in reversed(range(pp))])
    ax.set_xlabel(unit)
    ax.grid(False)
    if title:
        ax.set_title(title, loc="left")


def legend_handles(kinds=("F", "B", "BI", "W"), reverse: bool = False):
    handles = [Rectangle((0, 0), 1, 1, facecolor=KIND_COLORS[k], label=KIND_NAMES[k])
               for k in kinds]
    if reverse:
        handles.append(Rectangle((0, 0), 1, 1, facecolor=REVERSE["F"],
                                 label="reverse direction (lighter)"))
    handles.append(Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="black",
                             label="overlapped F&B"))
    return handles


def dualpipe_placement(pp: int = 4):
    """Concept diagram: rank r holds stage r of direction 0 and stage PP-1-r of direction 1."""
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    for r in range(pp):
        for row, (d, color) in enumerate(((0, KIND_COLORS["F"]), (1, REVERSE["F"]))):
            s = r if d == 0 else pp - 1 - r
            ax.add_patch(Rectangle((r * 1.5, 1 - row), 1.2, 0.8, facecolor=color,
                                   edgecolor="black", linewidth=0.8))
            ax.text(r * 1.5 + 0.6, 1.4 - row, f"stage {s}", ha="center", va="center", fontsize=9)
        ax.text(r * 1.5 + 0.6, -0.3, f"rank {r}", ha="center", va="center", fontsize=10)
    for r in range(pp - 1):
        ax.add_patch(FancyArrowPatch((r * 1.5 + 1.2, 1.4), (r * 1.5 + 1.5, 1.4),
                                     arrowstyle="->", mutation_scale=10))
        ax.add_patch(FancyArrowPatch((r * 1.5 + 1.5, 0.4), (r * 1.5 + 1.2, 0.4),
                                     arrowstyle="->", mutation_scale=10))
    ax.text(-0.2, 1.4, "direction 0\n(enters rank 0)", ha="right", va="center", fontsize=8)
    ax.text(-0.2, 0.4, "direction 1\n(enters rank PP-1)", ha="right", va="center", fontsize=8)
    ax.set_xlim(-2.0, pp * 1.5)
    ax.set_ylim(-0.6, 2.0)
    ax.axis("off")
    ax.set_title("DualPipe: every rank holds two stages (2x parameters)", loc="left")
    return fig

"""Gantt charts of pipeline timelines for notebook 10, in the manner of V3 Figure 5.

Colours: forward, full backward, backward for input, backward for weights; the reverse direction
of DualPipe in a lighter shade; an overlapped F&B pair drawn as two half-height cells inside one
black border. Numbers in the cells are micro-batch indices (per direction).
"""

from __future__ import annotations

from matplotlib.patches import Rectangle

from dsv3_lab.pipeline import Op

KIND_COLORS = {"F": "#f4a261", "B": "#2a9d8f", "BI": "#8ecae6", "W": "#457b9d"}
REVERSE = {"F": "#fbd5b5", "B": "#9fd8d0", "BI": "#cfe8f3", "W": "#a9c2d6"}
KIND_NAMES = {"F": "forward", "B": "full backward", "BI": "backward for input",
              "W": "backward for weights"}


def _color(kind: str, d: int) -> str:
    return (KIND_COLORS if d == 0 else REVERSE)[kind]


def gantt(ax, timelines: list[list[tuple[float, float, Op]]], title: str = "",
          labels: bool = True, unit: str = "time", fontsize: float = 9.0,
          xmax: float | None = None) -> None:
    """Draw per-rank timelines [(start, end, op)] on `ax`, rank 0 on top, x from 0 to `xmax`
    (default: the last end). Micro-batch numbers are written into the cells that are wide
    enough for them at the current figure size."""
    pp = len(timelines)
    end = xmax or max((e for tl in timelines for _, e, _ in tl), default=1.0)
    fig = ax.figure
    inches_per_unit = ax.get_position().width * fig.get_figwidth() / end
    for r, tl in enumerate(timelines):
        y = pp - 1 - r
        for start, stop, op in tl:
            n = len(op.tasks)
            for i, t in enumerate(op.tasks):
                h = 0.8 / n
                y0 = y - 0.4 + (n - 1 - i) * h
                ax.add_patch(Rectangle((start, y0), stop - start, h,
                                       facecolor=_color(t.kind, t.dir),
                                       edgecolor="white" if n == 1 else "none", linewidth=0.5))
                text = str(t.mb)
                if labels and (stop - start) * inches_per_unit >= 0.08 * len(text) + 0.04:
                    ax.text((start + stop) / 2, y0 + h / 2, text, ha="center", va="center",
                            fontsize=fontsize, clip_on=True)
            if n == 2:
                ax.add_patch(Rectangle((start, y - 0.4), stop - start, 0.8, facecolor="none",
                                       edgecolor="black", linewidth=1.0))
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

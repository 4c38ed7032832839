"""Concept diagram of notebook 10: DualPipe's placement of stages on ranks (V3 §3.2.1).

Direction 0 enters rank 0 and runs stages 0..PP-1 on ranks 0..PP-1; direction 1 enters rank
PP-1 and runs the same stages on ranks PP-1..0. So rank r holds stage r and stage PP-1-r: two
copies of the parameters, and the summed gradient of a stage is the sum over its two copies.
"""

from __future__ import annotations

from dsv3_lab.diagrams import arrow, box, canvas, label


def draw_dualpipe_placement(pp: int = 4):
    """Ranks as columns, the two directions as rows; returns the Figure (figures/10_*.png)."""
    if not isinstance(pp, int) or pp < 2 or pp % 2 or pp > 8:
        raise ValueError(f"draw_dualpipe_placement: pp must be an even int in 2..8, got {pp!r}")
    step = 1.75
    fig, ax = canvas(2.6 + step * pp, 3.4)
    x0, y_dir0, y_dir1 = 2.6, 2.3, 1.1
    label(ax, 0.15, y_dir0, "direction 0\nenters rank 0", va="center")
    label(ax, 0.15, y_dir1, f"direction 1\nenters rank {pp - 1}", va="center")
    for r in range(pp):
        x = x0 + step * r
        label(ax, x, 3.1, f"rank {r}", ha="center", va="center")
        box(ax, x, y_dir0, 1.3, 0.6, f"stage {r}", kind="weight")
        box(ax, x, y_dir1, 1.3, 0.6, f"stage {pp - 1 - r}", kind="cache")
        if r < pp - 1:
            arrow(ax, (x + 0.68, y_dir0), (x + step - 0.68, y_dir0))
            arrow(ax, (x + step - 0.68, y_dir1), (x + 0.68, y_dir1))
    label(ax, x0 + step * (pp - 1) / 2, 0.35,
          "stage s: weights on rank s and rank PP-1-s (2x parameters); gradient = sum of both",
          ha="center", va="center", fontsize=10)
    return fig

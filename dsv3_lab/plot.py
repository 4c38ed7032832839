"""One figure style for every notebook, and `savefig(name)` into the repository's figures/.

Figures are written reproducibly: fixed dpi, no software/date metadata, so re-running a
notebook rewrites byte-identical PNGs when the data are the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt

FIGURES_DIR = Path(__file__).resolve().parent.parent / "figures"
DPI = 110

STYLE = {
    "figure.figsize": (6.4, 3.6),
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "lines.linewidth": 1.8,
    "image.cmap": "viridis",
    "svg.hashsalt": "dsv3-lab",
}

#: Colours used consistently across notebooks (one per method / component).
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def use_style() -> None:
    """Apply the dsv3-lab figure style to matplotlib's global rcParams."""
    mpl.rcParams.update(STYLE)
    mpl.rcParams["axes.prop_cycle"] = mpl.cycler(color=COLORS)


def savefig(name: str, fig=None, volatile: bool = False) -> Path:
    """Save `fig` (default: the current figure) as figures/NAME.png and return the path.

    `name` is a bare file name such as "00_params" (".png" is added). Set `volatile=True` for
    figures drawn from wall-clock timings: they are written when missing or when the
    environment variable DSV3_REFRESH_VOLATILE=1 is set (`make notebooks-refresh`), so ordinary
    re-runs do not rewrite them with new timing noise.
    """
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"savefig: expected a bare figure name like '01_rope', got {name!r}")
    fig = fig if fig is not None else plt.gcf()
    path = FIGURES_DIR / (name if name.endswith(".png") else name + ".png")
    if volatile and path.exists() and os.environ.get("DSV3_REFRESH_VOLATILE") != "1":
        return path
    FIGURES_DIR.mkdir(exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path

"""One figure style for every notebook, and `savefig(name)` into the repository's figures/.

Figures are written reproducibly: fixed dpi, no software/date metadata, so re-running a
notebook rewrites byte-identical PNGs when the data are the same.

Legibility: the README shows figures at about half page width (~430 px). The default figure
is 5.6 × 3.4 in at 120 dpi (672 px wide) with 11 pt text, so text stays >= ~11 px on screen.
`savefig` refuses a figure wider than MAX_WIDTH_IN inches or with visible text smaller than
MIN_FONT_PT points, so every committed figure keeps that promise.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt

FIGURES_DIR = Path(__file__).resolve().parent.parent / "figures"
#: `make test-portable` sets DSV3_FIGURES_DIR to a scratch folder per emulated machine, then
#: compares what was written there byte by byte with the committed figures/.
FIGURES_ENV = "DSV3_FIGURES_DIR"
DPI = 120
MIN_FONT_PT = 9.0
MAX_WIDTH_IN = 11.0

STYLE = {
    "figure.figsize": (5.6, 3.4),
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
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
    re-runs do not rewrite them with new timing noise. With DSV3_FIGURES_DIR set, figures go
    to that folder instead (volatile ones are then skipped).
    """
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"savefig: expected a bare figure name like '01_rope', got {name!r}")
    fig = fig if fig is not None else plt.gcf()
    check_legible(fig, name)
    folder = Path(os.environ.get(FIGURES_ENV) or FIGURES_DIR)
    path = folder / (name if name.endswith(".png") else name + ".png")
    refresh = os.environ.get("DSV3_REFRESH_VOLATILE") == "1"
    if volatile and not refresh and (path.exists() or folder != FIGURES_DIR):
        return path  # timing figures: only `make notebooks-refresh` (or a first run) writes them
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path


def check_legible(fig, name: str = "figure") -> None:
    """Raise ValueError if `fig` is wider than MAX_WIDTH_IN or shows text under MIN_FONT_PT."""
    width = fig.get_size_inches()[0]
    if width > MAX_WIDTH_IN:
        raise ValueError(f"savefig({name!r}): the figure is {width:.1f} in wide; at most "
                         f"{MAX_WIDTH_IN} in stays legible at README size (split it)")
    for text in fig.findobj(mpl.text.Text):
        if text.get_visible() and text.get_text().strip() and text.get_fontsize() < MIN_FONT_PT:
            raise ValueError(f"savefig({name!r}): text {text.get_text()[:30]!r} is "
                             f"{text.get_fontsize():.1f} pt; use at least {MIN_FONT_PT} pt")

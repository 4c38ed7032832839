"""Figure hygiene: committed figures are legible at README size, and savefig enforces it."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from dsv3_lab import plot  # noqa: E402

FIGURES = sorted((Path(__file__).resolve().parent.parent / "figures").glob("*.png"))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_style_fonts_are_at_least_ten_points():
    for key in ("font.size", "axes.labelsize", "xtick.labelsize", "ytick.labelsize",
                "legend.fontsize"):
        assert plot.STYLE[key] >= 10, key


@pytest.mark.parametrize("path", FIGURES, ids=[p.name for p in FIGURES])
def test_committed_figures_fit_readme_size(path):
    width, height = _png_size(path)
    max_px = plot.MAX_WIDTH_IN * plot.DPI + 40  # bbox_inches="tight" may add a margin
    assert 200 <= width <= max_px, f"{path.name}: {width} px wide"
    assert height <= 1.2 * max_px, f"{path.name}: {height} px high"


def test_savefig_refuses_small_text_and_wide_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "FIGURES_DIR", tmp_path)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_title("tiny", fontsize=6)
    with pytest.raises(ValueError, match="6.0 pt"):
        plot.savefig("t1", fig)
    plt.close(fig)
    fig, _ = plt.subplots(figsize=(plot.MAX_WIDTH_IN + 2, 3))
    with pytest.raises(ValueError, match="wide"):
        plot.savefig("t2", fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    ax.set_xlabel("x (tokens)")
    path = plot.savefig("t3", fig)
    assert path.exists() and _png_size(path)[0] <= 4 * plot.DPI + 40
    plt.close(fig)
    with pytest.raises(ValueError, match="bare figure name"):
        plot.savefig("a/b")

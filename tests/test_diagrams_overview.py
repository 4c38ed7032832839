"""The layer-map diagram (notebook 00): residuals drawn, MTP fed from h, legible, config-driven."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from dsv3_lab.config import ModelArgs  # noqa: E402
from dsv3_lab.diagrams.overview import draw_layer_map  # noqa: E402
from dsv3_lab.plot import check_legible  # noqa: E402


def _texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def test_layer_map_is_legible_and_names_both_mtp_inputs():
    fig = draw_layer_map()
    try:
        check_legible(fig, "00_layer_map")  # <= 11 in wide, no text under 9 pt
        text = _texts(fig)
        assert text.count("+") >= 2  # the two residual additions of a block
        assert "report: $h_i$ (Eq. 21)" in text and "released code" in text
        assert "576 values" in text and "× 61 blocks" in text and "top-8" in text
    finally:
        plt.close(fig)


def test_layer_map_follows_the_config():
    fig = draw_layer_map(ModelArgs.tiny())
    try:
        text = _texts(fig)
        assert "× 3 blocks" in text and "40 values" in text and "top-4" in text
    finally:
        plt.close(fig)


def test_layer_map_rejects_other_inputs():
    with pytest.raises(TypeError, match="ModelArgs"):
        draw_layer_map({"dim": 64})

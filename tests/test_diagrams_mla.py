"""The MLA concept diagrams (notebook 02): drawn from the config's shapes, legible."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from dsv3_lab.config import ModelArgs  # noqa: E402
from dsv3_lab.diagrams.mla import draw_mla_dataflow, draw_naive_vs_absorbed  # noqa: E402
from dsv3_lab.plot import check_legible  # noqa: E402


def _texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


@pytest.mark.parametrize("draw", [draw_mla_dataflow, draw_naive_vs_absorbed])
def test_diagrams_are_legible_and_show_the_671b_shapes(draw):
    fig = draw()
    try:
        check_legible(fig, draw.__name__)  # <= 11 in wide, no text under 9 pt
        text = _texts(fig)
        assert "[L × 512]" in text or "[512]" in text
        assert "7168" in text
    finally:
        plt.close(fig)


def test_dataflow_states_the_cache_of_the_config_it_draws():
    v3 = draw_mla_dataflow()
    tiny = draw_mla_dataflow(ModelArgs.tiny())
    try:
        assert "cached: 576 values" in _texts(v3)  # 512 + 64 (V3)
        assert "cached: 40 values" in _texts(tiny)  # 32 + 8 (tiny)
    finally:
        plt.close(v3)
        plt.close(tiny)


def test_absorbed_cost_per_cached_token():
    fig = draw_naive_vs_absorbed()
    try:
        text = _texts(fig)
        assert "= 320 multiply-adds" in text  # 128 + 64 + 128
        assert "= 1,088 multiply-adds" in text  # 2·512 + 64
    finally:
        plt.close(fig)


def test_rejects_a_non_config():
    with pytest.raises(TypeError, match="ModelArgs"):
        draw_mla_dataflow({"dim": 64})

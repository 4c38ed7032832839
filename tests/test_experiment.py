"""dsv3_lab.experiment: paired comparisons over seeds and their verdicts."""

import math

import pytest

from dsv3_lab.experiment import compare, fmt, mean_sd, run_seeds, t975


def test_mean_sd_and_t_quantiles():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([5.0]) == (5.0, 0.0)
    assert t975(2) == 4.303 and t975(1) == 12.706
    assert 1.96 < t975(100) < 2.0
    with pytest.raises(ValueError, match="df"):
        t975(0)


def test_a_consistent_paired_effect_resolves_even_when_seeds_vary_a_lot():
    base = [1.0, 3.0, 5.0, 7.0, 9.0]  # seed-to-seed spread much larger than the effect
    a = [x - 0.1 for x in base]
    c = compare(a, base, names=("bias", "aux"))
    assert c.verdict == "A better" and c.winner() == "bias"
    assert math.isclose(c.mean, -0.1) and c.sd < 1e-12
    c.expect("A better")
    with pytest.raises(AssertionError, match="bias"):
        c.expect("not resolved")


def test_noise_larger_than_the_effect_is_not_resolved_and_direction_flips_with_higher_better():
    a, b = [1.0, 2.0, 3.0], [1.1, 1.8, 3.05]
    assert compare(a, b).verdict == "not resolved"
    hi = compare([0.9, 0.8, 0.85], [0.5, 0.55, 0.52], lower_is_better=False)
    assert hi.verdict == "A better"
    assert compare([0.9, 0.8, 0.85], [0.5, 0.55, 0.52]).verdict == "B better"


def test_ratio_mode_compares_logs():
    c = compare([0.1, 0.2, 0.4], [1.0, 2.0, 4.0], ratio=True)
    assert math.isclose(math.exp(c.mean), 0.1) and c.verdict == "A better"
    assert "×0.1" in str(c)


def test_summary_prints_four_significant_digits():
    s = str(compare([1.234567, 1.3], [1.5, 1.6], names=("x", "y")))
    assert s.startswith("x 1.267") and "over 2 seeds" in s
    assert fmt(0.000123456) == "0.0001235"


def test_run_seeds_collects_metrics_per_seed():
    out = run_seeds(lambda s: {"loss": s * 1.0, "maxvio": 2.0 * s}, [0, 1, 2])
    assert out == {"loss": [0.0, 1.0, 2.0], "maxvio": [0.0, 2.0, 4.0]}
    with pytest.raises(ValueError, match="metrics"):
        run_seeds(lambda s: {"a": 1.0} if s == 0 else {"b": 1.0}, [0, 1])
    with pytest.raises(TypeError, match="dict"):
        run_seeds(lambda s: 1.0, [0])


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="one value per seed"):
        compare([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        compare([1.0], [2.0])
    with pytest.raises(ValueError, match="finite"):
        compare([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        compare([1.0, 0.0], [1.0, 2.0], ratio=True)
    with pytest.raises(ValueError, match="verdict"):
        compare([1.0, 2.0], [1.0, 2.0]).expect("A wins")

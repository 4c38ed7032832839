"""dsv3_lab.experiment: paired comparisons over seeds and their verdicts."""

import math

import pytest

from dsv3_lab.experiment import (
    compare,
    fmt,
    mean_sd,
    parallel_processes,
    run_recipes,
    run_seeds,
    t975,
)


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


def _tiny_training(seed):
    """A recipe as the notebooks write them: seeded model and batches, a few AdamW steps."""
    import torch

    from dsv3_lab.config import ModelArgs
    from dsv3_lab.data import ToyCorpus
    from dsv3_lab.model import Transformer
    from dsv3_lab.train import train

    torch.manual_seed(seed)
    model = Transformer(ModelArgs.tiny(n_layers=2, max_batch_size=2, max_seq_len=16))
    result = train(model, ToyCorpus(seed=0).batches("train", 2, 16, seed=seed), 3, warmup=1,
                   progress=False, seed=seed)
    return {"loss": result.losses[-1], "model": model, "step": seed}


@pytest.mark.skipif(parallel_processes(2) < 2, reason="needs fork and two cores")
def test_seeds_in_worker_processes_give_exactly_the_serial_results():
    import torch

    default, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the workers inherit the caller's set-up: float64 as in the notebooks, or float32
        serial = run_seeds(_tiny_training, [0, 1, 2])
        torch.set_default_dtype(torch.float64)
        serial64 = run_seeds(_tiny_training, [0, 1, 2])
        parallel64 = run_seeds(_tiny_training, [0, 1, 2], processes=2)
    finally:
        torch.set_default_dtype(default)
        torch.set_num_threads(threads)
    assert parallel64["loss"] == serial64["loss"] and parallel64["step"] == [0.0, 1.0, 2.0]
    assert serial64["loss"] != serial["loss"]  # the dtype did reach the workers
    for a, b in zip(parallel64["model"], serial64["model"], strict=True):  # models come back
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                       b.state_dict().values(), strict=True))
        assert next(a.parameters()).dtype == torch.float64


@pytest.mark.skipif(parallel_processes(2) < 2, reason="needs fork and two cores")
def test_a_recipe_defined_here_runs_in_workers_and_its_failure_names_the_seed():
    offset = 10.0  # a closure: it is never pickled, the forked workers inherit it

    def recipe(seed):
        if seed == 3:
            raise KeyError("no batches")
        return {"value": seed + offset, "history": [seed] * 2}

    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="one torch thread"):
            run_seeds(recipe, [0, 1], processes=2)
        torch.set_num_threads(1)
        out = run_seeds(recipe, [0, 1, 2], processes=2)
        with pytest.raises(RuntimeError, match="seed 3.*KeyError"):
            run_seeds(recipe, [2, 3], processes=2)
    finally:
        torch.set_num_threads(threads)
    assert out == {"value": [10.0, 11.0, 12.0], "history": [[0, 0], [1, 1], [2, 2]]}
    with pytest.raises(ValueError, match="processes"):
        run_seeds(recipe, [0], processes=0)
    assert parallel_processes(1) == 1
    with pytest.raises(ValueError, match="limit"):
        parallel_processes(0)


@pytest.mark.skipif(parallel_processes(2) < 2, reason="needs fork and two cores")
def test_run_recipes_is_run_seeds_per_recipe_in_one_pool():
    import torch

    recipes = {"double": lambda s: {"x": 2 * s}, "square": lambda s: {"x": s * s, "tag": f"s{s}"}}
    want = {"double": {"x": [0.0, 2.0, 4.0]}, "square": {"x": [0.0, 1.0], "tag": ["s0", "s1"]}}
    seeds = {"double": range(3), "square": [0, 1]}
    assert run_recipes(recipes, seeds) == want
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_recipes(recipes, seeds, processes=2) == want
        with pytest.raises(RuntimeError, match="seed 1 of recipe 'bad'.*ZeroDivisionError"):
            run_recipes({"bad": lambda s: {"x": 1 / (s - 1)}}, [0, 1], processes=2)
    finally:
        torch.set_num_threads(threads)
    assert run_recipes(recipes, [0, 1])["double"] == {"x": [0.0, 2.0]}
    with pytest.raises(ValueError, match="at least one seed"):
        run_recipes(recipes, {"double": [], "square": [0]})
    with pytest.raises(TypeError, match="dict"):
        run_recipes([], [0])
    with pytest.raises(ValueError, match=r"run_recipes \('square'\): seed 1 returned"):
        run_recipes({"square": lambda s: {"x": 1} if s == 0 else {"y": 1}}, [0, 1])


@pytest.mark.skipif(parallel_processes(2) < 2, reason="needs fork and two cores")
def test_a_failure_cancels_the_runs_not_started_and_a_dead_worker_is_reported(tmp_path):
    import os
    import time

    import torch

    def recipe(seed):
        (tmp_path / f"started-{seed}").touch()
        if seed == 0:
            raise ValueError("broken recipe")
        time.sleep(0.5)
        return {"x": seed}

    def dies(seed):
        os._exit(3)  # as a worker killed for memory would

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(RuntimeError, match="seed 0.*broken recipe"):
            run_seeds(recipe, range(12), processes=2)
        with pytest.raises(RuntimeError, match="worker process died"):
            run_seeds(dies, [0, 1], processes=2)
    finally:
        torch.set_num_threads(threads)
    started = len(list(tmp_path.glob("started-*")))
    assert started < 12, f"{started} of 12 runs started after the first one failed"

"""Honest toy experiments: a recipe run over several seeds, compared in pairs, with a verdict.

A conclusion such as "the bias balances better than an auxiliary loss" is a claim about a
distribution over seeds, not about one run. For a metric where lower is better (a loss, MaxVio)
and two methods A and B run on the same seeds s = 1..n (same initialisation and batches per
seed, so the comparison is paired):

    d_s      = a_s - b_s                                   paired difference per seed
    mean, sd = (1/n) Σ d_s,  sqrt(Σ (d_s - mean)² / (n - 1))
    CI95     = mean ± t_{0.975, n-1} · sd / sqrt(n)        Student's t interval of the mean

    verdict  = "A better"      if the whole interval is below 0  (A lower)
               "B better"      if the whole interval is above 0
               "not resolved"  if the interval contains 0 (the toy cannot tell at this noise)

(mirrored when higher is better). With 3 seeds t = 4.303, so only a consistent effect resolves.
Ratios (a/b) are compared on the log scale: d_s = ln a_s - ln b_s, reported as a factor.

API
    run_seeds(recipe, seeds, processes=1) -> dict[str, list]   recipe(seed) -> {name: value}
    run_recipes({name: recipe}, seeds, processes=1) -> {name: run_seeds result}  one shared pool
    compare(a, b, names=("A", "B"), lower_is_better=True, ratio=False) -> Comparison
    Comparison.verdict, .mean, .sd, .ci, .diffs; str(c) is a one-line summary;
    Comparison.expect(verdict) asserts the verdict (AssertionError with the numbers otherwise)
    mean_sd(values) -> (mean, sd); fmt(x) -> 4 significant digits
    parallel_processes(limit=None) -> int   how many processes run_seeds can use here

Seeds in parallel. Seeds are independent runs, so `run_seeds(..., processes=2)` runs them in
two worker processes, one seed at a time each, and returns exactly what a serial run returns,
provided the recipe seeds everything it draws (its initialisation, its batches) instead of
reading the global random state where the previous seed left it. Each worker keeps the set-up of
the process that started it (one thread, float64 default dtype), so no number depends on which
process ran a seed or in which order. Workers are forked (Linux), which is what lets a recipe
defined in a notebook run in them; where fork is unavailable or unsafe (macOS, Windows) the
seeds run one after the other, with the same results. A worker's side effects (a dict it fills)
stay in the worker: a recipe returns everything the caller needs, models included.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import numbers
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch

# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (beyond 30 the normal's 1.96 + a
# small correction is used)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

VERDICTS = ("A better", "B better", "not resolved")


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (df >= 1)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"t975: df must be an int >= 1, got {df!r}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def fmt(x: float, digits: int = 4) -> str:
    """x at `digits` significant digits (the precision stored notebook outputs print)."""
    return f"{x:.{digits}g}"


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); sd is 0 for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_sd: expected at least one value")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def parallel_processes(limit: int | None = None) -> int:
    """Processes `run_seeds` can use on this machine: the usable cores (at most `limit`),
    or 1 where worker processes cannot be forked (anything but Linux)."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"parallel_processes: limit must be None or an int >= 1, got {limit!r}")
    if not sys.platform.startswith("linux"):
        return 1
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, limit or cores))


def _value(value: object) -> object:
    """A metric (a number, or a tensor holding one) becomes a float; anything else is kept."""
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    return value


Recipe = Callable[[int], dict]
_RECIPES: dict[str, Recipe] = {}  # the recipes forked workers run (see _run_jobs)


def _start_worker() -> None:
    torch.set_num_threads(1)  # as the caller (checked in _run_jobs); no forked OpenMP pool


def _run_in_worker(name: str, seed: int) -> bytes:
    # plain pickle: tensors travel by value, not as shared memory (one file descriptor each)
    return pickle.dumps(_RECIPES[name](seed))


def _run_jobs(recipes: dict[str, Recipe], jobs: list[tuple[str, int]], processes: int,
              where: str) -> list:
    """recipes[name](seed) for every (name, seed) job, in order, in `processes` forked workers
    (serially when that is 1 or fork is unavailable)."""
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ValueError(f"{where}: processes must be an int >= 1, got {processes!r}")
    processes = min(processes, len(jobs), parallel_processes())
    if processes == 1:
        return [recipes[name](seed) for name, seed in jobs]
    if torch.get_num_threads() != 1:
        raise ValueError(f"{where}: processes > 1 needs one torch thread in the caller (as "
                         f"dsv3_lab.notebook.setup_notebook sets), got {torch.get_num_threads()}: "
                         f"a worker forked from a multi-threaded pool would hang, and the thread "
                         f"count changes float sums; call torch.set_num_threads(1) first")
    _RECIPES.update(recipes)  # inherited by the forked workers: recipes are never pickled
    # torch imports its compiler stack (torch._dynamo) lazily, at the first optimizer it builds:
    # ~2 s of CPU. Imported here once, every forked worker inherits it instead of importing it.
    importlib.import_module("torch._dynamo")
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker)
    results = []
    try:
        with warnings.catch_warnings():  # fork() of a process with threads (Jupyter, 3.12+)
            warnings.simplefilter("ignore", DeprecationWarning)
            futures = [pool.submit(_run_in_worker, name, seed) for name, seed in jobs]
        for (name, seed), future in zip(jobs, futures, strict=True):
            what = f"seed {seed}" + (f" of recipe {name!r}" if name else "")
            try:
                results.append(pickle.loads(future.result()))
            except BrokenProcessPool:
                raise RuntimeError(f"{where}: a worker process died while running {what} (out "
                                   f"of memory?); run with processes=1 to see the error") from None
            except Exception as error:
                raise RuntimeError(f"{where}: the recipe failed on {what}: "
                                   f"{type(error).__name__}: {error}") from error
    finally:  # after a failure or an interrupt: drop the runs not started, finish the others
        pool.shutdown(wait=True, cancel_futures=True)
        _RECIPES.clear()
    return results


def _collect(results: list, seeds: list[int], where: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for seed, result in zip(seeds, results, strict=True):
        if not isinstance(result, dict):
            raise TypeError(f"{where}: recipe must return a dict of metrics, got "
                            f"{type(result).__name__}")
        if out and set(result) != set(out):
            raise ValueError(f"{where}: seed {seed} returned metrics {sorted(result)}, "
                             f"expected {sorted(out)}")
        for name, value in result.items():
            out.setdefault(name, []).append(_value(value))
    return out


def run_seeds(recipe: Recipe, seeds: Iterable[int], processes: int = 1) -> dict[str, list]:
    """Run recipe(seed) for every seed; collect each returned value into a per-seed list.

    recipe(seed) returns a dict {name: value}, the same names for every seed. Numbers (and
    one-element tensors) are metrics and become floats; any other value (a model, a loss
    history) is kept as it is. processes > 1 runs the seeds in that many forked worker
    processes (module docstring), with the same results; values then travel back pickled.
    The caller must run one torch thread (dsv3_lab.notebook.setup_notebook sets it).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("run_seeds: expected at least one seed")
    results = _run_jobs({"": recipe}, [("", seed) for seed in seeds], processes, "run_seeds")
    return _collect(results, seeds, "run_seeds")


def run_recipes(recipes: dict[str, Recipe], seeds: Iterable[int] | dict[str, Iterable[int]],
                processes: int = 1) -> dict[str, dict[str, list]]:
    """`run_seeds` for several recipes at once: {name: run_seeds(recipes[name], seeds)}.

    seeds is one list for every recipe, or a dict {name: seeds}. All the (recipe, seed) runs
    share one pool of `processes` workers, so they pack onto the cores better than one
    `run_seeds` per recipe (5 seeds on 2 cores take 3 rounds; 3 recipes x 5 seeds take 8).
    """
    if not isinstance(recipes, dict) or not recipes:
        raise TypeError(f"run_recipes: expected a non-empty dict {{name: recipe}}, got "
                        f"{type(recipes).__name__}")
    per = {name: list(seeds[name] if isinstance(seeds, dict) else seeds) for name in recipes}
    empty = [name for name, s in per.items() if not s]
    if empty:
        raise ValueError(f"run_recipes: expected at least one seed for {empty}")
    jobs = [(name, seed) for name, s in per.items() for seed in s]
    results = iter(_run_jobs(recipes, jobs, processes, "run_recipes"))
    return {name: _collect([next(results) for _ in s], s, f"run_recipes ({name!r})")
            for name, s in per.items()}


@dataclass
class Comparison:
    """A paired comparison of method A against method B over the same seeds."""

    names: tuple[str, str]
    a: list[float]
    b: list[float]
    lower_is_better: bool = True
    ratio: bool = False

    @property
    def diffs(self) -> list[float]:
        """Per-seed d_s = a_s - b_s (ln a_s - ln b_s when ratio=True)."""
        if self.ratio:
            return [math.log(x) - math.log(y) for x, y in zip(self.a, self.b, strict=True)]
        return [x - y for x, y in zip(self.a, self.b, strict=True)]

    @property
    def mean(self) -> float:
        return mean_sd(self.diffs)[0]

    @property
    def sd(self) -> float:
        return mean_sd(self.diffs)[1]

    @property
    def ci(self) -> tuple[float, float]:
        """95% t interval of the mean paired difference."""
        n = len(self.diffs)
        half = t975(n - 1) * self.sd / math.sqrt(n)
        return self.mean - half, self.mean + half

    @property
    def verdict(self) -> str:
        """'A better', 'B better' or 'not resolved' (the interval contains 0)."""
        lo, hi = self.ci
        if lo > 0 or hi < 0:
            a_lower = hi < 0
            return "A better" if a_lower == self.lower_is_better else "B better"
        return "not resolved"

    def winner(self) -> str:
        """The name of the better method, or 'not resolved'."""
        v = self.verdict
        return {"A better": self.names[0], "B better": self.names[1]}.get(v, v)

    def __str__(self) -> str:
        (na, nb), n = self.names, len(self.a)
        ma, sa = mean_sd(self.a)
        mb, sb = mean_sd(self.b)
        lo, hi = self.ci
        if self.ratio:
            diff = (f"{na}/{nb} = ×{fmt(math.exp(self.mean), 3)} "
                    f"[×{fmt(math.exp(lo), 3)}, ×{fmt(math.exp(hi), 3)}]")
        else:
            diff = f"{na} − {nb} = {self.mean:+.4g} ± {self.sd:.2g} (95% CI {lo:+.3g} … {hi:+.3g})"
        return (f"{na} {fmt(ma)} ± {fmt(sa, 2)} vs {nb} {fmt(mb)} ± {fmt(sb, 2)} over {n} seeds; "
                f"{diff} → {self.winner()}")

    def expect(self, verdict: str) -> Comparison:
        """Assert the verdict the prose states ('A better', 'B better' or 'not resolved')."""
        if verdict not in VERDICTS:
            raise ValueError(f"expect: verdict must be one of {VERDICTS}, got {verdict!r}")
        assert self.verdict == verdict, f"expected {verdict!r}, measured: {self}"
        return self


def compare(a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("A", "B"),
            lower_is_better: bool = True, ratio: bool = False) -> Comparison:
    """Paired comparison of per-seed results a and b (same seeds, same order); see the module
    docstring. Needs at least 2 seeds; ratio=True compares ln a - ln b (positive values)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"compare: a and b must have one value per seed each, "
                         f"got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"compare: a paired comparison needs at least 2 seeds, got {len(a)}")
    if any(not math.isfinite(x) for x in a + b):
        raise ValueError("compare: every value must be finite")
    if ratio and min(a + b) <= 0:
        raise ValueError("compare: ratio=True needs positive values")
    if len(names) != 2 or not all(isinstance(n, str) for n in names):
        raise TypeError(f"compare: names must be two strings, got {names!r}")
    return Comparison(tuple(names), a, b, lower_is_better, ratio)

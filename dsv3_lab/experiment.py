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
    run_seeds(recipe, seeds) -> dict[str, list[float]]   recipe(seed) -> {metric: value}
    compare(a, b, names=("A", "B"), lower_is_better=True, ratio=False) -> Comparison
    Comparison.verdict, .mean, .sd, .ci, .diffs; str(c) is a one-line summary;
    Comparison.expect(verdict) asserts the verdict (AssertionError with the numbers otherwise)
    mean_sd(values) -> (mean, sd); fmt(x) -> 4 significant digits
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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


def run_seeds(recipe: Callable[[int], dict], seeds: Iterable[int]) -> dict[str, list[float]]:
    """Run recipe(seed) for every seed; collect each returned metric into a per-seed list."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("run_seeds: expected at least one seed")
    out: dict[str, list[float]] = {}
    for seed in seeds:
        result = recipe(seed)
        if not isinstance(result, dict):
            raise TypeError(f"run_seeds: recipe must return a dict of metrics, got "
                            f"{type(result).__name__}")
        if out and set(result) != set(out):
            raise ValueError(f"run_seeds: seed {seed} returned metrics {sorted(result)}, "
                             f"expected {sorted(out)}")
        for name, value in result.items():
            out.setdefault(name, []).append(float(value))
    return out


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

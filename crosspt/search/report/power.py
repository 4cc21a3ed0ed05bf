"""How many design trials a question needs: the power of the report's test (`stats.py`) for a
best-vs-worst difference, the smallest difference a search could have detected with 80% power, and the
number of design trials that would detect a given one. Plain numbers in and out, like `stats.py`.

The test is the studentized best-vs-worst difference at level `ALPHA / m` (Bonferroni over the `m`
factors tested). Its power is computed under normal errors with the measured residual sd, a balanced
design (as the design phase deals it) and the least favourable placement of the other levels for a given
best-vs-worst difference (half-way between the two: any other placement only helps):

- 2 levels: the test is a two-sample t test, whose power is statsmodels' `TTestIndPower` (two-sided, since
  best and worst are picked after the fact).
- 3 or more levels: statsmodels has no power for the studentized range (Tukey) test, and its ANOVA F power
  (`FTestAnovaPower`) is another test's: the power is simulated through the same statistic (level means
  and a residual variance drawn from their normal-theory distributions, the range of the means over its
  standard error against its own quantile at no effect, which the permutation quantile estimates),
  20000 draws with a fixed seed, so the answers are smooth in the effect and repeatable.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from crosspt.search.report.stats import ALPHA, FactorResult, attainable as stats_attainable

POWER = 0.8
N_DRAWS = 20000
MAX_EFFECT_SD = 15.0                # a difference only detectable beyond 15 residual sds reads "none detectable"
MAX_TRIALS = 4000                   # "more than this many design trials" is an answer of its own


@lru_cache(maxsize=4096)
def power(effect_sd: float, levels: int, per_level: int, alpha: float, df: int | None = None) -> float:
    """Power of the test for a best-vs-worst difference of `effect_sd` residual sds, `levels` levels of
    `per_level` trials each, at level `alpha` (already divided by the factors tested); `df` residual
    degrees of freedom (default: `levels * (per_level - 1)`, the factor alone)."""
    df = levels * (per_level - 1) if df is None else df
    if per_level < 2 or df < 1 or not attainable(levels, per_level, alpha):
        return 0.0
    if levels == 2:
        from statsmodels.stats.power import TTestIndPower

        # statsmodels takes df = 2 * per_level - 2; the adjusted model has fewer, at most a few
        p = float(TTestIndPower().power(effect_size=effect_sd, nobs1=per_level, alpha=alpha, ratio=1.0,
                                        alternative="two-sided"))
        if not math.isnan(p):
            return p
        # scipy's noncentral t returns nan far in its tail (power near 1): the same test, simulated
    return _simulated(effect_sd, levels, per_level, alpha, df)


def attainable(levels: int, per_level: int, alpha: float) -> bool:
    """Whether the permutation test can reach `alpha` at all with `levels` levels of `per_level` trials
    (`stats.attainable`). 8 trials in 2 levels of 4 give p >= 1/35 = 0.029, above 0.05 / 5 factors, so no
    difference of any size is detected there; the normal theory above does not know that floor."""
    return stats_attainable(np.full(levels, per_level), alpha)


def _draws(levels: int, df: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard normal level means (before scaling) and residual sds over sigma: `(N_DRAWS, levels)`, `(N_DRAWS,)`.
    The same seed for every call, so power is smooth in the effect and exactly `alpha` at no effect."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((N_DRAWS, levels)), np.sqrt(rng.chisquare(df, N_DRAWS) / df)


@lru_cache(maxsize=None)
def _critical(levels: int, df: int, alpha: float) -> float:
    """The critical value of the studentized best-vs-worst difference under normal errors: its (1 - alpha)
    quantile at no effect over the same draws (scale-free: it depends on the levels and df only). Drawn
    rather than `scipy.stats.studentized_range.ppf`, which integrates numerically at 0.25 s a call and is
    asked for many df."""
    z, s = _draws(levels, df)
    return float(np.quantile((z.max(axis=1) - z.min(axis=1)) / (s * math.sqrt(2)), 1 - alpha))


def _simulated(effect_sd: float, levels: int, per_level: int, alpha: float, df: int) -> float:
    """The power of the studentized best-vs-worst test under normal errors, by simulation (module
    docstring): level means and a residual sd drawn, against the critical value at no effect."""
    z, s = _draws(levels, df)
    mu = np.zeros(levels)
    mu[0], mu[1] = effect_sd / 2, -effect_sd / 2
    means = mu * math.sqrt(per_level) + z                  # in units of sigma / sqrt(per_level)
    t = (means.max(axis=1) - means.min(axis=1)) / (s * math.sqrt(2))
    return float(np.mean(t > _critical(levels, df, alpha)))


def detectable(levels: int, per_level: int, alpha: float, df: int | None = None, target: float = POWER) -> float:
    """The smallest best-vs-worst difference, in residual sds, found with power `target`."""
    from scipy.optimize import brentq

    if power(MAX_EFFECT_SD, levels, per_level, alpha, df) < target:
        return math.inf
    return float(brentq(lambda d: power(round(d, 4), levels, per_level, alpha, df) - target, 1e-3, MAX_EFFECT_SD,
                        xtol=1e-3))


def trials_needed(effect_sd: float, levels: int, alpha: float, target: float = POWER) -> int | None:
    """The fewest design trials (balanced over `levels`) whose test finds a best-vs-worst difference of
    `effect_sd` residual sds with power `target`; None beyond `MAX_TRIALS`."""
    if not effect_sd or not math.isfinite(effect_sd):
        return None
    lo, hi = 2, 2
    while power(abs(effect_sd), levels, hi, alpha) < target:
        lo, hi = hi, hi * 2
        if hi * levels > MAX_TRIALS:
            return None
    while hi - lo > 1:                                  # power grows with the trials per level
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if power(abs(effect_sd), levels, mid, alpha) < target else (lo, mid)
    return hi * levels


def add_power(res: FactorResult, m: int) -> None:
    """For a factor without a detected effect: the smallest difference this search could have detected
    with 80% power (`mde`, objective units) and the design trials that would detect its estimate
    (`trials_needed`), from its measured residual sd."""
    if res.resid_sd is None or not res.resid_sd > 0 or len(res.levels) < 2 or res.df is None:
        return
    k = len(res.levels)
    per = max(res.n // k, 1)
    alpha = ALPHA / max(m, 1)
    res.mde = detectable(k, per, alpha, max(int(res.df), 1)) * res.resid_sd
    if res.estimate is not None:
        res.trials_needed = trials_needed(abs(res.estimate) / res.resid_sd, k, alpha)

"""The report's statistics: per factor, a test of "this factor changes the objective", its effect with a
confidence interval, and its importance with a noise baseline. Plain rows in, numbers out: no MLflow, no
plotting, so the calibration benchmark (`crosspt.bench.report_calibration`) runs exactly this code.

Why these methods (measured in benchmarks/report_calibration.md):

- **Test: a randomisation (permutation) test per factor** (`scipy.stats.permutation_test`). A random or
  QMC searcher assigns each trial's level independently of everything else, so under "this factor does
  nothing" its levels are exchangeable across trials and permuting them gives the exact null distribution
  of any statistic, whatever the objective's distribution (bounded, tied, skewed accuracies), at 2 trials
  per level, with any number of levels. The statistic is the factor's sum of squares in an additive
  linear model of the objective after the other factors that visibly matter (`SCREEN_P`): a factor with
  a large effect (a learning rate over four decades) then stops counting as noise for the others, and
  since only this factor's column is permuted and the adjustment set is chosen without looking at it,
  the test stays exact. Adjusting for every factor instead spends the few trials on fitting factors
  that do nothing (power at 24 trials and 6 factors: 25% against 55% for screening, 62% for none;
  with a strong second factor: 42% and 82% against 60%). A parametric F test would need normal
  errors; a bootstrap test undercovers at 2-4 trials per level.
- **Correction across the factors of one report: Holm** (`holm`, the numbers of statsmodels' `multipletests`). The report's
  promise is "every `effect` line is real" (family-wise error), not "a proportion of them is" (BH's false
  discovery rate): a search has few factors (2-12), where Holm loses little power against BH, and it
  holds under any dependence between the tests (they share the objective).
- **Effect: best level minus worst, with a simultaneous interval.** Level means come from the same
  additive model (`statsmodels` OLS). The interval of the best-vs-worst difference is Tukey's
  simultaneous interval over all pairs of levels (studentized range, `scipy.stats.studentized_range`):
  it covers every pair at once, so it still covers the pair picked after the fact as best and worst. The
  point estimate corrects the plug-in difference for that pick (winner's curse): level means are redrawn
  from their estimated sampling distribution, the best and worst are picked again in each draw, and the
  average overshoot is subtracted.
- **Importance: the share of the objective's variance the factor explains** (its sum of squares above
  over the total), shown with its noise level: the 95th percentile of the same share when the factor's
  levels are shuffled (the permutation test's own null draws). A share below its noise level is what a
  factor without effect shows. One method, the same numbers in the report, the parent run's plot and
  the Optuna study (`store.py`).

Repeats (`budget.repeats`): a trial's number is the mean of its repeats; the trial is the unit that was
randomised, so the repeats make that number less noisy and need no model of their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Sequence

import numpy as np

from crosspt.search.report.rows import Factor, TrialRow, level_codes

N_PERMUTATIONS = 1999          # p resolution 1/2000, enough for Holm's alpha/12 on a 12-factor space
N_SELECTION_DRAWS = 2000       # draws of level means for the winner's-curse correction
SEED = 0
ALPHA = 0.05
MIN_TRIALS_PER_LEVEL = 2       # a level seen once has no spread of its own: left out of its factor's test
# A factor's test adjusts for the other factors whose levels alone explain the objective at this level
# (one-way ANOVA), while the model keeps ADJUST_DF residual degrees of freedom and a quarter of the
# trials: fitting more eats the data the factor's own effect needs. Chosen by simulated power (module
# docstring); the test's size does not depend on it.
SCREEN_P = 0.05
ADJUST_DF = 6


class Verdict(str, Enum):
    """A factor's verdict in the report and in report.json."""
    EFFECT = "effect"               # adjusted p < ALPHA
    NONE = "none"                   # tested, no detectable effect
    TOO_FEW = "too_few"             # too few trials per level for the test to reach ALPHA
    NOT_VARIED = "not_varied"       # one level sampled
    INACTIVE = "inactive"           # never active in an analysed trial


@dataclass
class LevelStat:
    level: str
    n: int                          # trials at this level
    mean: float                     # adjusted for the other factors when the model is (`FactorResult.adjusted_for`)
    lo: float                       # 95% interval of this level's mean (alone, not simultaneous)
    hi: float


@dataclass
class FactorResult:
    factor: str
    verdict: Verdict
    n: int = 0                                   # trials analysed
    n_per_level: dict[str, int] = field(default_factory=dict)
    levels: list[LevelStat] = field(default_factory=list)
    p: float | None = None
    p_adjusted: float | None = None
    best: str = ""
    worst: str = ""
    estimate: float | None = None                # best - worst, corrected for picking them (objective units)
    raw_estimate: float | None = None            # the plug-in difference of the two means
    ci_low: float | None = None                  # simultaneous 95% interval of best - worst
    ci_high: float | None = None
    importance: float | None = None              # share of the objective's variance
    noise: float | None = None                   # 95th percentile of that share with the levels shuffled
    adjusted_for: list[str] = field(default_factory=list)
    note: str = ""                               # why too_few / not_varied / inactive; levels left out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (see the module docstring for why Holm): the i-th smallest p times the
    number of hypotheses not yet rejected, made monotone, at most 1. Written out rather than through
    statsmodels' `multipletests(method="holm")`, which gives the same numbers (tests/test_report.py
    checks) but runs `gc.collect()` on every call: 0.3 s in a process holding scipy and MLflow, which
    made the 500-search calibration benchmark take hours."""
    p = np.asarray(pvalues, dtype=float)
    if p.size == 0:
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(np.maximum.accumulate(p[order] * np.arange(p.size, 0, -1)), 1.0)
    out = np.empty_like(p)
    out[order] = adjusted
    return out.tolist()


@lru_cache(maxsize=None)
def _tukey_quantile(k: int, df: float) -> float:
    """95% quantile of the studentized range over `k` means with `df` residual degrees of freedom, over
    sqrt(2): the half-width of Tukey's simultaneous interval in standard errors of a difference (the t
    quantile for k = 2). Cached: scipy integrates it numerically (0.2 s a call)."""
    from scipy.stats import studentized_range

    return float(studentized_range.ppf(0.95, k, df)) / math.sqrt(2)


def analyse(factors: Sequence[Factor], rows: Sequence[TrialRow], mode: str = "max", metric: str = "objective",
            n_permutations: int = N_PERMUTATIONS, seed: int = SEED) -> list[FactorResult]:
    """One `FactorResult` per factor, in `factors`' order, over the rows that have a value of `metric`
    ("objective", "test_score" or "rung"); p-values Holm-adjusted across the factors tested here.
    `n_permutations=0`: level means and intervals only, no test."""
    rows = [r for r in rows if r.value(metric) is not None]
    out = [_factor(f, factors, rows, mode, metric, n_permutations, seed + i) for i, f in enumerate(factors)]
    tested = [r for r in out if r.p is not None]
    for r, p_adj in zip(tested, holm([r.p for r in tested])):
        r.p_adjusted = p_adj
        r.verdict = Verdict.EFFECT if p_adj < ALPHA else Verdict.NONE
    return out


def _factor(f: Factor, factors: Sequence[Factor], rows: Sequence[TrialRow], mode: str, metric: str,
            n_permutations: int, seed: int) -> FactorResult:
    names, codes = level_codes(f, rows)
    active = codes >= 0
    n = int(active.sum())
    if n == 0:
        return FactorResult(f.key, Verdict.INACTIVE, note="never active in an analysed trial")
    counts = np.bincount(codes[active], minlength=len(names))
    n_per_level = {name: int(c) for name, c in zip(names, counts)}
    if len(names) < 2:
        return FactorResult(f.key, Verdict.NOT_VARIED, n, n_per_level, note=f"only {names[0]} sampled")
    kept_levels = [k for k in range(len(names)) if counts[k] >= MIN_TRIALS_PER_LEVEL]
    if len(kept_levels) < 2:
        return FactorResult(f.key, Verdict.TOO_FEW, n, n_per_level,
                            note=f"{MIN_TRIALS_PER_LEVEL} trials per level needed in two levels at least")
    # rows of levels seen once leave this factor's analysis: which rows those are depends on the labels
    # only, so the permutation test stays exact given them (the other labels are still exchangeable)
    keep = np.isin(codes, kept_levels)
    sub = [r for r, k in zip(rows, keep) if k]
    remap = {old: new for new, old in enumerate(kept_levels)}
    x = np.array([remap[c] for c in codes[keep]])
    level_names = [names[k] for k in kept_levels]
    y = np.array([r.value(metric) for r in sub], dtype=float)
    res = FactorResult(f.key, Verdict.TOO_FEW, n, n_per_level)
    single = [names[k] for k in range(len(names)) if k not in kept_levels]
    if single:
        res.note = f"left out, one trial each: {', '.join(single)}"
    others = [g for g in factors if g.key != f.key]
    Z, adjusted_for = _adjusters(others, sub, x, len(level_names), y)
    res.adjusted_for = adjusted_for
    res.levels, model = _level_means(x, level_names, y, Z)
    if model is not None:
        _best_vs_worst(res, *model, mode, seed)
    if n_permutations <= 0:              # level means only (test_score): nothing is claimed about them
        return res
    arrangements = _log_arrangements(np.bincount(x))
    if arrangements < math.log(1 / ALPHA) + 1e-9:
        res.note = "; ".join([res.note] * bool(res.note) + [
            f"{len(y)} trials in levels of {'/'.join(str(c) for c in np.bincount(x))}: p cannot fall below {ALPHA}"])
        return res
    total = float(((y - y.mean()) ** 2).sum())
    if total <= 0:                       # every trial scored the same: nothing to attribute
        res.p, res.importance, res.noise = 1.0, 0.0, 0.0
        return res
    res.p, share, null = _permutation_test(x, len(level_names), y, Z, n_permutations, seed)
    res.importance, res.noise = share / total, float(np.quantile(null, 0.95)) / total
    return res


def _log_arrangements(counts: np.ndarray) -> float:
    """log of the number of distinct values the permutation statistic can take at most: the ways to deal
    these level counts over the trials (multinomial), over the relabellings of levels of equal size,
    which leave a sum of squares unchanged (3 levels x 2 trials: 90 / 3! = 15, so p >= 1/15)."""
    sizes = np.bincount(counts)
    return (math.lgamma(counts.sum() + 1) - sum(math.lgamma(c + 1) for c in counts)
            - sum(math.lgamma(m + 1) for m in sizes))


def _onehot(codes: np.ndarray, k: int) -> np.ndarray:
    return (codes[..., None] == np.arange(k)).astype(float)


def _adjusters(others: Sequence[Factor], rows: Sequence[TrialRow], x: np.ndarray, k: int,
               y: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The columns this factor is tested beyond: the other factors whose levels alone explain `y`
    (one-way ANOVA p < `SCREEN_P`; chosen from `y` and their own levels only, never from this factor's,
    so permuting this factor stays exact), one-hot with the first level dropped and inactive as a level of
    its own, centred. None when they would leave fewer than `ADJUST_DF` residual degrees of freedom (or
    a quarter of the trials), or when one is confounded with this factor."""
    from scipy.stats import f_oneway

    cols, keys = [], []
    for g in others:
        _, codes = level_codes(g, rows)
        distinct = np.unique(codes)
        if len(distinct) < 2 or len(distinct) >= len(y):
            continue
        codes = np.searchsorted(distinct, codes)
        with np.errstate(all="ignore"):
            p = f_oneway(*[y[codes == c] for c in range(len(distinct))]).pvalue
        if not p < SCREEN_P:                     # nan (no spread) counts as no evidence
            continue
        cols.append(_onehot(codes, len(distinct))[:, 1:])
        keys.append(g.key)
    n = len(x)
    if not cols:
        return np.zeros((n, 0)), []
    # centred, then an orthonormal basis of what the columns span: two adjusters may share columns (the
    # same trials inactive in both), and the level means only need the space they span
    u, sv, _ = np.linalg.svd(np.hstack(cols) - np.hstack(cols).mean(axis=0), full_matrices=False)
    Z = u[:, sv > sv[0] * 1e-10]
    full = np.hstack([np.ones((n, 1)), _onehot(x, k)[:, 1:], Z])
    rank_full = np.linalg.matrix_rank(full)
    if rank_full < k + Z.shape[1] or n - rank_full < max(ADJUST_DF, n / 4):    # confounded, or too few left
        return np.zeros((n, 0)), []
    return Z, keys


def _residual_basis(Z: np.ndarray, n: int) -> np.ndarray:
    """An orthonormal basis of the intercept and `Z`'s columns (what the factor is tested beyond)."""
    A = np.hstack([np.ones((n, 1)), Z])
    u, s, _ = np.linalg.svd(A, full_matrices=False)
    return u[:, s > s[0] * 1e-10]


def _permutation_test(x: np.ndarray, k: int, y: np.ndarray, Z: np.ndarray, n_permutations: int,
                      seed: int) -> tuple[float, float, np.ndarray]:
    """(p, observed sum of squares, null sums of squares): the factor's sum of squares after the
    intercept and `Z`, with the factor's levels permuted across the trials (scipy enumerates every
    permutation when there are no more than `n_permutations`)."""
    from scipy.stats import permutation_test

    Q = _residual_basis(Z, len(y))
    y_res = y - Q @ (Q.T @ y)

    counts = np.bincount(x, minlength=k).astype(float)

    def ss(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        D = _onehot(x[idx], k)                                   # (..., n, k) the permuted levels
        if Q.shape[1] == 1:
            # intercept only: the one-way between-level sum of squares (y_res sums to 0)
            return ((np.swapaxes(D, -1, -2) @ y_res) ** 2 / counts).sum(axis=-1)
        D = D - Q @ (Q.T @ D)                                    # the levels beyond the adjusters
        v = np.swapaxes(D, -1, -2) @ y_res                       # (..., k)
        G = np.swapaxes(D, -1, -2) @ D                           # (..., k, k), rank k - 1 at most
        return np.einsum("...k,...kl,...l->...", v, np.linalg.pinv(G, rcond=1e-10, hermitian=True), v)

    r = permutation_test((np.arange(len(y)),), ss, permutation_type="pairings", vectorized=True,
                         n_resamples=n_permutations, alternative="greater", rng=np.random.default_rng(seed))
    return float(r.pvalue), float(r.statistic), np.asarray(r.null_distribution)


def _level_means(x: np.ndarray, names: list[str], y: np.ndarray, Z: np.ndarray):
    """Each level's mean (at the average of the other factors when `Z` has columns) with its 95% interval,
    and the model (means, their covariance, residual df) for the best-vs-worst interval; no model
    without residual degrees of freedom."""
    from scipy.stats import t
    from statsmodels.regression.linear_model import OLS

    k = len(names)
    X = np.hstack([_onehot(x, k), Z])
    counts = np.bincount(x, minlength=k)
    fit = OLS(y, X).fit()
    means = np.asarray(fit.params[:k])
    if fit.df_resid < 1:
        return [LevelStat(nm, int(c), float(m), math.nan, math.nan) for nm, c, m in zip(names, counts, means)], None
    cov = np.asarray(fit.cov_params())[:k, :k]
    half = t.ppf(0.975, fit.df_resid) * np.sqrt(np.diag(cov))
    levels = [LevelStat(nm, int(c), float(m), float(m - h), float(m + h))
              for nm, c, m, h in zip(names, counts, means, half)]
    return levels, (means, cov, float(fit.df_resid))


def _best_vs_worst(res: FactorResult, means: np.ndarray, cov: np.ndarray, df: float, mode: str, seed: int) -> None:
    """Best and worst level by their means; the difference with Tukey's simultaneous 95% interval (valid
    for the pair picked after the fact) and with the pick's overshoot subtracted (see module docstring)."""
    sign = 1.0 if mode == "max" else -1.0
    k = len(means)
    b, w = int(np.argmax(sign * means)), int(np.argmin(sign * means))
    raw = float(means[b] - means[w])
    se = math.sqrt(max(cov[b, b] + cov[w, w] - 2 * cov[b, w], 0.0))
    q = _tukey_quantile(k, df)
    lo, hi = raw - q * se, raw + q * se
    draws = np.random.default_rng(seed).multivariate_normal(means, cov, size=N_SELECTION_DRAWS, method="eigh")
    bd, wd = np.argmax(sign * draws, axis=1), np.argmin(sign * draws, axis=1)
    rows = np.arange(len(draws))
    overshoot = float(np.mean((draws[rows, bd] - draws[rows, wd]) - (means[bd] - means[wd])))
    # the corrected difference keeps the picked direction (at worst no difference) and stays in its interval
    lower, upper = (max(lo, 0.0), hi) if sign > 0 else (lo, min(hi, 0.0))
    est = float(np.clip(raw - overshoot, lower, upper))
    names = [lv.level for lv in res.levels]
    res.best, res.worst, res.raw_estimate, res.estimate, res.ci_low, res.ci_high = names[b], names[w], raw, est, lo, hi

"""The report's statistics: per factor, a test of "this factor changes the objective", its effect with a
confidence interval, and its importance with a noise baseline. Plain rows in, numbers out: no MLflow, no
plotting, so the calibration benchmark (`benchmarks.report_calibration`) runs exactly this code.

Why these methods (measured in benchmarks/report_calibration.md):

- **Test: a randomisation (permutation) test per factor.** In the search's design trials each factor's
  levels are balanced and dealt by a random permutation (`crosspt.search.design`; a `random` or `qmc`
  searcher whose trials all finished draws them independently), so under "this factor does nothing" its
  levels are exchangeable across trials and permuting them gives the exact null distribution of any
  statistic, whatever the objective's distribution (bounded, tied, skewed accuracies), at 2 trials per
  level, with any number of levels. The model is additive in this factor and the other factors that
  visibly matter (`SCREEN_P`): a factor with a large effect (a learning rate over four decades) then
  stops counting as noise for the others, and since only this factor's column is permuted and the
  adjustment set is chosen without looking at it, the test stays exact. Adjusting for every factor
  instead spends the few trials on fitting factors that do nothing. A parametric test would need normal
  errors; a bootstrap test undercovers at 2-4 trials per level.
- **One construction for test, interval and verdict.** The statistic is the studentized best-vs-worst
  difference `T = |mean_best - mean_worst| / se` in that model (`statsmodels` OLS level means; best and
  worst by the model's level means, picked again in every permutation). Its permutation distribution
  gives both the p-value and the critical value `q` at level `ALPHA / m` (Bonferroni over the `m` factors
  tested in one report), and the printed interval is `difference -+ q * se`. So `effect` <=> `T > q` <=>
  the interval excludes 0 <=> the adjusted p < `ALPHA`, by construction, ties included (`_decide`;
  tests/test_report.py checks it over hundreds of simulated searches). The construction before it (a sum
  of squares test with Holm, Tukey's normal-theory interval beside it) could disagree: 6 of 80 `effect`
  verdicts had an interval covering 0 in 400 simulated searches of 5 levels x 3 trials.
  Bonferroni rather than Holm: Holm's step-down has no interval that matches its rejections (intervals
  compatible with Holm say nothing beyond the sign for a rejected hypothesis, Strassburger & Bretz 2008),
  and with the 2-12 factors of a search its extra power is small (its first step is Bonferroni's). The
  studentized difference rather than the sum of squares: it is the statistic the interval is about
  (Tukey's, whose normal-theory quantile the permutation quantile replaces: no normality assumed); for 2
  levels the two are the same test. The interval covers the true difference of the two named levels
  where the permutation distribution of `T` approximates its sampling distribution (location shifts;
  measured in benchmarks/report_calibration.md).
- **Estimate:** the plug-in difference overshoots when best and worst are picked after the fact (winner's
  curse): level means are redrawn from their estimated sampling distribution, best and worst are picked
  again in each draw, and the average overshoot is subtracted; the result keeps the picked direction and
  stays inside the interval.
- **Importance: the share of the objective's variance the factor explains** (its sum of squares above
  over the total), shown with its noise level: the 95th percentile of the same share when the factor's
  levels are shuffled (the permutation test's own null draws). A share below its noise level is what a
  factor without effect shows. One method, the same numbers in the report, the parent run's plot and
  the Optuna study (`store.py`).

Repeats (`budget.repeats`): a trial's number is the mean of its repeats; the trial is the unit that was
randomised, so the repeats make that number less noisy and need no model of their own.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

import numpy as np

from crosspt.search.report.rows import Factor, TrialRow, level_codes

N_PERMUTATIONS = 1999          # p resolution 1/2000, enough for Bonferroni's alpha/12 on a 12-factor space
N_SELECTION_DRAWS = 2000       # draws of level means for the winner's-curse correction
SEED = 0
ALPHA = 0.05
TIE = 1e-9                     # relative: a permuted statistic this close to the observed one counts as a tie
MIN_TRIALS_PER_LEVEL = 2       # a level seen once has no spread of its own: left out of its factor's test
# A factor's test adjusts for the other factors whose levels alone explain the objective at this level
# (one-way ANOVA), while the model keeps ADJUST_DF residual degrees of freedom and a quarter of the
# trials: fitting more eats the data the factor's own effect needs. Chosen by simulated power (module
# docstring); the test's size does not depend on it.
SCREEN_P = 0.05
ADJUST_DF = 6


class Verdict(str, Enum):
    """A factor's verdict in the report and in report.json."""
    EFFECT = "effect"               # adjusted p < ALPHA in a randomised design: the interval excludes 0
    HINT = "hint"                   # the same test passed on trials that are not a randomised design
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
    se: float | None = None                      # its standard error in the additive model
    ci_low: float | None = None                  # raw_estimate -+ critical * se: excludes 0 <=> effect/hint
    ci_high: float | None = None
    critical: float | None = None                # the permutation critical value of |raw| / se at `alpha`
    alpha: float | None = None                   # ALPHA / factors tested (Bonferroni)
    resid_sd: float | None = None                # residual sd of the additive model (objective units)
    df: float | None = None                      # its residual degrees of freedom
    mde: float | None = None                     # smallest best - worst detectable with 80% power here (power.py)
    trials_needed: int | None = None             # design trials that detect the estimate with 80% power
    importance: float | None = None              # share of the objective's variance
    noise: float | None = None                   # 95th percentile of that share with the levels shuffled
    adjusted_for: list[str] = field(default_factory=list)
    note: str = ""                               # why too_few / not_varied / inactive; levels left out
    null: tuple | None = field(default=None, repr=False)   # (null statistics, observed, exact) for `_decide`


def analyse(factors: Sequence[Factor], rows: Sequence[TrialRow], mode: str = "max", metric: str = "objective",
            n_permutations: int = N_PERMUTATIONS, seed: int = SEED, hint: bool = False) -> list[FactorResult]:
    """One `FactorResult` per factor, in `factors`' order, over the rows that have a value of `metric`
    ("objective", "assess", "test_score" or "rung"); each tested factor's test and best-vs-worst interval
    at the Bonferroni level `ALPHA / m` over the `m` factors tested here (module docstring), so that
    `effect` <=> the printed interval excludes 0 <=> the adjusted p < `ALPHA`. `hint`: the rows are not a
    randomised design (adaptive trials, or survivors of pruning): a would-be `effect` is `hint`.
    `n_permutations=0`: level means and intervals only, no test."""
    rows = [r for r in rows if r.value(metric) is not None]
    out = [_factor(f, factors, rows, mode, metric, n_permutations, seed + i) for i, f in enumerate(factors)]
    tested = [r for r in out if r.p is not None]
    for r in tested:
        _decide(r, len(tested), hint)
    return out


def _decide(res: FactorResult, m: int, hint: bool) -> None:
    """The verdict, adjusted p and interval of a tested factor among `m`, from one critical value: `q`, the
    smallest studentized best-vs-worst difference whose permutation p is below `ALPHA / m`. The p counts
    null values at or above the observed one within a relative `TIE`, and `q` is the null value at that
    count's limit (widened by the same tolerance), so `T > q` and `p * m < ALPHA` are the same event, ties
    included."""
    res.p_adjusted, res.alpha = min(1.0, res.p * m), ALPHA / m
    if res.null is None:                               # every trial scored the same
        res.verdict = Verdict.NONE
        return
    null, t0, exact = res.null
    n = len(null)
    add = 0 if exact else 1                            # a random draw of permutations counts the observed one
    c = ALPHA / m * (n + add) - add                    # p < ALPHA / m  <=>  #{null >= T} < c
    j = math.ceil(c) - 1                               # ... <=> #{null >= T} <= j  <=>  T > (j+1)-th largest
    if j < 0:
        res.verdict = Verdict.TOO_FEW
        res.note = "; ".join([res.note] * bool(res.note) + [
            f"{n} permutations: p cannot fall below {ALPHA}/{m} (Bonferroni over {m} factors)"])
        return
    q = float(np.sort(null)[::-1][j]) / (1 - TIE)      # T > q  <=>  T (1 - TIE) > that null value
    res.critical = q
    # the standard error as the statistic saw it (|raw| / T: the same number as the OLS one, but from the
    # same floating-point path as T, so that the interval's sign and `T > q` cannot part at the last digit)
    raw = res.raw_estimate
    se = abs(raw) / t0 if t0 > 0 else res.se
    res.ci_low, res.ci_high = raw - q * se, raw + q * se
    # the corrected difference keeps the picked direction (at worst no difference) and stays in its interval
    sign = 1.0 if raw >= 0 else -1.0
    lower, upper = (max(res.ci_low, 0.0), res.ci_high) if sign > 0 else (res.ci_low, min(res.ci_high, 0.0))
    res.estimate = float(np.clip(res.estimate, lower, upper))
    effect = t0 > q
    res.verdict = (Verdict.HINT if hint else Verdict.EFFECT) if effect else Verdict.NONE


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
    if n_permutations <= 0 or model is None:    # level means only (test_score): nothing is claimed about them
        return res
    if not attainable(np.bincount(x), ALPHA):
        res.note = "; ".join([res.note] * bool(res.note) + [
            f"{len(y)} trials in levels of {'/'.join(str(c) for c in np.bincount(x))}: p cannot fall below {ALPHA}"])
        return res
    total = float(((y - y.mean()) ** 2).sum())
    if total <= 0:                       # every trial scored the same: nothing to attribute
        res.p, res.importance, res.noise, res.ci_low, res.ci_high = 1.0, 0.0, 0.0, 0.0, 0.0
        res.verdict = Verdict.NONE
        return res
    idx, exact = _permutations(len(y), n_permutations, seed)
    t, ss = _permuted_statistics(np.concatenate([x[None], x[idx]]), len(level_names), y, Z, mode)
    t0, null, null_ss = float(t[0]), t[1:], ss[1:]          # exact: the identity is among the null's rows
    res.p = (int(np.sum(null >= t0 * (1 - TIE))) + (0 if exact else 1)) / (len(null) + (0 if exact else 1))
    res.null = (null, t0, exact)
    res.importance, res.noise = float(ss[0]) / total, float(np.quantile(null_ss, 0.95)) / total
    return res


def attainable(counts: np.ndarray, alpha: float) -> bool:
    """Whether a permutation test of levels with these trial counts can give p < `alpha` at all: its p-value is
    at least one over the number of distinct arrangements (`_log_arrangements`)."""
    return _log_arrangements(counts) >= math.log(1 / alpha) + 1e-9


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


def _permutations(n: int, n_permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """`(B, n)` index arrays: every permutation of `n` trials when there are no more than
    `n_permutations` (exact; the identity first), else `n_permutations` random ones. Drawn here rather than
    inside `scipy.stats.permutation_test` because the test statistic and the importance's sum of squares
    must be computed on the same permutations (one call each to scipy would draw them twice)."""
    if math.factorial(n) <= n_permutations:
        return np.array(list(itertools.permutations(range(n)))), True
    rng = np.random.default_rng(seed)
    return rng.permuted(np.tile(np.arange(n), (n_permutations, 1)), axis=1), False


def _permuted_statistics(xs: np.ndarray, k: int, y: np.ndarray, Z: np.ndarray,
                         mode: str) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `xs` (`(B, n)` level codes, a permutation of the factor's levels): the studentized
    best-vs-worst difference `|mean_best - mean_worst| / se` in the additive model `y ~ levels + Z` (best
    and worst by the model's level means in `mode`), and the factor's sum of squares beyond `[1, Z]`
    (the importance). `(B,)` each."""
    n = len(y)
    D = _onehot(xs, k)                                           # (B, n, k)
    X = np.concatenate([D, np.broadcast_to(Z, (len(xs), *Z.shape))], axis=-1)     # (B, n, k + p)
    XtX_inv = np.linalg.pinv(np.swapaxes(X, -1, -2) @ X, rcond=1e-10, hermitian=True)
    beta = np.einsum("bij,bj->bi", XtX_inv, np.swapaxes(X, -1, -2) @ y)     # (B, k + p)
    resid = y - np.einsum("bnj,bj->bn", X, beta)
    df = n - k - Z.shape[1]
    s2 = (resid ** 2).sum(axis=-1) / max(df, 1)
    means = beta[:, :k] * (1.0 if mode == "max" else -1.0)
    rows = np.arange(len(xs))
    b, w = np.argmax(means, axis=1), np.argmin(means, axis=1)
    var = XtX_inv[rows, b, b] + XtX_inv[rows, w, w] - 2 * XtX_inv[rows, b, w]
    se = np.sqrt(np.maximum(s2 * var, 1e-300))
    t = (means[rows, b] - means[rows, w]) / se
    Q = _residual_basis(Z, n)
    y_res = y - Q @ (Q.T @ y)
    Dr = D - Q @ (Q.T @ D)                                       # the levels beyond the adjusters
    v = np.swapaxes(Dr, -1, -2) @ y_res                          # (B, k)
    G = np.swapaxes(Dr, -1, -2) @ Dr                             # (B, k, k), rank k - 1 at most
    ss = np.einsum("bk,bkl,bl->b", v, np.linalg.pinv(G, rcond=1e-10, hermitian=True), v)
    return t, ss


def _level_means(x: np.ndarray, names: list[str], y: np.ndarray, Z: np.ndarray):
    """Each level's mean (at the average of the other factors when `Z` has columns) with its 95% interval,
    and the model (means, their covariance, residual df, residual sd) for the best-vs-worst difference;
    no model without residual degrees of freedom."""
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
    return levels, (means, cov, float(fit.df_resid), math.sqrt(max(float(fit.scale), 0.0)))


def _best_vs_worst(res: FactorResult, means: np.ndarray, cov: np.ndarray, df: float, resid_sd: float, mode: str,
                   seed: int) -> None:
    """Best and worst level by their means, their difference and its standard error (the interval comes
    with the test, `_decide`), and the difference with the pick's overshoot subtracted (module docstring)."""
    sign = 1.0 if mode == "max" else -1.0
    b, w = int(np.argmax(sign * means)), int(np.argmin(sign * means))
    raw = float(means[b] - means[w])
    se = math.sqrt(max(cov[b, b] + cov[w, w] - 2 * cov[b, w], 0.0))
    draws = np.random.default_rng(seed).multivariate_normal(means, cov, size=N_SELECTION_DRAWS, method="eigh")
    bd, wd = np.argmax(sign * draws, axis=1), np.argmin(sign * draws, axis=1)
    rows = np.arange(len(draws))
    overshoot = float(np.mean((draws[rows, bd] - draws[rows, wd]) - (means[bd] - means[wd])))
    est = raw - overshoot
    est = max(est, 0.0) if sign > 0 else min(est, 0.0)          # at worst no difference, never reversed
    names = [lv.level for lv in res.levels]
    res.best, res.worst, res.raw_estimate, res.estimate, res.se = names[b], names[w], raw, est, se
    res.resid_sd, res.df = resid_sd, df

"""The design phase of a search: its first trials, chosen so that the report can attribute effects.

A design trial's levels are not chosen by the optimiser: each factor's levels are balanced over the
trials where the factor acts (as equal counts as the number allows, the remainder levels drawn at
random), and dealt to those trials by a uniformly random permutation seeded by `search.seed`. Given
the multiset of levels, every arrangement is equally likely, so permuting a factor's levels across the
design trials gives the exact null distribution of any statistic: the report's permutation test is
exact for the design actually run, whatever the objective's distribution.

- A choice factor's levels are its values; an int factor with fixed bounds and at most
  `MAX_LEVELS_AS_IS` values likewise. Every other numeric factor is stratified: its range (on the log
  scale for `loguniform` or `log: true`) is cut in `N_STRATA` equal strata, the stratum is the level that
  is balanced and permuted, and the value is drawn uniformly inside it. The report takes the stratum
  (the child run's `crosspt.stratum.<key>` tag) as the factor's level for design trials.
- Conditional factors: the space is walked in its order, factor by factor over all trials; a factor is
  dealt only to the trials where it exists (`when:`) and acts (the liveness table, `live_given`), given
  the levels already dealt to the earlier factors, exactly as `sample` decides when Optuna asks. A factor
  not active in a trial is not drawn there.

The design is a list of `DesignPoint`s, enqueued in the Optuna study before anything else
(`crosspt.search.optuna_glue.make_searcher`): Optuna hands them out first as the study's trials 0..n-1,
so TPE (or random/QMC) continues after them and TPE learns from them like from any completed trial.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from crosspt.config.space import SearchSpace, _resolve_bound, active, live_given

N_STRATA = 3                  # strata of a numeric factor's range: low, middle and high third
MAX_LEVELS_AS_IS = 4          # an int factor with this many values or fewer (fixed bounds) has them as levels
PHASE_TAG = "crosspt.phase"               # child run tag: "design" for a design trial, else "optimiser"
STRATUM_TAG = "crosspt.stratum."          # + factor key: the stratum a design trial's numeric value came from
DESIGN, OPTIMISER = "design", "optimiser"


@dataclass(frozen=True)
class DesignPoint:
    params: dict[str, Any]                               # the trial's values (active factors only)
    strata: dict[str, str] = field(default_factory=dict)  # numeric factor -> its stratum's label


def balanced_levels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """`n` level indices in 0..k-1, each level `n // k` times and `n % k` levels (drawn at random) once
    more, in a uniformly random order. `(n,)` int array. The one randomisation of the design (the
    calibration benchmark simulates searches through it too)."""
    extra = rng.choice(k, size=n % k, replace=False)
    pool = np.concatenate([np.repeat(np.arange(k), n // k), extra]).astype(int)
    return rng.permutation(pool)


def stratum_label(s: int, lo: float | None = None, hi: float | None = None, log: bool = False) -> str:
    """`t1 [0.001, 0.01)`: the stratum's index (from 1, lowest first, so the levels sort in order) and,
    for fixed bounds, its range; `t2` alone when the bounds depend on other factors."""
    if lo is None or hi is None:
        return f"t{s + 1}"
    a, b = stratum_bounds(s, lo, hi, log)
    return f"t{s + 1} [{a:.3g}, {b:.3g}{']' if s == N_STRATA - 1 else ')'}"


def stratum_bounds(s: int, lo: float, hi: float, log: bool) -> tuple[float, float]:
    if log:
        a, b = math.log(lo), math.log(hi)
        return math.exp(a + (b - a) * s / N_STRATA), math.exp(a + (b - a) * (s + 1) / N_STRATA)
    return lo + (hi - lo) * s / N_STRATA, lo + (hi - lo) * (s + 1) / N_STRATA


def value_in_stratum(u: float, lo: float, hi: float, log: bool, integer: bool, step: int = 1):
    """The value at position `u` in [0, 1) of the range (log scale when `log`); ints on their step grid."""
    if integer:
        values = np.arange(int(lo), int(hi) + 1, step)
        if log and len(values) > 1:
            v = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
            return int(values[np.argmin(np.abs(values - v))])
        return int(values[min(int(u * len(values)), len(values) - 1)])
    if log:
        return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))
    return float(lo + u * (hi - lo))


def _fixed(space: SearchSpace, key: str) -> bool:
    p = space.space[key]
    return not isinstance(p.low, str) and not isinstance(p.high, str)


def factor_levels(space: SearchSpace, key: str) -> int:
    """How many levels factor `key` has in the design: its values (a choice, a small fixed int range),
    else `N_STRATA` strata."""
    p = space.space[key]
    if p.type == "choice":
        return len(p.values)
    if not _stratified(space, key):
        return len(range(int(p.low), int(p.high) + 1, p.step or 1))
    return N_STRATA


def _stratified(space: SearchSpace, key: str) -> bool:
    """Whether the factor's design levels are strata of its range (not its values)."""
    p = space.space[key]
    if p.type == "choice":
        return False
    return not (p.type == "int" and _fixed(space, key)
                and len(range(int(p.low), int(p.high) + 1, p.step or 1)) <= MAX_LEVELS_AS_IS)


def make_design(space: SearchSpace, n: int | None = None, family: str | None = None,
                seed: int | None = None) -> list[DesignPoint]:
    """The search's `n` design trials (default `space.design_count()`), seeded by `search.seed`."""
    n = space.design_count() if n is None else n
    if n <= 0:
        return []
    rng = np.random.default_rng([space.search.seed if seed is None else seed, 30])
    base = space.base_tree()
    params: list[dict[str, Any]] = [{} for _ in range(n)]
    strata: list[dict[str, str]] = [{} for _ in range(n)]
    for key, p in space.space.items():
        act = [i for i in range(n) if active(p, params[i], base, key) and live_given(key, params[i], base, family)]
        if not act:
            continue
        stratified = _stratified(space, key)
        if p.type == "choice":
            options: Sequence[Any] = p.values
        elif not stratified:
            options = list(range(int(p.low), int(p.high) + 1, p.step or 1))
        else:
            options = range(N_STRATA)
        codes = balanced_levels(len(act), len(options), rng)
        for i, c in zip(act, codes):
            if not stratified:
                params[i][key] = options[c]
                continue
            lo = _resolve_bound(p.low, params[i], base, key)
            hi = _resolve_bound(p.high, params[i], base, key)
            log = p.type == "loguniform" or p.log
            u = (c + rng.random()) / N_STRATA
            params[i][key] = value_in_stratum(u, lo, hi, log, p.type == "int", p.step or 1)
            strata[i][key] = stratum_label(int(c), *((lo, hi) if _fixed(space, key) else (None, None)), log=log)
    return [DesignPoint(pp, ss) for pp, ss in zip(params, strata)]


def design_tags(point: DesignPoint | None) -> dict[str, str]:
    """The child run's tags telling the report which family a trial belongs to, from MLflow alone."""
    if point is None:
        return {PHASE_TAG: OPTIMISER}
    return {PHASE_TAG: DESIGN, **{STRATUM_TAG + k: v for k, v in point.strata.items()}}


def design_point(ctx_design: list[dict] | None, number: int) -> DesignPoint | None:
    """Trial `number`'s design point from the trial context (`SearchRun.trial_context`), None for an
    optimiser trial. The study hands the enqueued design out first, as its trials 0..n-1."""
    if not ctx_design or not 0 <= number < len(ctx_design):
        return None
    d = ctx_design[number]
    return DesignPoint(dict(d["params"]), dict(d.get("strata") or {}))


# ---- planning: how many design trials a question needs ----------------------------------------------
PLAN_SIZES = (12, 24, 48)


@dataclass
class PlanRow:
    factor: str
    levels: int
    mde: dict[int, float]                    # design trials -> smallest best - worst found with 80% power
    trials_for_effect: int | None = None     # design trials that find `effect` with 80% power


def plan(space: SearchSpace, noise_sd: float, effect: float | None = None,
         sizes: Sequence[int] = ()) -> list[PlanRow]:
    """Per factor of `space`: the smallest best-vs-worst difference its design finds with 80% power at
    the space's design size and at `sizes` (`PLAN_SIZES` by default), in the units of `noise_sd` (a
    trial's residual sd), and the design trials that find `effect`. The report's own test and power
    (`crosspt.search.report.power`), at 0.05 over the number of factors; a conditional factor acts in
    fewer trials than the design has, so its numbers are optimistic by that share."""
    from crosspt.search.report.power import ALPHA, detectable, trials_needed

    m = max(len(space.space), 1)
    sizes = sorted({*(sizes or PLAN_SIZES), *([space.design_count()] if space.design_count() else [])})
    out = []
    for key in space.space:
        k = factor_levels(space, key)
        mde = {n: detectable(k, n // k, ALPHA / m) * noise_sd for n in sizes if n // k >= 2}
        need = trials_needed(effect / noise_sd, k, ALPHA / m) if effect else None
        out.append(PlanRow(key, k, mde, need))
    return out

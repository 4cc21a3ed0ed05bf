"""Calibration of the design-factor report's statistics by simulation: benchmarks/report_calibration.md.

    python -m benchmarks.report_calibration --searches 1000 --out benchmarks/report_calibration.md

Each design is a simulated search: trials with sampled factor levels (a shuffled balanced design, numpy
random sampling, or Optuna's own QMC / TPE samplers asked as a search asks them) and an objective of
0.6 + planted effects + noise (sd 0.06 per trial, `SD`). Every search goes through
`crosspt.search.report.stats.analyse`, the code `build_report` runs, and (for the before/after columns)
through the per-factor `verdict` of the report as it was at `BEFORE_COMMIT`, read from git.

Measured per design: the rate of `effect` verdicts for factors without effect (per factor test), the
family-wise rate (searches with at least one such verdict), the coverage of the best-vs-worst interval
(of the true difference between the two levels the report names), the power for a planted effect, and
the bias of the effect estimate. Monte-Carlo error: +-2 binomial standard errors.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from crosspt.search.design import MAX_LEVELS_AS_IS, N_STRATA, balanced_levels, stratum_label, value_in_stratum
from crosspt.search.report.build import build_report
from crosspt.search.report.rows import Factor, TrialRow, finished, level_codes, with_bins
from crosspt.search.report.stats import ALPHA, Verdict, analyse

SD = 0.06                      # noise sd of one trial's objective (the 0.6 + N(0, 0.06))
BASE = 0.6
BEFORE_COMMIT = "31a7a47"      # main before issue 20: the report whose verdict found effects in noise
_CHECKOUT = Path(__file__).resolve().parents[1]     # the git checkout the old reports are read from
LR_RANGE = (1e-4, 1.0)


@dataclass(frozen=True)
class Spec:
    """One factor of a simulated space: `levels` choices, or a numeric range (`log` for log-uniform,
    `int` for integers)."""
    key: str
    levels: int = 0
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    int: bool = False

    @property
    def factor(self) -> Factor:
        return Factor(self.key, numeric=not self.levels, log=self.log)

    def position(self, value) -> float:
        """Where a value sits in the factor's range, 0..1 (a level's index for choices): planted effects
        are linear in it."""
        if self.levels:
            return int(str(value)[1:]) / (self.levels - 1)
        lo, hi, v = (math.log(self.low), math.log(self.high), math.log(value)) if self.log else (self.low, self.high, value)
        return (v - lo) / (hi - lo)


@dataclass(frozen=True)
class Design:
    name: str
    specs: tuple[Spec, ...]
    trials: int
    sampler: str = "random"                # balanced | random | qmc | tpe
    effects: tuple[tuple[str, float], ...] = ()   # (factor key, spread of its effect in SD)
    repeats: int = 1
    discrete: int = 0                      # objective = accuracy on this many validation examples
    group: str = "null"                    # null | power


CAT = lambda key, k: Spec(key, levels=k)    # noqa: E731
LR = Spec("lr", low=LR_RANGE[0], high=LR_RANGE[1], log=True)
SIX = (CAT("a2", 2), CAT("b3", 3), CAT("c5", 5), LR, Spec("seed", low=0, high=3, int=True), CAT("f2", 2))


def designs() -> list[Design]:
    out = [Design(f"{k} levels, {n} trials per level", (CAT("x", k),), k * n, "balanced")
           for k in (2, 3, 5) for n in (2, 4, 8)]
    out += [Design("numeric (log-uniform lr, terciles), 12 trials", (LR,), 12),
            Design("numeric (log-uniform lr, terciles), 24 trials", (LR,), 24),
            Design("3 levels x 4 trials, repeats 3", (CAT("x", 3),), 12, "balanced", repeats=3),
            Design("3 levels x 4 trials, accuracy on 32 examples (ties)", (CAT("x", 3),), 12, "balanced", discrete=32),
            Design("6-factor space, random, 24 trials", SIX, 24),
            Design("6-factor space, random, 48 trials", SIX, 48),
            Design("6-factor space, Optuna QMC, 24 trials", SIX, 24, "qmc"),
            Design("6-factor space, Optuna TPE (adaptive), 24 trials", SIX, 24, "tpe")]
    for d in (1.0, 2.0):
        out += [Design(f"2 levels x 12 trials, effect {d:g} SD", (CAT("x", 2),), 24, "balanced", (("x", d),), group="power"),
                Design(f"3 levels x 8 trials, effect {d:g} SD", (CAT("x", 3),), 24, "balanced", (("x", d),), group="power"),
                Design(f"numeric lr, 24 trials, effect {d:g} SD", (LR,), 24, effects=(("lr", d),), group="power"),
                Design(f"6-factor space, random, 24 trials, b3 effect {d:g} SD", SIX, 24, effects=(("b3", d),),
                       group="power")]
    out.append(Design("6-factor space, random, 24 trials, a2 effect 2 SD beside an lr effect of 4 SD", SIX, 24,
                      effects=(("a2", 2.0), ("lr", 4.0)), group="power"))
    # TPE with something to find: it concentrates on the good levels, and the other factors' levels ride along
    out.append(Design("6-factor space, Optuna TPE (adaptive), 24 trials, b3 effect 2 SD", SIX, 24, "tpe",
                      effects=(("b3", 2.0),), group="power"))
    return out


# ---- simulated searches --------------------------------------------------------------------------
def _draw(spec: Spec, u: float):
    """A factor's value from a uniform draw `u` in [0, 1) (how Optuna's samplers map their draws)."""
    if spec.levels:
        return f"l{min(int(u * spec.levels), spec.levels - 1)}"
    if spec.int:
        return int(min(spec.low + math.floor(u * (spec.high - spec.low + 1)), spec.high))
    if spec.log:
        return float(math.exp(math.log(spec.low) + u * (math.log(spec.high) - math.log(spec.low))))
    return float(spec.low + u * (spec.high - spec.low))


def _true(design: Design, params: dict) -> float:
    """The planted part of a trial's objective (0 without planted effects)."""
    specs = {s.key: s for s in design.specs}
    return sum(d * SD * specs[k].position(params[k]) for k, d in design.effects)


def _observe(design: Design, mean: float, rng: np.random.Generator) -> tuple[float, list[float]]:
    """(trial objective, its repeats): sd SD in all, split between the configuration and the repeats."""
    if design.discrete:
        p = min(max(mean, 0.0), 1.0)
        return float(rng.binomial(design.discrete, p) / design.discrete), []
    if design.repeats == 1:
        return float(mean + rng.normal(0, SD)), []
    # half the variance is the configuration's, half the mean of the repeats' own noise
    config = mean + rng.normal(0, SD / math.sqrt(2))
    reps = (config + rng.normal(0, SD * math.sqrt(design.repeats / 2), design.repeats)).tolist()
    return float(np.mean(reps)), reps


def _optuna_params(design: Design, seed: int, rng: np.random.Generator) -> list[tuple[dict, float, list[float]]]:
    """A search asked from Optuna's QMC or TPE sampler (TPE as the driver builds it: 4 random start-up
    trials, constant liar), told each trial's simulated objective."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)   # QMCSampler
    dists = {s.key: (CategoricalDistribution([f"l{i}" for i in range(s.levels)]) if s.levels else
                     IntDistribution(int(s.low), int(s.high)) if s.int else FloatDistribution(s.low, s.high, log=s.log))
             for s in design.specs}
    sampler = (optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
               if design.sampler == "qmc" else
               optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, constant_liar=True))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    out = []
    for _ in range(design.trials):
        t = study.ask(dists)
        y, reps = _observe(design, BASE + _true(design, t.params), rng)
        study.tell(t, y)
        out.append((dict(t.params), y, reps))
    return out


def simulate(design: Design, seed: int) -> list[TrialRow]:
    rng = np.random.default_rng([seed, 20])
    if design.sampler in ("qmc", "tpe"):
        drawn = _optuna_params(design, seed, rng)
    else:
        if design.sampler == "balanced":          # one factor, exactly trials/levels per level, shuffled
            (spec,) = design.specs
            per = design.trials // spec.levels
            u = (rng.permutation(np.repeat(np.arange(spec.levels), per)) + 0.5) / spec.levels
            params = [{spec.key: _draw(spec, v)} for v in u]
        else:
            params = [{s.key: _draw(s, rng.random()) for s in design.specs} for _ in range(design.trials)]
        drawn = [(p, *_observe(design, BASE + _true(design, p), rng)) for p in params]
    return [TrialRow(f"t{i}", "FINISHED", p, objective=y, repeats=reps) for i, (p, y, reps) in enumerate(drawn)]


def true_difference(design: Design, spec: Spec, rows: list[TrialRow], best: str, worst: str) -> float:
    """The true difference between the two named levels: the mean planted effect of this factor over the
    trials at each (a numeric factor's tercile holds trials of different true effects)."""
    if not best or not worst:
        return math.nan
    names, codes = level_codes(spec.factor, rows)
    eff = dict(design.effects).get(spec.key, 0.0) * SD
    pos = np.array([spec.position(r.params[spec.key]) for r in rows])
    at = {n: float(np.mean(eff * pos[codes == k])) for k, n in enumerate(names)}
    return at[best] - at[worst]


# ---- the report as it was ------------------------------------------------------------------------
def _module_at(commit: str, path: str, name: str) -> types.ModuleType | None:
    """The file `path` as it was at `commit`, executed as the module `name` (None outside a git checkout)."""
    try:
        src = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True, check=True,
                             cwd=_CHECKOUT).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType(name)
    sys.modules[mod.__name__] = mod          # its dataclasses look their module up
    exec(compile(src, f"{commit}:{path}", "exec"), mod.__dict__)
    return mod


def before_module(commit: str = BEFORE_COMMIT) -> types.ModuleType | None:
    """`crosspt/search/report.py` at `commit`, as a module (None outside a git checkout)."""
    return _module_at(commit, "crosspt/search/report.py", "report_before")


BEFORE_DESIGN_PHASE = "9fadc57"     # main before the design phase: tested every finished trial (build.py)


def before_stats(commit: str = BEFORE_DESIGN_PHASE) -> types.ModuleType | None:
    """`crosspt/search/report/stats.py` at `commit` as a module (None outside a git checkout): the
    statistics `build_report` ran on every finished trial before the design phase. Its input rows are
    today's (`rows.py` only gained fields since)."""
    return _module_at(commit, "crosspt/search/report/stats.py", "stats_before_design")


def before_verdicts(mod, design: Design, rows: list[TrialRow]) -> dict[str, tuple[str, str, str, float, float]]:
    """{factor: (kind, best, worst, lo, hi)} from the old per-factor verdict (CI in objective units)."""
    old_rows = [mod.TrialRow(r.trial_id, r.state, r.params, r.objective, list(r.repeats)) for r in rows]
    out = {}
    for s in design.specs:
        v = mod.verdict(mod.Factor(s.key, not s.levels, s.log), old_rows, "max", 1.0, "")
        out[s.key] = (v.kind, v.best, v.worst, v.lo, v.hi)
    return out


# ---- measuring -----------------------------------------------------------------------------------
@dataclass
class Tally:
    null_tests: int = 0
    null_effects: int = 0
    searches: int = 0
    family_errors: int = 0
    planted_tests: dict[str, int] = field(default_factory=dict)
    planted_effects: dict[str, int] = field(default_factory=dict)
    intervals: int = 0
    covered: int = 0
    bias_est: list[float] = field(default_factory=list)       # estimate - true difference (planted factors)
    bias_raw: list[float] = field(default_factory=list)       # plug-in difference - true difference
    too_few: int = 0

    def add(self, design: Design, results: dict[str, tuple], rows: list[TrialRow]) -> None:
        """`results[factor] = (is_effect, best, worst, estimate, raw, lo, hi, too_few)`."""
        planted = dict(design.effects)
        self.searches += 1
        false = False
        for s in design.specs:
            eff, best, worst, est, raw, lo, hi, few = results[s.key]
            self.too_few += few
            if s.key in planted:
                self.planted_tests[s.key] = self.planted_tests.get(s.key, 0) + 1
                self.planted_effects[s.key] = self.planted_effects.get(s.key, 0) + eff
            else:
                self.null_tests += 1
                self.null_effects += eff
                false |= eff
            truth = true_difference(design, s, rows, best, worst)
            if not math.isnan(truth) and lo is not None and not math.isnan(lo):
                self.intervals += 1
                self.covered += lo - 1e-12 <= truth <= hi + 1e-12
                if s.key in planted:
                    if est is not None:
                        self.bias_est.append(est - truth)
                    if raw is not None:
                        self.bias_raw.append(raw - truth)
        self.family_errors += false

    def add_verdicts(self, design: Design, effect: dict[str, bool], planted: set[str]) -> None:
        """One search's `effect` verdicts only (no intervals): the search paths' tally."""
        self.searches += 1
        false = False
        for key, eff in effect.items():
            if key in planted:
                self.planted_tests[key] = self.planted_tests.get(key, 0) + 1
                self.planted_effects[key] = self.planted_effects.get(key, 0) + eff
            else:
                self.null_tests += 1
                self.null_effects += eff
                false |= eff
        self.family_errors += false

    def summary(self) -> dict:
        def rate(k, n):
            return {"rate": k / n, "mc2se": 2 * math.sqrt(max(k / n * (1 - k / n), 1e-12) / n), "n": n} if n else None
        return {"false_effect": rate(self.null_effects, self.null_tests),
                "family_wise": rate(self.family_errors, self.searches) if self.null_tests else None,
                "power": {k: rate(self.planted_effects[k], n) for k, n in self.planted_tests.items()},
                "coverage": rate(self.covered, self.intervals),
                "bias_estimate": float(np.mean(self.bias_est)) / SD if self.bias_est else None,
                "bias_plugin": float(np.mean(self.bias_raw)) / SD if self.bias_raw else None,
                "too_few": self.too_few / max(self.null_tests + sum(self.planted_tests.values()), 1)}


def run_design(design: Design, searches: int, before, before_searches: int) -> dict:
    """`searches` simulated searches through the report's statistics; the first `before_searches` of
    them through the old verdict too (it is the slow part: a pure-Python bootstrap)."""
    after, old = Tally(), Tally()
    t0 = time.time()
    for seed in range(searches):
        rows = simulate(design, seed)
        res = analyse([s.factor for s in design.specs], rows, "max")
        after.add(design, {r.factor: (r.verdict == Verdict.EFFECT, r.best, r.worst, r.estimate, r.raw_estimate,
                                      r.ci_low, r.ci_high, r.verdict == Verdict.TOO_FEW) for r in res}, rows)
        if before is not None and seed < before_searches:
            v = before_verdicts(before, design, rows)
            old.add(design, {k: (kind == "effect", best, worst, None, None, lo, hi, kind == "too_few")
                             for k, (kind, best, worst, lo, hi) in v.items()}, rows)
    return {"design": design.name, "group": design.group, "searches": searches,
            "before_searches": min(searches, before_searches) if before is not None else 0, "seconds": time.time() - t0,
            "after": after.summary(), "before": old.summary() if before is not None else None}


# ---- the search paths users run, through build_report ---------------------------------------------
# Each simulated search becomes the rows `crosspt report` reads (states, phases, strata, rung values) and
# goes through `build_report`, the function `crosspt report` calls.
ASHA_TRIALS, ASHA_DESIGN = 48, 24     # issue 30's survivor design; the default design is half the budget
SLOW = 1.2                            # the slow factor lowers the first rung by this many SD, the final score not
# measurement noise of the rung and the final score beside the shared per-trial quality (sd SD): with 0.3 the
# code before the design phase reported a false effect of `slow` in 35% of 40 searches, where issue 30
# measured 30-38%; with 1.0 in 10%
ASHA_NOISE = 0.3


def design_rows(specs: Sequence[Spec], n: int, rng: np.random.Generator) -> list[tuple[dict, dict]]:
    """`n` design trials over `specs` dealt as `crosspt.search.design.make_design` deals them (the same
    `balanced_levels`, numeric factors in `N_STRATA` strata of their range): (params, strata) each."""
    out: list[tuple[dict, dict]] = [({}, {}) for _ in range(n)]
    for s in specs:
        small_int = s.int and s.high - s.low + 1 <= MAX_LEVELS_AS_IS
        k = s.levels or (int(s.high - s.low + 1) if small_int else N_STRATA)
        for (params, strata), c in zip(out, balanced_levels(n, k, rng)):
            if s.levels:
                params[s.key] = f"l{c}"
            elif small_int:
                params[s.key] = int(s.low + c)
            else:
                params[s.key] = value_in_stratum((c + rng.random()) / N_STRATA, s.low, s.high, s.log, s.int)
                strata[s.key] = stratum_label(int(c), s.low, s.high, s.log)
    return out


def _row(i: int, state: str, params: dict, strata: dict, phase: str, final: float | None, rung: float) -> TrialRow:
    return TrialRow(f"t{i:02d}", state, params, objective=final, phase=phase, strata=strata, rung=rung)


def asha_search(seed: int, design: bool) -> list[TrialRow]:
    """Issue 30's survivor design: 48 trials over `slow` (2 levels) and two more null factors; a per-trial
    quality (sd `SD`) shared by the first rung and the final score, each measured with noise of
    `ASHA_NOISE` SD; `slow` lowers the first rung by `SLOW` SD and does nothing to the final score; ASHA lets the top half at the rung continue. `design`: the first
    `ASHA_DESIGN` trials are design trials, which ASHA never stops (the new default path), the rest drawn
    at random and pruned among themselves; else every trial random and under ASHA (the path before)."""
    rng = np.random.default_rng([seed, 30])
    specs = (CAT("slow", 2), CAT("b3", 3), CAT("f2", 2))
    n_design = ASHA_DESIGN if design else 0
    drawn = design_rows(specs, n_design, rng) + [({s.key: _draw(s, rng.random()) for s in specs}, {})
                                                 for _ in range(ASHA_TRIALS - n_design)]
    quality = rng.normal(0, SD, ASHA_TRIALS)
    rung = BASE - 0.1 + quality - np.array([SLOW * SD * (p["slow"] == "l1") for p, _ in drawn]) \
        + rng.normal(0, ASHA_NOISE * SD, ASHA_TRIALS)
    final = BASE + quality + rng.normal(0, ASHA_NOISE * SD, ASHA_TRIALS)
    adaptive = np.arange(n_design, ASHA_TRIALS)
    cut = np.median(rung[adaptive])
    rows = []
    for i, (params, strata) in enumerate(drawn):
        survives = i < n_design or rung[i] >= cut
        rows.append(_row(i, "FINISHED" if survives else "PRUNED", params, strata,
                         "design" if i < n_design else "optimiser", float(final[i] if survives else rung[i]),
                         float(rung[i])))
    return rows


TPE_TRIALS, TPE_DESIGN, TPE_EFFECT = 48, 24, ("b3", 2.0)


def tpe_search(seed: int, design: bool) -> list[TrialRow]:
    """One real factor (`b3`, 2 SD from its worst to its best level) beside five null ones (`SIX`): the
    first `TPE_DESIGN` trials a design enqueued in a real Optuna TPE study (as the driver enqueues it),
    the rest chosen by TPE, which learns from the design (`design`); else every trial TPE's (4 random
    start-up trials, as the driver builds it)."""
    import optuna

    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    d = Design("tpe", SIX, TPE_TRIALS, "tpe", (TPE_EFFECT,))
    rng = np.random.default_rng([seed, 31])
    dists = {s.key: (CategoricalDistribution([f"l{i}" for i in range(s.levels)]) if s.levels else
                     IntDistribution(int(s.low), int(s.high)) if s.int else FloatDistribution(s.low, s.high, log=s.log))
             for s in SIX}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=4, constant_liar=True, warn_independent_sampling=False))
    n_design = TPE_DESIGN if design else 0
    points = design_rows(SIX, n_design, rng)
    for params, _ in points:
        study.enqueue_trial(params)
    rows = []
    for i in range(TPE_TRIALS):
        t = study.ask(dists)
        y, _ = _observe(d, BASE + _true(d, t.params), rng)
        study.tell(t, y)
        rows.append(_row(i, "FINISHED", dict(t.params), points[i][1] if i < n_design else {},
                         "design" if i < n_design else "optimiser", y, None))
    return rows


def _verdicts(rep) -> dict[str, Verdict]:
    return {r.factor: r.verdict for r in rep.results}


def run_path(name: str, simulate_one, factors: list[Factor], planted: set[str], algorithm: str,
             searches: int) -> dict:
    """`searches` simulated searches of one path through `build_report`: the new default path (design
    trials + the optimiser's as hints) and the path before (no design phase; every finished trial through
    the statistics `build_report` ran then, `before_stats`)."""
    t0 = time.time()
    old = before_stats()
    tallies = {"after": Tally(), "before": Tally()}
    hint_effects = 0
    d = Design(name, tuple(), 0, effects=tuple((k, 0.0) for k in planted))
    for seed in range(searches):
        for side, design in (("after", True), ("before", False)):
            rows = simulate_one(seed, design)
            rung = 0 if any(r.state == "PRUNED" for r in rows) else None
            if side == "after":
                rep = build_report(name, "objective", "max", factors, rows, None, algorithm=algorithm,
                                   rung_epoch=rung)
                res = {r.factor: r for r in rep.results}
                hint_effects += sum(r.verdict == Verdict.EFFECT for r in rep.hints)
            elif old is not None:          # the code path before: every finished trial, the old statistics
                res = {r.factor: r for r in old.analyse(with_bins(factors, rows), finished(rows), "max")}
            else:                          # no git history: today's statistic on the same trials
                res = {r.factor: r for r in analyse(with_bins(factors, rows), finished(rows), "max")}
            tallies[side].add_verdicts(d, {f.key: res[f.key].verdict == Verdict.EFFECT for f in factors}, planted)
    return {"design": name, "searches": searches, "seconds": time.time() - t0, "hint_effects": hint_effects,
            "before_code": BEFORE_DESIGN_PHASE if old is not None else "today's statistic",
            "after": tallies["after"].summary(), "before": tallies["before"].summary()}


def paths(searches: int) -> list[dict]:
    return [run_path(f"ASHA survivors: {ASHA_TRIALS} trials, `slow` lowers the first rung by {SLOW} SD, top half "
                     "continues", asha_search, [Factor("slow"), Factor("b3"), Factor("f2")], set(), "random", searches),
            run_path(f"TPE with a real effect: 6 factors, {TPE_TRIALS} trials, b3 effect {TPE_EFFECT[1]:g} SD",
                     tpe_search, [s.factor for s in SIX], {TPE_EFFECT[0]}, "optuna", searches)]


# ---- power on a noise model fitted to a real search --------------------------------------------------
# benchmarks/report_check.md (16 random trials, MiniLM, SST-2, 8 shots, 2 epochs): the 95% interval of a
# level's mean is +-6.0 pts (6 trials) and +-4.65 (10) on the 16 validation rows, +-1.5 and +-1.2 on the
# same trials' 200 fixed test rows. A level mean's half-width is t(0.975, 14) * sd / sqrt(n), so the
# residual sd of one trial's score is half-width * sqrt(n) / 2.145: 6.85 and 6.86 pts on validation, 1.71
# and 1.77 on 200 held-out rows. That sd holds the seed/training spread and the rows' disagreement between
# trials together; a 200-row assessment split measures both like the test rows did.
NOISE = {"validation (16 rows)": 6.85, "assessment (200 fixed rows)": 1.74}
POWER_EFFECT = 3.0                    # pts, best - worst of a 2-level factor
POWER_TRIALS = (12, 24, 48)


def power_search(seed: int, n: int, sd_pts: float) -> list[TrialRow]:
    """`n` design trials over `SIX` with `a2` moving the score by `POWER_EFFECT` pts, noise `sd_pts`."""
    rng = np.random.default_rng([seed, 32, n])
    return [_row(i, "FINISHED", p, st, "design",
                 BASE + (POWER_EFFECT / 100 if p["a2"] == "l1" else 0.0) + rng.normal(0, sd_pts / 100), None)
            for i, (p, st) in enumerate(design_rows(SIX, n, rng))]


def power_table(searches: int) -> list[dict]:
    """Per noise level and design size: the power `power.py` computes (what the report and `--plan`
    print) and the share of simulated searches whose report says `effect` for a2."""
    from crosspt.search.report.power import power

    out = []
    for label, sd in NOISE.items():
        for n in POWER_TRIALS:
            t0, found, false, tests = time.time(), 0, 0, 0
            for seed in range(searches):
                rep = build_report("power", "objective", "max", [s.factor for s in SIX], power_search(seed, n, sd),
                                   None, algorithm="optuna")
                v = _verdicts(rep)
                found += v["a2"] == Verdict.EFFECT
                false += sum(v[s.key] == Verdict.EFFECT for s in SIX if s.key != "a2")
                tests += len(SIX) - 1
            rate = lambda k, m: {"rate": k / m, "mc2se": 2 * math.sqrt(max(k / m * (1 - k / m), 1e-12) / m), "n": m}  # noqa: E731
            out.append({"noise": label, "sd": sd, "trials": n, "searches": searches,
                        "computed": power(POWER_EFFECT / sd, 2, n // 2, ALPHA / len(SIX)),
                        "simulated": rate(found, searches), "false_effect": rate(false, tests),
                        "seconds": time.time() - t0})
    return out


# ---- the table -------------------------------------------------------------------------------------
def _pct(r: dict | None, err: bool = True) -> str:
    if not r:
        return "-"
    if "rate" not in r:                     # power, per planted factor
        return ", ".join(f"{k} {_pct(v, err)}" for k, v in r.items())
    return f"{100 * r['rate']:.1f}" + (f" ± {100 * r['mc2se']:.1f}" if err else "")


_OUT = re.compile(r" --out \S+")         # a run's output path is not part of its recipe


def to_markdown(parts: dict) -> str:
    """benchmarks/report_calibration.md from a run's parts: "stats" (the designs through `analyse`),
    "paths" and "power" (through `build_report`)."""
    results = parts.get("stats") or []
    searches = max((r["searches"] for r in results), default=0)
    before_searches = max((r["before_searches"] for r in results), default=0)
    wall = sum(r["seconds"] for k in ("stats", "paths", "power") for r in parts.get(k) or [])
    null = [r for r in results if r["group"] == "null"]
    power = [r for r in results if r["group"] == "power"]
    md = ["# Calibration of the design-factor report", "",
          " and ".join(f"`python -m benchmarks.report_calibration {_OUT.sub('', c)}`".replace(" `", "`")
                       for c in parts.get("commands") or [parts.get("command", "")])
          + f" ({wall / 60:.0f} min of simulation on 1-2 shared CPU cores, under load from other work). "
          "Simulated searches, objective 0.6 + planted effects + N(0, 0.06) per trial. The first two tables put "
          "every search through `crosspt.search.report.stats.analyse` (what `build_report` runs on the design "
          "trials); the search paths and the power table put it through `build_report` itself. *Before* in "
          f"the first two tables is the per-factor `verdict` of `crosspt/search/report.py` at {BEFORE_COMMIT} "
          f"on the first {before_searches} of the same searches (kept from the run that measured it). "
          "Rates in %, ± two Monte-Carlo standard errors.", "",
          "- *false effect*: `effect` verdicts among factors without effect (per factor test); nominal 5%.",
          "- *family-wise*: searches with at least one false `effect` (after: Bonferroni across the factors).",
          "- *coverage*: the 95% best-vs-worst interval holds the true difference between the two levels it "
          "names (0 without effect; for a numeric factor, the mean planted effect of the trials in each "
          "tercile).",
          "- *too few*: factor tests answered `too_few` (a 2 x 2 design can never reach p < 0.05).", "",
          "## Without effects", "",
          "| design | searches (after / before) | false effect: before | after | family-wise: before | after | "
          "coverage: before | after | too few (after) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in null:
        a, b = r["after"], r["before"] or {}
        md.append(f"| {r['design']} | {r['searches']} / {r['before_searches']} | {_pct(b.get('false_effect'))} | {_pct(a['false_effect'])} | "
                  f"{_pct(b.get('family_wise'))} | {_pct(a['family_wise'])} | {_pct(b.get('coverage'))} | "
                  f"{_pct(a['coverage'])} | {100 * a['too_few']:.0f} |")
    md += ["", "## With planted effects (24 trials)", "",
           "Power: `effect` verdicts for the planted factor. Bias: mean of (estimate - true difference of the "
           "named levels), in SD, for the plug-in best-minus-worst difference and for the report's estimate "
           "(the pick of best and worst corrected by redrawing).", "",
           "| design | searches (after / before) | power: before | after | false effect, other factors: before | after | "
           "coverage: before | after | bias, plug-in | bias, estimate |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in power:
        a, b = r["after"], r["before"] or {}
        bias = lambda v: "-" if v is None else f"{v:+.2f}"  # noqa: E731
        md.append(f"| {r['design']} | {r['searches']} / {r['before_searches']} | {_pct(b.get('power'))} | {_pct(a['power'])} | "
                  f"{_pct(b.get('false_effect'))} | {_pct(a['false_effect'])} | {_pct(b.get('coverage'))} | "
                  f"{_pct(a['coverage'])} | {bias(a['bias_plugin'])} | {bias(a['bias_estimate'])} |")
    md += ["", *paths_markdown(parts), "## Reading it", ""] + _findings(null, power) + [
           "", "## Method (crosspt/search/report/stats.py)", "",
           "- Trials: the design trials (`crosspt.search.design`: each factor's levels balanced, numeric factors in "
           "thirds of their range, dealt by a seeded random permutation, never pruned); the optimiser's trials "
           "only as hints (`hint`, never `effect`).",
           "- Test: permutation test of the factor's levels (1999 permutations, all of them when fewer), statistic "
           "= the studentized best-minus-worst difference of the level means in an additive model beyond the "
           "other factors whose one-way ANOVA p < 0.05 (screened from the objective and their own levels, never "
           "from the tested factor's, so permuting it stays exact under random assignment).",
           "- Correction and interval, one construction: Bonferroni across the factors of one report; the "
           "interval is the difference ± the permutation critical value at 0.05 / m times its standard error, so "
           "`effect` exactly when the interval excludes 0 (tests/test_report.py checks it over simulated "
           "searches). The estimate subtracts the pick's average overshoot, found by redrawing the level means "
           "from their estimated distribution and picking again.",
           "- `too_few`: the permutation statistic can take too few values (2 x 2 or 3 x 2 trials), so p can "
           "never fall below 0.05 / m.",
           "- Power (`crosspt/search/report/power.py`): statsmodels' TTestIndPower for 2 levels, the same "
           "statistic simulated under normal errors for more."]
    return "\n".join(md) + "\n"


def _findings(null: list[dict], power: list[dict]) -> list[str]:
    """A few sentences computed from the tables (so a rerun keeps them true)."""
    def worst(rs, side):
        rs = [r for r in rs if r[side] and r[side]["false_effect"]]
        return max(rs, key=lambda r: r[side]["false_effect"]["rate"]) if rs else None
    out = []
    randomised = [r for r in null if "TPE" not in r["design"]]
    a, b = worst(randomised, "after"), worst(randomised, "before")
    if a:
        f = a["after"]["false_effect"]
        within = " (within Monte-Carlo error of 5%)" if f["rate"] - f["mc2se"] <= ALPHA else ""
        out.append(f"- Random, balanced and QMC designs: the largest false-effect rate after is "
                   f"{_pct(f)}%{within} ({a['design']}); before it was up to "
                   + (f"{_pct(b['before']['false_effect'])}% ({b['design']})." if b else "-."))
    tpe = [r for r in null if "TPE" in r["design"]]
    for r in tpe:
        out.append(f"- TPE (adaptive) design: {_pct(r['after']['false_effect'])}% false effects per factor, "
                   f"{_pct(r['after']['family_wise'])}% per search, when its trials are tested as if randomised. The "
                   "report no longer does: TPE's trials are hints (`hint`, never `effect`); its claims stand on "
                   "the design trials (the search paths above).")
    for r in (r for r in power if "TPE" in r["design"]):
        out.append(f"- TPE with something to find ({r['design']}): {_pct(r['after']['false_effect'])}% false effects "
                   f"in the other factors, power {_pct(r['after']['power'])}%; random sampling of the same space: "
                   "see the rows above.")
    cov = [r["after"]["coverage"]["rate"] for r in null + power if r["after"]["coverage"]]
    if cov:
        out.append(f"- Coverage of the best-vs-worst interval after: {100 * min(cov):.1f}% to {100 * max(cov):.1f}% "
                   "across all designs (nominal: at least 95%; each interval is at level 1 - 0.05 / m over "
                   "the m factors tested, with the critical value of the best-vs-worst pick, so the pair picked "
                   "after the fact is covered too; above 99% where m = 6).")
    est = [r["after"]["bias_estimate"] for r in power if r["after"]["bias_estimate"] is not None]
    raw = [r["after"]["bias_plugin"] for r in power if r["after"]["bias_plugin"] is not None]
    if est and raw:
        out.append(f"- Bias of the effect estimate, in SD: {min(est):+.2f} to {max(est):+.2f} (the plug-in "
                   f"best-minus-worst: {min(raw):+.2f} to {max(raw):+.2f}). The redraw removes most of the winner's "
                   "curse where it is large (several levels, small effects); where one level is far ahead and "
                   "another happens to sit near it, it over-corrects a little (redraws start from the observed "
                   "means, which put the two closer than they are).")
    weak = [r for r in power if r["after"]["power"] and "1 SD" in r["design"] and "6-factor" in r["design"]]
    for r in weak:
        (k, a), = r["after"]["power"].items()
        b = (r["before"] or {}).get("power", {}).get(k)
        out.append(f"- Power is what 24 trials buy once false effects are ruled out: {_pct(a)}% for a 1-SD effect "
                   f"of a 3-level factor among 6 ({r['design']})"
                   + (f"; the old verdict's {_pct(b)}% came with {_pct(r['before']['false_effect'])}% false effects "
                      "in the other factors." if b else "."))
    return out


def paths_markdown(results: dict) -> list[str]:
    """The search paths' and the power table's sections (empty where that part was not run)."""
    md = []
    if results.get("paths"):
        md += ["## The search paths users run (through `build_report`)", "",
               "Each simulated search becomes the rows `crosspt report` reads (trial states, design/optimiser "
               "phase, strata, rung values) and goes through `build_report`. *After*: the new default path, the "
               "first half of the budget a randomised design that ASHA never stops, the rest chosen by the "
               "optimiser; verdicts stand on the design trials only and the optimiser's trials are hints. "
               "*Before*: the trials the report used to test (every finished trial: ASHA's survivors, or TPE's "
               "choices), through today's statistic, so that only the choice of trials differs. The report as it "
               f"was (`build.py` before this change) gave 30-38% false effects on the survivor design "
               "(issue 30: two runs of 100 and 60 searches).", "",
               "| path | searches | false effect per factor: before | after | family-wise: before | after | "
               "power (planted): before | after | `effect` among hints (after) |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["paths"]:
            a, b = r["after"], r["before"]
            md.append(f"| {r['design']} | {r['searches']} | {_pct(b['false_effect'])} | {_pct(a['false_effect'])} | "
                      f"{_pct(b['family_wise'])} | {_pct(a['family_wise'])} | {_pct(b['power']) if b['power'] else '-'} | "
                      f"{_pct(a['power']) if a['power'] else '-'} | {r['hint_effects']} |")
        md += ["", *(_within(r) for r in results["paths"]), ""]
    if results.get("power"):
        rows = results["power"]
        md += ["## Power on a noise model fitted to a real search", "",
               f"A 2-level factor (`a2`) moving the score by {POWER_EFFECT:g} pts from its worse to its better level, "
               "among 6 factors (the other 5 null), design trials only, `effect` at 0.05 / 6 per factor. Residual "
               "sd of one trial's score, fitted to benchmarks/report_check.md (16 random MiniLM trials on "
               "SST-2): a level mean's 95% half-width is t(0.975, 14) x sd / sqrt(n), so sd = half-width x "
               "sqrt(n) / 2.145: +-6.0 pts at 6 trials and +-4.65 at 10 on the 16 validation rows give 6.85 "
               "and 6.86 pts; +-1.5 and +-1.2 on the same trials' 200 fixed test rows give 1.71 and 1.77. "
               "That sd holds the seed and training spread and the rows' disagreement between trials together, "
               "which an assessment split of 200 fixed rows measures the same way. *computed*: `power.py` "
               "(statsmodels' TTestIndPower for 2 levels), the number the report and `crosspt report --plan` "
               "print; *simulated*: the share of simulated searches whose report (`build_report`, the "
               "permutation test) says `effect` for a2.", "",
               "| measured on | residual sd (pts) | design trials | searches | power: computed | simulated | "
               "false effect, other 5 factors |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            md.append(f"| {r['noise']} | {r['sd']:.2f} | {r['trials']} | {r['searches']} | {100 * r['computed']:.1f} | "
                      f"{_pct(r['simulated'])} | {_pct(r['false_effect'])} |")
        at24 = [r for r in rows if r["trials"] == 24]
        md += ["", "At 24 design trials: " + "; ".join(
            f"{r['noise']}: {100 * r['computed']:.0f}% computed, {_pct(r['simulated'])}% simulated" for r in at24)
            + ". 80% power needs " + "; ".join(
                f"{min((r['trials'] for r in rows if r['noise'] == n and r['computed'] >= 0.8), default=None) or 'more than 48'}"
                f" design trials on {n}" for n in dict.fromkeys(r["noise"] for r in rows)) + ".", ""]
    return md


def _within(r: dict) -> str:
    """One sentence: are the path's false-effect rates within Monte-Carlo error of 5%?"""
    a = r["after"]
    ok = all(x["rate"] - x["mc2se"] <= ALPHA for x in (a["false_effect"], a["family_wise"]))
    return (f"- {r['design'].split(':')[0]}: after, {_pct(a['false_effect'])}% false effects per factor and "
            f"{_pct(a['family_wise'])}% per search ({'within' if ok else 'NOT within'} Monte-Carlo error of 5%); "
            f"before ({r['before_code']}), {_pct(r['before']['false_effect'])}% and "
            f"{_pct(r['before']['family_wise'])}%; `effect` among the hints: {r['hint_effects']} (by construction).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--searches", type=int, default=1000, help="simulated searches per design")
    ap.add_argument("--only", help="designs whose name contains this text")
    ap.add_argument("--before-searches", type=int, default=500,
                    help="how many of the searches also go through the old verdict (the slow part; 0: none)")
    ap.add_argument("--before-from-json", help="the before columns from an earlier run's .json (same designs)")
    ap.add_argument("--paths-searches", type=int, default=0,
                    help="simulated searches of each search path through build_report (ASHA survivors, TPE)")
    ap.add_argument("--power-searches", type=int, default=0, help="simulated searches per power-table cell")
    ap.add_argument("--out", help="markdown table (a .json of the numbers beside it)")
    ap.add_argument("--from-json", nargs="+", help="only write the markdown again from earlier runs' .json files "
                                                   "(their parts merged)")
    args = ap.parse_args(argv)
    if args.from_json:
        results: dict = {}
        commands = []
        for path in args.from_json:
            data = json.loads(Path(path).read_text())
            data = data if isinstance(data, dict) else {"stats": data}
            commands += data.get("commands") or [data.get("command", "")]
            results.update({k: v for k, v in data.items() if v and k not in ("command", "commands")})
        results["commands"] = [c for c in commands if c]
        md = to_markdown(results)
    else:
        results = {"stats": [], "paths": [], "power": []}
        before = before_module() if args.before_searches > 0 else None
        old = {}
        if args.before_from_json:
            data = json.loads(Path(args.before_from_json).read_text())
            old = {r["design"]: r for r in (data["stats"] if isinstance(data, dict) else data)}
        t0 = time.time()
        for d in designs() if args.searches else []:
            if args.only and args.only not in d.name:        # a quick look at some designs
                continue
            r = run_design(d, args.searches, before, args.before_searches)
            if d.name in old and r["before"] is None:
                r["before"], r["before_searches"] = old[d.name]["before"], old[d.name]["before_searches"]
            results["stats"].append(r)
            a = r["after"]
            print(f"{d.name}: false {_pct(a['false_effect'])} fw {_pct(a['family_wise'])} power {_pct(a['power'])} "
                  f"coverage {_pct(a['coverage'])} ({r['seconds']:.0f}s)", flush=True)
        if args.paths_searches:
            results["paths"] = paths(args.paths_searches)
        if args.power_searches:
            results["power"] = power_table(args.power_searches)
        results["wall_s"] = time.time() - t0
        results["command"] = " ".join(argv if argv is not None else sys.argv[1:])
        md = to_markdown(results)
    print(md)
    if args.out:
        Path(args.out).write_text(md)
        if Path(args.out).with_suffix(".json").resolve() not in {Path(p).resolve() for p in args.from_json or []}:
            Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Calibration of the design-factor report's statistics by simulation: benchmarks/report_calibration.md.

    python -m crosspt.bench.report_calibration --searches 1000 --out benchmarks/report_calibration.md

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
import subprocess
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crosspt.search.report.rows import Factor, TrialRow, level_codes
from crosspt.search.report.stats import ALPHA, Verdict, analyse

SD = 0.06                      # noise sd of one trial's objective (the 0.6 + N(0, 0.06))
BASE = 0.6
BEFORE_COMMIT = "31a7a47"      # main before issue 20: the report whose verdict found effects in noise
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
def before_module(commit: str = BEFORE_COMMIT) -> types.ModuleType | None:
    """`crosspt/search/report.py` at `commit`, as a module (None outside a git checkout)."""
    try:
        src = subprocess.run(["git", "show", f"{commit}:crosspt/search/report.py"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("report_before")
    sys.modules[mod.__name__] = mod          # its dataclasses look their module up
    exec(compile(src, f"{commit}:crosspt/search/report.py", "exec"), mod.__dict__)
    return mod


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


# ---- the table -------------------------------------------------------------------------------------
def _pct(r: dict | None, err: bool = True) -> str:
    if not r:
        return "-"
    if "rate" not in r:                     # power, per planted factor
        return ", ".join(f"{k} {_pct(v, err)}" for k, v in r.items())
    return f"{100 * r['rate']:.1f}" + (f" ± {100 * r['mc2se']:.1f}" if err else "")


def to_markdown(results: list[dict], searches: int, before_searches: int, wall: float) -> str:
    null = [r for r in results if r["group"] == "null"]
    power = [r for r in results if r["group"] == "power"]
    md = ["# Calibration of the design-factor report", "",
          f"`python -m crosspt.bench.report_calibration --searches {searches} --before-searches {before_searches}` "
          f"({wall / 60:.0f} min on 1-2 shared CPU cores). Simulated searches, objective 0.6 + planted effects + N(0, 0.06) per trial; every search "
          "through `crosspt.search.report.stats.analyse` (what `crosspt report` runs). *Before* is the "
          f"per-factor `verdict` of `crosspt/search/report.py` at {BEFORE_COMMIT} on the first {before_searches} "
          "of the same searches. "
          "Rates in %, ± two Monte-Carlo standard errors.", "",
          "- *false effect*: `effect` verdicts among factors without effect (per factor test); nominal 5%.",
          "- *family-wise*: searches with at least one false `effect` (after: Holm across the factors).",
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
    md += ["", "## Reading it", ""] + _findings(null, power) + ["", "## Method (crosspt/search/report/stats.py)", "",
           "- Test: permutation test of the factor's levels (`scipy.stats.permutation_test`, 1999 permutations, all of "
           "them when fewer), statistic = the factor's sum of squares in an additive model beyond the other "
           "factors whose one-way ANOVA p < 0.05 (screened from the objective and their own levels, never from the "
           "tested factor's, so permuting it stays exact under random assignment).",
           "- Correction: Holm across the factors of one report (family-wise error; a search has 2-12 factors, "
           "where Holm loses little power against Benjamini-Hochberg and holds under any dependence).",
           "- Effect: best minus worst level mean (OLS, `statsmodels`) with Tukey's simultaneous 95% interval "
           "(`scipy.stats.studentized_range`): it covers all pairs at once, so also the pair picked as best and "
           "worst; the estimate subtracts the pick's average overshoot, found by redrawing the level means from "
           "their estimated distribution and picking again.",
           "- `too_few`: the permutation statistic can take fewer than 20 values (2 x 2 or 3 x 2 trials), so p can "
           "never fall below 0.05."]
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
                   f"{_pct(r['after']['family_wise'])}% per search. The report names the searcher as adaptive and "
                   "calls its p-values hints; `search.algorithm: random` (or `qmc`) is the design for attribution.")
    for r in (r for r in power if "TPE" in r["design"]):
        out.append(f"- TPE with something to find ({r['design']}): {_pct(r['after']['false_effect'])}% false effects "
                   f"in the other factors, power {_pct(r['after']['power'])}%; random sampling of the same space: "
                   "see the rows above.")
    cov = [r["after"]["coverage"]["rate"] for r in null + power if r["after"]["coverage"]]
    if cov:
        out.append(f"- Coverage of the best-vs-worst interval after: {100 * min(cov):.1f}% to {100 * max(cov):.1f}% "
                   "across all designs (nominal 95%; simultaneous over all pairs of levels, so the pair picked "
                   "after the fact is covered too).")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--searches", type=int, default=1000, help="simulated searches per design")
    ap.add_argument("--only", help="designs whose name contains this text")
    ap.add_argument("--before-searches", type=int, default=500,
                    help="how many of the searches also go through the old verdict (the slow part; 0: none)")
    ap.add_argument("--out", help="markdown table (a .json of the numbers beside it)")
    ap.add_argument("--from-json", help="only write the markdown again from an earlier run's .json")
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        md = to_markdown(results, results[0]["searches"], max(r["before_searches"] for r in results),
                         sum(r["seconds"] for r in results))
        print(md)
        if args.out:
            Path(args.out).write_text(md)
        return 0
    before = before_module() if args.before_searches > 0 else None
    t0, results = time.time(), []
    for d in designs():
        if args.only and args.only not in d.name:        # a quick look at some designs
            continue
        results.append(run_design(d, args.searches, before, args.before_searches))
        a = results[-1]["after"]
        print(f"{d.name}: false {_pct(a['false_effect'])} fw {_pct(a['family_wise'])} power {_pct(a['power'])} "
              f"coverage {_pct(a['coverage'])} ({results[-1]['seconds']:.0f}s)", flush=True)
    md = to_markdown(results, args.searches, args.before_searches, time.time() - t0)
    print(md)
    if args.out:
        Path(args.out).write_text(md)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Every number of one search's report, from plain rows. No MLflow, no plotting.

Two families of trials, because only one of them supports a claim:

- **The main family** (`Report.results`, verdicts `effect` / `none` / `too_few` ...): the design trials
  (`crosspt.search.design`), every one of which runs to its end (ASHA never stops them), so which of them
  are analysed does not depend on any score. A design trial that FAILED (a crash, a divergence) is left
  out and counted in the report: a failure is decided by the configuration or the machine, never by
  comparing scores, so the others stay a randomised design; the report names the failed ones per level.
  A search without design trials has a main family only when its searcher drew every trial at random
  (`random`, `qmc`) and none was pruned: then the finished trials are the whole design.
- **Hints** (`Report.hints`, verdicts `hint` / `none`): the same analysis over every finished trial,
  optimiser trials included. The optimiser chose them by earlier scores and ASHA let them finish by their
  early scores, so nothing there is a test: a would-be effect reads `hint`, never `effect`.

The main family is tested on the held-out assessment score (`assess_score`) when every trial of it has
one, else on the objective (validation); the other is shown beside it per level. Each factor of the main
family without a detected effect gets its power numbers (`power.add_power`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from crosspt.search.report.power import add_power
from crosspt.search.report.rows import (Factor, TrialRow, active_rows, at_rung, finished, level_codes, levels,
                                        with_bins, with_strata)
from crosspt.search.report.stats import FactorResult, LevelStat, Verdict, analyse

MIN_TRIALS = 2                       # fewer finished trials: nothing to compare, the report says so
# `search.algorithm` values whose trials draw each factor's level independently of earlier scores: the
# design the tests assume (exact). Anything else (TPE) chooses later trials by earlier results.
RANDOMISED = frozenset({"random", "qmc"})


@dataclass
class Interaction:
    a: str
    b: str
    strength: float                              # weighted mean square of the non-additive part
    a_levels: list[str]
    b_levels: list[str]
    means: list[list[float | None]]              # [a level][b level]
    counts: list[list[int]]


@dataclass
class Report:
    title: str
    metric: str
    mode: str
    factors: list[Factor]                        # most important first
    rows: list[TrialRow]
    best: TrialRow | None
    running: bool = False
    algorithm: str | None = None                 # the searcher (`search.algorithm`), when known
    counts: dict[str, int] = field(default_factory=dict)
    results: list[FactorResult] = field(default_factory=list)         # the main family (module docstring)
    family: str = ""                             # "design" | "randomised" | "" (no main family)
    family_note: str = ""                        # why there is no main family, or what is missing from it
    tested: str = "objective"                    # what the main family tests: "assess" or "objective"
    main_rows: list[TrialRow] = field(default_factory=list)
    hints: list[FactorResult] = field(default_factory=list)           # every finished trial, hints only
    hint_factors: list[Factor] = field(default_factory=list)
    val_levels: dict[str, list[LevelStat]] = field(default_factory=dict)    # the objective per level, beside assess
    test_levels: dict[str, list[LevelStat]] = field(default_factory=dict)   # test_score per level (no test)
    rung_epoch: int | None = None                # 0-based epoch every finished and pruned trial reached
    rung_results: list[FactorResult] = field(default_factory=list)    # objective at that epoch, all of them
    prune_rates: dict[str, dict[str, float]] = field(default_factory=dict)  # factor -> level -> pruned share
    interaction: Interaction | None = None
    pareto: list[TrialRow] = field(default_factory=list)
    scale: tuple[float, str] = (100.0, "pts")
    aliased: list[tuple[str, str]] = field(default_factory=list)       # factor pairs the main family cannot split

    @property
    def enough(self) -> bool:
        return len(finished(self.rows)) >= MIN_TRIALS

    @property
    def adaptive(self) -> bool:
        """The searcher chose trials from earlier scores (TPE): levels were not randomly assigned."""
        return self.algorithm is not None and self.algorithm not in RANDOMISED

    def result(self, key: str) -> FactorResult:
        return next(r for r in self.results if r.factor == key)

    @property
    def shown(self) -> list[FactorResult]:
        """What the figures draw: the main family, else the hints."""
        return self.results or self.hints

    def hint(self, key: str) -> FactorResult:
        return next(r for r in self.hints if r.factor == key)


def metric_name(rep: "Report") -> str:
    """The name of what the shown analysis tests: `assess_score` or the objective's metric."""
    return "assess_score" if rep.tested == "assess" else rep.metric


def score_scale(rows: Sequence[TrialRow]) -> tuple[float, str]:
    """Scores in [0, 1] read as points (x100); anything else in its own units."""
    vals = [v for r in rows for v in r.values("objective")]
    return (100.0, "pts") if vals and all(0 <= v <= 1 for v in vals) else (1.0, "")


def prune_rates(factors: Sequence[Factor], rows: Sequence[TrialRow]) -> dict[str, dict[str, float]]:
    """Per factor and level: the share of its trials that ASHA stopped, among finished and pruned ones.
    A level pruned more often did worse early: its finished trials are the survivors."""
    done = [r for r in rows if r.state in ("FINISHED", "PRUNED")]
    out = {}
    for f in factors:
        names, codes = level_codes(f, done)
        pruned = np.array([r.state == "PRUNED" for r in done])
        out[f.key] = {n: float(pruned[codes == k].mean()) for k, n in enumerate(names) if (codes == k).any()}
    return out


def main_family(rows: Sequence[TrialRow], algorithm: str | None) -> tuple[str, list[TrialRow], str]:
    """(family, its rows, a note): the trials whose presence does not depend on their scores (module
    docstring)."""
    design = [r for r in rows if r.phase == "design"]
    if design:
        done = finished(design)
        pruned = [r for r in design if r.state == "PRUNED"]
        failed = [r for r in design if r.state == "FAILED"]
        if pruned:          # a scheduler that stopped design trials: the finished ones are survivors
            return "", [], (f"{len(pruned)} of {len(design)} design trials were stopped early: the finished ones are "
                             "survivors, so the design supports no test")
        note = (f"{len(failed)} of {len(design)} design trials failed and are left out "
                f"({', '.join(r.trial_id for r in failed)})") if failed else ""
        return "design", done, note
    if algorithm in RANDOMISED and not any(r.state == "PRUNED" for r in rows):
        return "randomised", finished(rows), ""
    if algorithm in RANDOMISED:
        return "", [], "ASHA stopped some trials early: the finished ones are survivors, so they support no test"
    return "", [], ("the search ran no design trials (`search.design: 0`, or a search from before the design "
                    "phase) and its searcher chose trials from earlier scores")


def build_report(title: str, metric: str, mode: str, factors: list[Factor], rows: list[TrialRow],
                 best_trial_id: str | None, running: bool = False, algorithm: str | None = None,
                 rung_epoch: int | None = None) -> Report:
    """Every number of the report from plain rows; `best_trial_id` comes from the one best-trial rule
    (`crosspt.registry.best_run.best_finished_child`); rows carry their rung value when `rung_epoch` is
    set (a search that pruned trials)."""
    done = finished(rows)
    counts = {s: sum(r.state == s for r in rows) for s in ("FINISHED", "PRUNED", "FAILED", "RUNNING")}
    best = next((r for r in rows if r.trial_id == best_trial_id), None)
    rep = Report(title, metric, mode, list(factors), list(rows), best, running, algorithm, counts,
                 scale=score_scale(done))
    if not rep.enough:
        return rep
    rep.family, main, rep.family_note = main_family(rows, algorithm)
    rep.main_rows = main
    if len(main) < MIN_TRIALS:
        rep.family, main = "", []
    # numeric factors binned once, over every trial that got far enough to compare
    binned = with_bins(factors, [r for r in rows if r.state in ("FINISHED", "PRUNED")] or done)
    if main:
        rep.tested = "assess" if all(r.value("assess") is not None for r in main) else "objective"
        levelled = with_strata(binned, main) if rep.family == "design" else binned
        results = analyse(levelled, main, mode, rep.tested)
        order = sorted(range(len(levelled)), key=lambda i: -(results[i].importance or 0.0))
        rep.factors, rep.results = [levelled[i] for i in order], [results[i] for i in order]
        n_tested = sum(r.p is not None for r in rep.results)
        for r in rep.results:
            if r.verdict in (Verdict.NONE, Verdict.TOO_FEW):
                add_power(r, n_tested)
        if rep.tested == "assess":
            rep.val_levels = {r.factor: r.levels for r in analyse(rep.factors, main, mode, n_permutations=0)}
        rep.test_levels = {r.factor: r.levels
                           for r in analyse(rep.factors, main, mode, "test_score", n_permutations=0)}
        rep.aliased = aliased_pairs(rep.factors, main)
    if len(done) > len(main):
        hint_metric = "assess" if all(r.value("assess") is not None for r in done) else "objective"
        hints = analyse(binned, done, mode, hint_metric, hint=True)
        order = sorted(range(len(binned)), key=lambda i: -(hints[i].importance or 0.0))
        rep.hint_factors, rep.hints = [binned[i] for i in order], [hints[i] for i in order]
        if not main:
            rep.tested, rep.factors = hint_metric, rep.hint_factors
            rep.test_levels = {r.factor: r.levels
                               for r in analyse(rep.factors, done, mode, "test_score", n_permutations=0)}
    rep.prune_rates = prune_rates(binned, rows)
    if rung_epoch is not None and counts["PRUNED"] and len(at_rung(rows)) >= MIN_TRIALS:
        rep.rung_epoch = rung_epoch
        # every trial reached the rung (no survivors), but which ones the optimiser ran depends on scores
        rep.rung_results = analyse(binned, at_rung(rows), mode, "rung", hint=algorithm not in RANDOMISED)
    rep.interaction = strongest_interaction(binned, done)
    rep.pareto = pareto_front(done, mode)
    return rep


def aliased_pairs(factors: Sequence[Factor], rows: Sequence[TrialRow]) -> list[tuple[str, str]]:
    """Pairs of factors whose levels determine each other on `rows` (each level of one always meets the same
    level of the other, inactive counted as a level): the rows cannot tell their effects apart, and each
    factor's test measures both. A balanced random design of few trials draws such a pair by chance (two
    2-level factors over 8 trials: 2 of the 70 arrangements)."""
    codes = {}
    for f in factors:
        _, c = level_codes(f, rows)
        if len(set(c.tolist()) - {-1}) >= 2:
            codes[f.key] = c
    keys, out = list(codes), []
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            pairs = set(zip(codes[a].tolist(), codes[b].tolist()))
            if len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs}):
                out.append((a, b))
    return out


# ---- descriptive: interaction, Pareto front -------------------------------------------------------
def interaction(fa: Factor, fb: Factor, rows: Sequence[TrialRow]) -> Interaction | None:
    """Cell means of the objective over (level of a, level of b), and how far they are from additive:
    `mean over cells of n * (cell - row - col + grand)^2 / N`. None unless both factors vary together.
    Descriptive only: with a few trials per cell nothing here is tested."""
    both = active_rows(active_rows(finished(rows), fa.key), fb.key)
    la, lb = levels(fa, both), levels(fb, both)
    if len(la) < 2 or len(lb) < 2:
        return None
    row_of = {id(r): i for i, members in enumerate(la.values()) for r in members}
    col_of = {id(r): j for j, members in enumerate(lb.values()) for r in members}
    cells: dict[tuple[int, int], list[float]] = {}
    for r in both:
        cells.setdefault((row_of[id(r)], col_of[id(r)]), []).append(float(r.objective))
    grand = float(np.mean([float(r.objective) for r in both]))
    row_m = [float(np.mean([float(r.objective) for r in v])) for v in la.values()]
    col_m = [float(np.mean([float(r.objective) for r in v])) for v in lb.values()]
    strength = sum(len(v) * (np.mean(v) - row_m[i] - col_m[j] + grand) ** 2 for (i, j), v in cells.items()) / len(both)
    means = [[float(np.mean(cells[(i, j)])) if (i, j) in cells else None for j in range(len(lb))] for i in range(len(la))]
    counts = [[len(cells.get((i, j), [])) for j in range(len(lb))] for i in range(len(la))]
    return Interaction(fa.key, fb.key, float(strength), list(la), list(lb), means, counts)


def strongest_interaction(factors: Sequence[Factor], rows: Sequence[TrialRow]) -> Interaction | None:
    found = [x for i, a in enumerate(factors) for b in factors[i + 1:] if (x := interaction(a, b, rows))]
    return max(found, key=lambda x: x.strength) if found else None


def pareto_front(rows: Sequence[TrialRow], mode: str = "max") -> list[TrialRow]:
    """Finished rows no other row beats on both score and (fewer) trainable params, by params."""
    pts = [r for r in finished(rows) if r.trainable_params is not None]
    sign = 1 if mode == "max" else -1

    def dominated(r: TrialRow) -> bool:
        return any(o.trainable_params <= r.trainable_params and sign * o.objective >= sign * r.objective
                   and (o.trainable_params, o.objective) != (r.trainable_params, r.objective) for o in pts)
    return sorted((r for r in pts if not dominated(r)), key=lambda r: r.trainable_params)

"""The design-factor report of one search: which factors mattered, by how much, and the best configuration.

Everything is computed over the search's FINISHED trials. Trials ASHA stopped (PRUNED) scored fewer
epochs, so their scores are not comparable with finished ones: they are excluded from every effect and
importance and only counted per state, as are failed and still-running trials. The report of a running
search is the report so far.

Pure computations take plain rows (`TrialRow`) and are testable without MLflow; `load_search` reads the
rows of one search from MLflow and `report_search` writes `report.md` + PNGs and logs them to the parent
run. Per factor:

- importance: Optuna's PED-ANOVA and fANOVA, side by side, unnormalised (comparable across factors),
  each over the finished trials where the factor was active (a conditional factor's `inactive` trials
  are left out for that factor only);
- marginal effect of each level (numeric factors binned in terciles, log-spaced factors in log space) on
  the objective and on `test_score`: mean with a seeded bootstrap 95% CI and the number of trials. With
  `budget.repeats` a trial carries one score per k-shot sample: the bootstrap resamples trials, then
  each drawn trial's repeats (a two-stage bootstrap), so the CI holds both kinds of noise;
- a verdict: the best level against the worst, `no detectable effect` when that difference's CI covers
  0, `not varied` when the finished trials sampled one level only.
"""
from __future__ import annotations

import json
import math
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from crosspt.search.params import INACTIVE

N_BOOT = 2000
BOOT_SEED = 0
MIN_TRIALS = 2                 # fewer finished trials: nothing to compare, the report says so
REPORT_DIR = "report"          # artifact folder on the parent run


_REPEAT = re.compile(r"_r\d+$")


def repeat_metric(metric: str, i: int) -> str:
    """The child-run metric holding repeat `i`'s value of `metric` (`best_val_score_r0`, ...)."""
    return f"{metric}_r{i}"


# ---- rows ---------------------------------------------------------------------------------------
@dataclass
class Factor:
    key: str
    numeric: bool = False
    log: bool = False


@dataclass
class TrialRow:
    """One trial as the report sees it. `params` holds every factor, `INACTIVE` where it did not act;
    `repeats` the objective of each k-shot repeat (one value without repeats)."""
    trial_id: str
    state: str                                   # FINISHED | PRUNED | FAILED | RUNNING
    params: dict[str, Any]
    objective: float | None = None
    repeats: list[float] = field(default_factory=list)
    test_score: float | None = None
    test_repeats: list[float] = field(default_factory=list)
    trainable_params: int | None = None
    wall_s: float | None = None
    scores: dict[str, float] = field(default_factory=dict)   # per task: val_<task>_<m>, test_<task>_<m>
    run_id: str = ""

    def values(self, metric: str) -> list[float]:
        """This trial's observations of `metric` ("objective" or "test_score"): its repeats, else its value."""
        reps, value = (self.repeats, self.objective) if metric == "objective" else (self.test_repeats, self.test_score)
        return list(reps) if reps else ([] if value is None else [value])


def finished(rows: Sequence[TrialRow]) -> list[TrialRow]:
    return [r for r in rows if r.state == "FINISHED" and _finite(r.objective)]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def active_rows(rows: Sequence[TrialRow], key: str) -> list[TrialRow]:
    return [r for r in rows if r.params.get(key, INACTIVE) != INACTIVE]


# ---- bootstrap ----------------------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _resample(groups: Sequence[Sequence[float]], rng: random.Random) -> float:
    """One two-stage bootstrap draw of the mean over trials: trials with replacement, then each drawn
    trial's repeats with replacement (a trial without repeats keeps its one value)."""
    drawn = [groups[rng.randrange(len(groups))] for _ in groups]
    return _mean([_mean([g[rng.randrange(len(g))] for _ in g]) for g in drawn])


def _percentiles(draws: list[float]) -> tuple[float, float]:
    draws = sorted(draws)
    return draws[int(0.025 * (len(draws) - 1))], draws[int(math.ceil(0.975 * (len(draws) - 1)))]


def bootstrap_mean_ci(groups: Sequence[Sequence[float]], n_boot: int = N_BOOT,
                      seed: int = BOOT_SEED) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of the mean over trials of each trial's mean; `groups[i]` = trial i's repeats."""
    rng = random.Random(seed)
    return _mean([_mean(g) for g in groups]), *_percentiles([_resample(groups, rng) for _ in range(n_boot)])


def bootstrap_diff_ci(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int = N_BOOT,
                      seed: int = BOOT_SEED) -> tuple[float, float, float]:
    """(mean(a) - mean(b), 2.5%, 97.5%): the two levels resampled independently."""
    rng = random.Random(seed)
    diff = _mean([_mean(g) for g in a]) - _mean([_mean(g) for g in b])
    return diff, *_percentiles([_resample(a, rng) - _resample(b, rng) for _ in range(n_boot)])


# ---- levels -------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def levels(factor: Factor, rows: Sequence[TrialRow]) -> dict[str, list[TrialRow]]:
    """The active rows by level, in level order. A numeric factor with more than 4 distinct values is
    binned in terciles of its sampled values (of their logs for a log-spaced factor: the same cut points
    by rank, labelled as ranges)."""
    rows = active_rows(rows, factor.key)
    values = sorted({r.params[factor.key] for r in rows}, key=lambda v: (str(type(v)), v))
    if not factor.numeric or len(values) <= 4:
        return {_fmt(v): [r for r in rows if r.params[factor.key] == v] for v in values}
    xs = sorted(float(r.params[factor.key]) for r in rows)
    cuts = [xs[len(xs) // 3], xs[(2 * len(xs)) // 3]]
    bins: dict[str, list[TrialRow]] = {}
    for i, (lo, hi) in enumerate(zip([xs[0], *cuts], [*cuts, xs[-1]])):
        members = [r for r in rows if (lo <= float(r.params[factor.key]) < hi) or (i == 2 and float(r.params[factor.key]) == hi)]
        if members:
            bins[f"[{_fmt(lo)}, {_fmt(hi)}{']' if i == 2 else ')'}"] = members
    return bins


@dataclass
class LevelEffect:
    level: str
    n: int                 # trials at this level
    mean: float
    lo: float
    hi: float


def level_effects(factor: Factor, rows: Sequence[TrialRow], metric: str = "objective") -> list[LevelEffect]:
    """Each level's mean of `metric` with its bootstrap 95% CI, over the finished rows with a value."""
    out = []
    for level, members in levels(factor, rows).items():
        groups = [r.values(metric) for r in members if r.values(metric)]
        if groups:
            out.append(LevelEffect(level, len(groups), *bootstrap_mean_ci(groups)))
    return out


# ---- verdicts -----------------------------------------------------------------------------------
@dataclass
class Verdict:
    factor: str
    text: str
    kind: str              # effect | none | not_varied | too_few | inactive
    best: str = ""
    worst: str = ""
    diff: float = float("nan")
    lo: float = float("nan")
    hi: float = float("nan")
    n: int = 0


MIN_TRIALS_PER_LEVEL = 2


def verdict(factor: Factor, rows: Sequence[TrialRow], mode: str = "max", scale: float = 100.0,
            unit: str = "pts") -> Verdict:
    """The best level against the worst on the objective (by their means), in `unit`s of `scale` x the
    metric. Picking both ends by their means makes the difference an upper estimate with more than two
    levels; its CI still decides whether there is a detectable effect."""
    by_level = {k: [r.values("objective") for r in v] for k, v in levels(factor, rows).items()}
    n = sum(len(v) for v in by_level.values())
    if n == 0:
        return Verdict(factor.key, f"{factor.key}: never active in a finished trial", "inactive")
    if len(by_level) < 2:
        only = next(iter(by_level))
        return Verdict(factor.key, f"{factor.key}: not varied (only {only} sampled, {n} trials)", "not_varied", n=n)
    # a level seen in one trial has no spread between configurations: its bootstrap CI collapses to a
    # point and would read as a certain effect. Only levels with MIN_TRIALS_PER_LEVEL trials are compared.
    compared = {k: v for k, v in by_level.items() if len(v) >= MIN_TRIALS_PER_LEVEL}
    if len(compared) < 2:
        counts = ", ".join(f"{k}: {len(v)}" for k, v in by_level.items())
        return Verdict(factor.key, f"{factor.key}: too few trials to tell (trials per level: {counts}; "
                                   f"{MIN_TRIALS_PER_LEVEL} per level needed)", "too_few", n=n)
    by_level = compared
    sign = 1 if mode == "max" else -1
    order = sorted(by_level, key=lambda k: sign * _mean([_mean(g) for g in by_level[k]]), reverse=True)
    best, worst = order[0], order[-1]
    diff, lo, hi = (scale * x for x in bootstrap_diff_ci(by_level[best], by_level[worst]))
    ci = f"{diff:+.1f} {unit} [{lo:.1f}, {hi:.1f}], {n} trials".replace("  ", " ")
    if lo <= 0 <= hi:
        return Verdict(factor.key, f"{factor.key}: no detectable effect ({best} vs {worst}: {ci})", "none",
                       best, worst, diff, lo, hi, n)
    better = "beats" if mode == "max" else "is lower than"
    return Verdict(factor.key, f"{factor.key}: {best} {better} {worst} by {ci}", "effect", best, worst, diff, lo, hi, n)


def score_scale(rows: Sequence[TrialRow]) -> tuple[float, str]:
    """Scores in [0, 1] read as points (x100); anything else in its own units."""
    vals = [v for r in rows for v in r.values("objective")]
    return (100.0, "pts") if vals and all(0 <= v <= 1 for v in vals) else (1.0, "")


# ---- importances --------------------------------------------------------------------------------
def _distribution(factor: Factor, values: list):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if factor.numeric:
        return FloatDistribution(min(values), max(values), log=factor.log and min(values) > 0)
    return CategoricalDistribution(sorted({_fmt(v) for v in values}))


def _study_of(rows: Sequence[TrialRow], factors: Sequence[Factor], mode: str):
    """An in-memory Optuna study of `rows` over `factors` (distributions from the sampled values)."""
    import optuna

    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    dists = {f.key: _distribution(f, [r.params[f.key] for r in rows]) for f in factors}
    for r in rows:
        params = {f.key: (float(r.params[f.key]) if f.numeric else _fmt(r.params[f.key])) for f in factors}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r.objective)))
    return study


def importances(factors: Sequence[Factor], rows: Sequence[TrialRow], mode: str = "max") -> dict[str, dict]:
    """`{factor: {"ped_anova", "fanova", "n"}}`, each factor over the finished rows where it is active,
    together with the other varied factors active in all of those rows (fANOVA needs every param in
    every trial). Unnormalised, so numbers compare across factors. Factors active in the same rows share
    one evaluation."""
    rows = finished(rows)
    out: dict[str, dict] = {}
    evaluated: dict[tuple, dict[str, dict[str, float]]] = {}
    for f in factors:
        sub = active_rows(rows, f.key)
        varied = [g for g in factors if len(sub) == len(active_rows(sub, g.key))
                  and len({_fmt(r.params[g.key]) for r in sub}) > 1]
        if len(sub) < MIN_TRIALS or f not in varied:
            out[f.key] = {"ped_anova": 0.0, "fanova": 0.0, "n": len(sub)}
            continue
        key = (tuple(r.trial_id for r in sub), tuple(g.key for g in varied))
        if key not in evaluated:
            evaluated[key] = _evaluate_importances(sub, varied, mode)
        out[f.key] = {name: imp[f.key] for name, imp in evaluated[key].items()} | {"n": len(sub)}
    return out


def _evaluate_importances(rows: Sequence[TrialRow], factors: Sequence[Factor], mode: str) -> dict[str, dict[str, float]]:
    """`{"ped_anova": {factor: importance}, "fanova": {...}}` of one set of rows. PED-ANOVA's top quantile
    holds at least 5 trials (its authors' advice for a stable estimate), at most half of them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    keys = [g.key for g in factors]
    if len({r.objective for r in rows}) < 2:
        # every trial scored the same: nothing to attribute (fANOVA's forest would raise "zero total
        # variance"), so every factor's importance is 0 and the verdicts say "no detectable effect"
        return {"ped_anova": dict.fromkeys(keys, 0.0), "fanova": dict.fromkeys(keys, 0.0)}
    study = _study_of(rows, factors, mode)
    q = min(0.5, max(0.1, 5 / len(rows)))
    evaluators = {"ped_anova": optuna.importance.PedAnovaImportanceEvaluator(target_quantile=q),
                  "fanova": optuna.importance.FanovaImportanceEvaluator(seed=BOOT_SEED)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)     # normalize=False
        return {name: {k: float(v) for k, v in optuna.importance.get_param_importances(
            study, evaluator=ev, params=[g.key for g in factors], normalize=False).items()}
            for name, ev in evaluators.items()}


def ranked(imp: dict[str, dict]) -> list[str]:
    """Factors by fANOVA importance, then PED-ANOVA."""
    return sorted(imp, key=lambda k: (imp[k]["fanova"], imp[k]["ped_anova"]), reverse=True)


# ---- interactions, Pareto front -----------------------------------------------------------------
@dataclass
class Interaction:
    a: str
    b: str
    strength: float                              # weighted mean square of the non-additive part
    a_levels: list[str]
    b_levels: list[str]
    means: list[list[float | None]]              # [a level][b level]
    counts: list[list[int]]


def interaction(fa: Factor, fb: Factor, rows: Sequence[TrialRow]) -> Interaction | None:
    """Cell means of the objective over (level of a, level of b), and how far they are from additive:
    `mean over cells of n * (cell - row - col + grand)^2 / N`. None unless both factors vary together."""
    both = active_rows(active_rows(finished(rows), fa.key), fb.key)
    la, lb = levels(fa, both), levels(fb, both)
    if len(la) < 2 or len(lb) < 2:
        return None
    row_of = {id(r): i for i, members in enumerate(la.values()) for r in members}
    col_of = {id(r): j for j, members in enumerate(lb.values()) for r in members}
    cells: dict[tuple[int, int], list[float]] = {}
    for r in both:
        cells.setdefault((row_of[id(r)], col_of[id(r)]), []).append(float(r.objective))
    grand = _mean([float(r.objective) for r in both])
    row_m = [_mean([float(r.objective) for r in v]) for v in la.values()]
    col_m = [_mean([float(r.objective) for r in v]) for v in lb.values()]
    strength = sum(len(v) * (_mean(v) - row_m[i] - col_m[j] + grand) ** 2 for (i, j), v in cells.items()) / len(both)
    means = [[_mean(cells[(i, j)]) if (i, j) in cells else None for j in range(len(lb))] for i in range(len(la))]
    counts = [[len(cells.get((i, j), [])) for j in range(len(lb))] for i in range(len(la))]
    return Interaction(fa.key, fb.key, strength, list(la), list(lb), means, counts)


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


# ---- the report ---------------------------------------------------------------------------------
@dataclass
class Report:
    title: str
    metric: str
    mode: str
    factors: list[Factor]
    rows: list[TrialRow]
    best: TrialRow | None
    running: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    importance: dict[str, dict] = field(default_factory=dict)
    effects: dict[str, dict[str, list[LevelEffect]]] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    interaction: Interaction | None = None
    pareto: list[TrialRow] = field(default_factory=list)
    scale: tuple[float, str] = (100.0, "pts")

    @property
    def enough(self) -> bool:
        return len(finished(self.rows)) >= MIN_TRIALS


def build_report(title: str, metric: str, mode: str, factors: list[Factor], rows: list[TrialRow],
                 best_trial_id: str | None, running: bool = False) -> Report:
    """Every number of the report from plain rows; `best_trial_id` comes from the one best-trial rule
    (`crosspt.registry.tracking.best_finished_child`)."""
    done = finished(rows)
    counts = {s: sum(r.state == s for r in rows) for s in ("FINISHED", "PRUNED", "FAILED", "RUNNING")}
    best = next((r for r in rows if r.trial_id == best_trial_id), None)
    rep = Report(title, metric, mode, factors, rows, best, running, counts, scale=score_scale(done))
    if not rep.enough:
        return rep
    rep.importance = importances(factors, done, mode)
    order = ranked(rep.importance)
    rep.factors = sorted(factors, key=lambda f: order.index(f.key))
    rep.effects = {f.key: {m: level_effects(f, done, m) for m in ("objective", "test_score")} for f in rep.factors}
    rep.verdicts = [verdict(f, done, mode, *rep.scale) for f in rep.factors]
    rep.interaction = strongest_interaction(rep.factors, done)
    rep.pareto = pareto_front(done, mode)
    return rep


def _state_line(rep: Report) -> str:
    c = rep.counts
    return (f"{sum(c.values())} trials: {c.get('FINISHED', 0)} finished, {c.get('PRUNED', 0)} pruned "
            f"(stopped early by ASHA; excluded from effects and importances), {c.get('FAILED', 0)} failed, "
            f"{c.get('RUNNING', 0)} running" + (" — the search is still running: report so far" if rep.running else ""))


def _num(v, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def format_table(rep: Report) -> str:
    """The compact terminal table: one line per factor, most important first, then the best trial."""
    lines = [f"report: {rep.title} — {_state_line(rep)}"]
    if not rep.enough:
        return "\n".join(lines + [f"fewer than {MIN_TRIALS} finished trials: no effects to report"])
    lines.append(f"{'factor':<32}{'PED-ANOVA':>10}{'fANOVA':>8}{'n':>4}  verdict")
    for v in rep.verdicts:
        imp = rep.importance[v.factor]
        lines.append(f"{v.factor:<32}{imp['ped_anova']:>10.3f}{imp['fanova']:>8.3f}{imp['n']:>4}  "
                     f"{v.text.split(': ', 1)[1]}")
    if rep.best:
        lines.append(f"best: trial {rep.best.trial_id} {rep.metric}={_num(rep.best.objective)} "
                     f"test_score={_num(rep.best.test_score)} trainable={rep.best.trainable_params}")
    return "\n".join(lines)


def _effects_md(rep: Report, key: str) -> list[str]:
    scale, unit = rep.scale
    obj, test = rep.effects[key]["objective"], {e.level: e for e in rep.effects[key]["test_score"]}
    out = [f"| level | trials | {rep.metric} [95% CI] | test_score [95% CI] |", "|---|---:|---|---|"]
    for e in obj:
        t = test.get(e.level)
        out.append(f"| {e.level} | {e.n} | {scale * e.mean:.1f} [{scale * e.lo:.1f}, {scale * e.hi:.1f}] | "
                   + (f"{scale * t.mean:.1f} [{scale * t.lo:.1f}, {scale * t.hi:.1f}]" if t else "-") + " |")
    return out


def to_markdown(rep: Report, figures: dict[str, str]) -> str:
    """report.md; `figures` maps a figure's name to its file name (only the ones drawn)."""
    md = [f"# Design-factor report: {rep.title}", "", _state_line(rep) + ".", "",
          f"Objective: {rep.mode} `{rep.metric}`. Effects and importances use the FINISHED trials only.", ""]
    if not rep.enough:
        return "\n".join(md + [f"Fewer than {MIN_TRIALS} finished trials: no importances, effects or plots yet."]) + "\n"
    scale, unit = rep.scale
    md += ["## Verdicts", "", *[f"- {v.text}" for v in rep.verdicts], "",
           "## Importance", "",
           "Unnormalised Optuna importances, each over the finished trials where the factor was active.", "",
           "| factor | PED-ANOVA | fANOVA | trials |", "|---|---:|---:|---:|"]
    md += [f"| {k} | {rep.importance[k]['ped_anova']:.4f} | {rep.importance[k]['fanova']:.4f} | "
           f"{rep.importance[k]['n']} |" for k in (f.key for f in rep.factors)]
    md += ["", f"## Marginal effects ({unit or 'metric units'}, mean with bootstrap 95% CI, seed {BOOT_SEED})", ""]
    for f in rep.factors:
        md += [f"### {f.key}", "", *_effects_md(rep, f.key), ""]
    if rep.interaction:
        x = rep.interaction
        md += ["## Strongest pairwise interaction", "", f"`{x.a}` x `{x.b}` (non-additive mean square "
               f"{x.strength * scale * scale:.2f} {unit}²)", ""]
    md += [f"![{name}]({path})" for name, path in figures.items()] + [""]
    if rep.best:
        b = rep.best
        md += ["## Best configuration", "", f"Trial `{b.trial_id}` (run `{b.run_id}`): {rep.metric} = {_num(b.objective)}, "
               f"test_score = {_num(b.test_score)}, trainable params = {b.trainable_params}, wall time = "
               f"{_num(b.wall_s, 1)} s", "", "```json", json.dumps(
                   {k: v for k, v in b.params.items() if v != INACTIVE}, indent=1, default=str), "```", "",
               "| score | value |", "|---|---:|", *[f"| {k} | {v:.4f} |" for k, v in sorted(b.scores.items())], ""]
    md += ["## Pareto front: score vs trainable params", "", f"| trial | trainable params | {rep.metric} |",
           "|---|---:|---:|", *[f"| {r.trial_id} | {r.trainable_params} | {r.objective:.4f} |" for r in rep.pareto], ""]
    return "\n".join(md)


# ---- figures ------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_interaction(x: Interaction, path: Path) -> Path:
    plt = _plt()
    import numpy as np

    grid = np.array([[np.nan if m is None else m for m in row] for row in x.means], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(x.b_levels), 1.2 + 0.7 * len(x.a_levels)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.grid(False)                   # a style's grid lines would cut through the cells
    ax.set_xticks(range(len(x.b_levels)), x.b_levels, rotation=30, ha="right")
    ax.set_yticks(range(len(x.a_levels)), x.a_levels)
    ax.set_xlabel(x.b)
    ax.set_ylabel(x.a)
    for i, row in enumerate(x.means):
        for j, m in enumerate(row):
            if m is not None:
                ax.text(j, i, f"{m:.3f}\nn={x.counts[i][j]}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title("mean objective per cell")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _axis_position(f: Factor, rows: Sequence[TrialRow]):
    """value -> [0, 1] on the factor's axis (inactive at -0.15), and the axis' tick labels."""
    vals = [r.params[f.key] for r in active_rows(rows, f.key)]
    if f.numeric and vals:
        tr = (lambda v: math.log(float(v))) if f.log and min(vals) > 0 else float
        lo, hi = tr(min(vals)), tr(max(vals))
        return (lambda v: -0.15 if v == INACTIVE else (tr(v) - lo) / ((hi - lo) or 1)), \
            {0.0: _fmt(min(vals)), 1.0: _fmt(max(vals))}
    cats = sorted({_fmt(v) for v in vals})
    pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    return (lambda v: -0.15 if v == INACTIVE else pos[_fmt(v)]), {p: c for c, p in pos.items()}


def plot_parallel(rep: Report, path: Path) -> Path:
    """One line per finished trial across the sampled factors, coloured by the objective."""
    plt = _plt()
    rows = finished(rep.rows)
    axes = [(f, *_axis_position(f, rows)) for f in rep.factors]
    objs = [r.objective for r in rows]
    lo, hi = min(objs), max(objs)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(axes), 4))
    for r in sorted(rows, key=lambda r: r.objective * (1 if rep.mode == "max" else -1)):
        ax.plot(range(len(axes)), [pos(r.params.get(f.key, INACTIVE)) for f, pos, _ in axes],
                color=cmap((r.objective - lo) / ((hi - lo) or 1)), alpha=0.8)
    for i, (_, _, ticks) in enumerate(axes):
        ax.axvline(i, color="grey", lw=0.5)
        for p, label in ticks.items():
            ax.text(i + 0.03, p, label, fontsize=7)
    ax.set_xticks(range(len(axes)), [f.key for f, _, _ in axes], rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(sm, ax=ax, label=rep.metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pareto(rep: Report, path: Path) -> Path:
    plt = _plt()
    rows = [r for r in finished(rep.rows) if r.trainable_params is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r.trainable_params for r in rows], [r.objective for r in rows], c="grey", label="finished trials")
    ax.plot([r.trainable_params for r in rep.pareto], [r.objective for r in rep.pareto], "o-", c="C3",
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(rep.metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_figures(rep: Report, out: Path) -> dict[str, str]:
    """The PNGs the report has data for (none below `MIN_TRIALS` finished trials), name -> file name."""
    if not rep.enough:
        return {}
    figs = {"parallel coordinates": plot_parallel(rep, out / "parallel_coordinates.png")}
    if rep.interaction:
        figs["interaction"] = plot_interaction(rep.interaction, out / "interaction.png")
    if rep.pareto:
        figs["pareto front"] = plot_pareto(rep, out / "pareto.png")
    return {k: p.name for k, p in figs.items()}


def write_report(rep: Report, out: str | Path) -> Path:
    """report.md and its PNGs under `out`; returns report.md's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(to_markdown(rep, draw_figures(rep, out)))
    return md


def tables(rep: Report) -> dict[str, dict[str, list]]:
    """The report's numbers as MLflow tables (`log_table` column dicts)."""
    imp = {"factor": [], "ped_anova": [], "fanova": [], "trials": [], "verdict": []}
    for v in rep.verdicts:
        for k, x in zip(imp, (v.factor, rep.importance[v.factor]["ped_anova"], rep.importance[v.factor]["fanova"],
                              rep.importance[v.factor]["n"], v.text)):
            imp[k].append(x)
    eff = {"factor": [], "metric": [], "level": [], "trials": [], "mean": [], "ci_low": [], "ci_high": []}
    for key, by_metric in rep.effects.items():
        for metric, effects in by_metric.items():
            for e in effects:
                for k, x in zip(eff, (key, metric, e.level, e.n, e.mean, e.lo, e.hi)):
                    eff[k].append(x)
    pareto = {"trial_id": [r.trial_id for r in rep.pareto], "trainable_params": [r.trainable_params for r in rep.pareto],
              "objective": [r.objective for r in rep.pareto]}
    return {"importance.json": imp, "effects.json": eff, "pareto.json": pareto}


# ---- MLflow -------------------------------------------------------------------------------------
STATE_OF_STATUS = {"FINISHED": "FINISHED", "FAILED": "FAILED", "RUNNING": "RUNNING", "SCHEDULED": "RUNNING"}


def _row_of(run, factors: list[Factor], metric: str) -> TrialRow:
    """A child run as a row: factor values from the trial's sampled values (typed), `INACTIVE` for a
    factor it did not sample."""
    tags, m = run.data.tags, run.data.metrics
    try:
        sampled = json.loads(tags.get("crosspt.sampled", "{}"))
    except json.JSONDecodeError:         # cut at 5000 chars: fall back to the flat (string) params
        sampled = {}
    params = {f.key: sampled.get(f.key, _param_value(run.data.params.get(f.key, INACTIVE))) for f in factors}
    state = "PRUNED" if tags.get("pruned") == "true" else STATE_OF_STATUS.get(run.info.status, "FAILED")
    reps = [m[repeat_metric(metric, i)] for i in range(len(m)) if repeat_metric(metric, i) in m]
    test_reps = [m[repeat_metric("test_score", i)] for i in range(len(m)) if repeat_metric("test_score", i) in m]
    end = run.info.end_time
    return TrialRow(tags.get("crosspt.trial_id", run.info.run_id), state, params, m.get(metric), reps,
                    m.get("test_score"), test_reps, int(m["trainable_params"]) if "trainable_params" in m else None,
                    (end - run.info.start_time) / 1000 if end and run.info.start_time else None,
                    {k: v for k, v in m.items() if k.startswith(("val_", "test_")) and not _REPEAT.search(k)
                     and k not in ("val_score", "test_score")},
                    run.info.run_id)


def _param_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text) if text != INACTIVE else INACTIVE
    except yaml.YAMLError:
        return text


def _factors(space_tree: dict) -> list[Factor]:
    return [Factor(k, p.get("type") != "choice", p.get("type") == "loguniform" or bool(p.get("log")))
            for k, p in (space_tree.get("space") or {}).items()]


@dataclass
class SearchRows:
    title: str
    parent_run_id: str
    metric: str
    mode: str
    factors: list[Factor]
    rows: list[TrialRow]
    best_trial_id: str | None
    running: bool


def find_parent(c, experiment: str | None = None, parent_run_id: str | None = None):
    """The search's parent run: `parent_run_id`, or the latest search in `experiment`."""
    from mlflow.exceptions import MlflowException

    from crosspt.errors import ConfigError
    from crosspt.registry import tracking as T

    if parent_run_id:
        try:
            run = c.get_run(parent_run_id)
        except MlflowException:
            raise ConfigError(f"no MLflow run '{parent_run_id}'") from None
        if T.SEARCH_TAG not in run.data.tags:
            raise ConfigError(f"run '{parent_run_id}' is not a search's parent run (no {T.SEARCH_TAG} tag)")
        return run
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment '{experiment}'")
    found = c.search_runs([exp.experiment_id], filter_string=f"tags.`{T.SEARCH_TAG}` LIKE '%'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise ConfigError(f"experiment '{experiment}' has no search run")
    return found[0]


def load_search(uri: str, experiment: str | None = None, parent_run_id: str | None = None) -> SearchRows:
    """One search's rows from MLflow: its parent run, factors (the logged space), objective and children."""
    import yaml

    from crosspt.registry import tracking as T

    c = T.client(uri)
    parent = find_parent(c, experiment, parent_run_id)
    pid, eid = parent.info.run_id, parent.info.experiment_id
    try:
        space_tree = yaml.safe_load(Path(c.download_artifacts(pid, "search_space.yaml")).read_text()) or {}
    except Exception:             # an older parent without the space file: the keys it logged, as choices
        space_tree = {"space": {k: {"type": "choice"} for k in parent.data.params.get("space.keys", "").split(",") if k}}
    metric = parent.data.params.get("objective.metric", "best_val_score")
    mode = parent.data.params.get("objective.mode", "max")
    factors = _factors(space_tree)
    rows = [_row_of(r, factors, metric) for r in T.child_runs(uri, eid, pid)]
    best = T.best_finished_child(c, eid, metric, mode, parent_run_id=pid)
    return SearchRows(parent.data.tags.get(T.SEARCH_TAG, pid), pid, metric, mode, factors, rows,
                      best.data.tags.get(T.TRIAL_TAG) if best else None, parent.info.status == "RUNNING")


def report_search(uri: str, *, experiment: str | None = None, parent_run_id: str | None = None,
                  out: str | Path | None = None, log: bool = True) -> tuple[Report, Path]:
    """Build, write (`out`, default `./report-<parent run>`) and log (artifacts under `report/`, tables)
    one search's report; returns it and report.md's path."""
    from crosspt.registry import tracking as T

    s = load_search(uri, experiment, parent_run_id)
    rep = build_report(s.title, s.metric, s.mode, s.factors, s.rows, s.best_trial_id, s.running)
    md = write_report(rep, out or f"report-{s.parent_run_id[:8]}")
    if log:
        c = T.client(uri)
        c.log_artifacts(s.parent_run_id, str(md.parent), REPORT_DIR)
        if rep.enough:
            for name, table in tables(rep).items():
                c.log_table(s.parent_run_id, table, f"{REPORT_DIR}/{name}")
    return rep, md

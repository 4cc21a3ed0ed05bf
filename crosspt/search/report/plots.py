"""The report's figures (matplotlib, PNG), scores in the report's units (points for scores in [0, 1])."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from crosspt.search.params import INACTIVE
from crosspt.search.report.build import Interaction, Report, metric_name
from crosspt.search.report.rows import Factor, TrialRow, active_rows, finished, fmt
from crosspt.search.report.stats import FactorResult, Verdict


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def importance_figure(results: Sequence[FactorResult], title: str = ""):
    """The canonical importance plot: each factor's share of the objective's variance (bar), its noise level
    (the 95th percentile with the levels shuffled, black tick), and its verdict (bar colour)."""
    plt = _plt()
    shown = [r for r in results if r.importance is not None][::-1]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(len(shown), 1)))
    colours = [verdict_colour(r.verdict, "C7") for r in shown]
    ax.barh(range(len(shown)), [r.importance for r in shown], color=colours)
    ax.scatter([r.noise for r in shown], range(len(shown)), marker="|", s=400, color="k")
    for i, r in enumerate(shown):
        ax.text(max(r.importance, r.noise) + 0.01, i, f"{r.verdict.value}  p_adj {r.p_adjusted:.2g}", va="center",
                fontsize=8)
    ax.set_yticks(range(len(shown)), [r.factor for r in shown], fontsize=8)
    ax.set_xlim(0, 1.25)
    ax.set_xlabel("bar: share of the objective's variance explained (red: effect, adjusted p < 0.05 in the design;\n"
                  "orange: hint, the same on trials the optimiser chose, no claim)\n"
                  "black tick: noise level, the share with the factor's levels shuffled (95th percentile)", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()                  # MLflow's log_figure saves the figure as it is
    return fig


def verdict_colour(v: Verdict, other: str) -> str:
    """Red for an effect (a tested claim), orange for a hint (no claim), `other` for the rest."""
    return {Verdict.EFFECT: "C3", Verdict.HINT: "C1"}.get(v, other)


def plot_importance(rep: Report, path: Path) -> Path:
    return _save(importance_figure(rep.shown, f"{rep.title}: importance ({rep.metric})"), path)


def plot_effects(rep: Report, path: Path) -> Path:
    """Each factor's level means with their 95% intervals, one panel per factor, in report units."""
    plt = _plt()
    shown = [r for r in rep.shown if r.levels]
    cols = min(3, max(len(shown), 1))
    nrows = math.ceil(len(shown) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    s = rep.scale[0]
    for ax, r in zip(axes.flat, shown):
        xs = range(len(r.levels))
        means = [s * lv.mean for lv in r.levels]
        err = [[s * (lv.mean - lv.lo) if not math.isnan(lv.lo) else 0 for lv in r.levels],
               [s * (lv.hi - lv.mean) if not math.isnan(lv.hi) else 0 for lv in r.levels]]
        ax.errorbar(xs, means, yerr=err, fmt="o", color=verdict_colour(r.verdict, "C0"), capsize=3)
        ax.set_xticks(list(xs), [f"{lv.level}\nn={lv.n}" for lv in r.levels], fontsize=7)
        ax.set_title(f"{r.factor}: {r.verdict.value}", fontsize=9)
        ax.set_ylabel(f"{metric_name(rep)} ({rep.scale[1] or 'units'})", fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    return _save(fig, path)


def plot_interaction(x: Interaction, path: Path, scale: float = 1.0) -> Path:
    plt = _plt()
    import numpy as np

    grid = np.array([[np.nan if m is None else scale * m for m in row] for row in x.means], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(x.b_levels), 1.2 + 0.7 * len(x.a_levels)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.grid(False)                   # a style's grid lines would cut through the cells
    ax.set_xticks(range(len(x.b_levels)), x.b_levels, rotation=30, ha="right")
    ax.set_yticks(range(len(x.a_levels)), x.a_levels)
    ax.set_xlabel(x.b)
    ax.set_ylabel(x.a)
    for i, row in enumerate(grid):
        for j, m in enumerate(row):
            if not np.isnan(m):
                ax.text(j, i, f"{m:.1f}\nn={x.counts[i][j]}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title("mean objective per cell (descriptive)")
    return _save(fig, path)


def _axis_position(f: Factor, rows: Sequence[TrialRow]):
    """value -> [0, 1] on the factor's axis (inactive at -0.15), and the axis' tick labels."""
    vals = [r.params[f.key] for r in active_rows(rows, f.key)]
    if f.numeric and vals:
        tr = (lambda v: math.log(float(v))) if f.log and min(vals) > 0 else float
        lo, hi = tr(min(vals)), tr(max(vals))
        return (lambda v: -0.15 if v == INACTIVE else (tr(v) - lo) / ((hi - lo) or 1)), \
            {0.0: fmt(min(vals)), 1.0: fmt(max(vals))}
    cats = sorted({fmt(v) for v in vals})
    pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    return (lambda v: -0.15 if v == INACTIVE else pos[fmt(v)]), {p: c for c, p in pos.items()}


def plot_parallel(rep: Report, path: Path) -> Path:
    """One line per finished trial across the sampled factors, coloured by the objective."""
    plt = _plt()
    rows = finished(rep.rows)
    axes = [(f, *_axis_position(f, rows)) for f in rep.factors]
    s = rep.scale[0]
    objs = [s * r.objective for r in rows]
    lo, hi = min(objs), max(objs)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(axes), 4))
    for r in sorted(rows, key=lambda r: r.objective * (1 if rep.mode == "max" else -1)):
        ax.plot(range(len(axes)), [pos(r.params.get(f.key, INACTIVE)) for f, pos, _ in axes],
                color=cmap((s * r.objective - lo) / ((hi - lo) or 1)), alpha=0.8)
    for i, (_, _, ticks) in enumerate(axes):
        ax.axvline(i, color="grey", lw=0.5)
        for p, label in ticks.items():
            ax.text(i + 0.03, p, label, fontsize=7)
    ax.set_xticks(range(len(axes)), [f.key for f, _, _ in axes], rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(sm, ax=ax, label=f"{rep.metric} ({rep.scale[1] or 'units'})")
    return _save(fig, path)


def plot_pareto(rep: Report, path: Path) -> Path:
    plt = _plt()
    s = rep.scale[0]
    rows = [r for r in finished(rep.rows) if r.trainable_params is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r.trainable_params for r in rows], [s * r.objective for r in rows], c="grey", label="finished trials")
    ax.plot([r.trainable_params for r in rep.pareto], [s * r.objective for r in rep.pareto], "o-", c="C3",
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{rep.metric} ({rep.scale[1] or 'units'})")
    ax.legend()
    return _save(fig, path)


def draw_figures(rep: Report, out: Path) -> dict[str, Path]:
    """The PNGs the report has data for (none below `MIN_TRIALS` finished trials), by name."""
    if not rep.enough:
        return {}
    figs = {}
    if any(r.importance is not None for r in rep.shown):
        figs["importance"] = plot_importance(rep, out / "importance.png")
    if any(r.levels for r in rep.shown):
        figs["effects"] = plot_effects(rep, out / "effects.png")
    figs["parallel coordinates"] = plot_parallel(rep, out / "parallel_coordinates.png")
    if rep.interaction:
        figs["interaction"] = plot_interaction(rep.interaction, out / "interaction.png", rep.scale[0])
    if rep.pareto:
        figs["pareto front"] = plot_pareto(rep, out / "pareto.png")
    return figs

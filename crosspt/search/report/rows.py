"""The report's input: one search's trials as plain rows, and each factor's levels over them.

No MLflow, no plotting: `store.py` fills these rows from MLflow, tests and the calibration benchmark build
them directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from crosspt.search.params import INACTIVE

MAX_LEVELS_AS_IS = 4          # a numeric factor with more distinct values is binned in terciles


@dataclass(frozen=True)
class Factor:
    """A searched config key. `bins` (lowest value, the two tercile cuts, highest value) fixes a numeric
    factor's terciles for a whole report (`with_bins`), so every table bins its trials alike."""
    key: str
    numeric: bool = False
    log: bool = False
    bins: tuple[float, float, float, float] | None = None
    strata: bool = False          # levels are the design's strata (`TrialRow.strata`), not value terciles


@dataclass
class TrialRow:
    """One trial as the report sees it. `params` holds every factor, `INACTIVE` where it did not act;
    `repeats` the objective of each k-shot repeat (one value without repeats); `rung` the objective at
    the search's common rung (the epoch every trial, pruned or not, reached), when known; `assess` the
    trial's score on the fixed held-out assessment rows (`assess_score`), when measured. `phase`: "design"
    for a trial of the search's randomised design (`crosspt.search.design`), "optimiser" for one the
    optimiser chose, "" when unknown (a search from before the design phase); `strata`: a design trial's
    stratum of each stratified numeric factor, its level in the report."""
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
    rung: float | None = None
    assess: float | None = None
    phase: str = ""
    strata: dict[str, str] = field(default_factory=dict)

    def values(self, metric: str) -> list[float]:
        """This trial's observations of `metric` ("objective" or "test_score"): its repeats, else its value."""
        reps, value = (self.repeats, self.objective) if metric == "objective" else (self.test_repeats, self.test_score)
        return list(reps) if reps else ([] if value is None else [value])

    def value(self, metric: str) -> float | None:
        """The trial's one number for `metric`: the mean of its repeats (the trial is the unit that was
        randomised, so repeats only make that number less noisy), or the rung value for "rung"."""
        if metric in ("rung", "assess"):
            v = getattr(self, metric)
            return float(v) if finite(v) else None
        vals = [v for v in self.values(metric) if finite(v)]
        return float(np.mean(vals)) if vals else None


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def finished(rows: Sequence[TrialRow]) -> list[TrialRow]:
    return [r for r in rows if r.state == "FINISHED" and finite(r.objective)]


def at_rung(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Finished and pruned trials with a value at the common rung: comparable with each other."""
    return [r for r in rows if r.state in ("FINISHED", "PRUNED") and finite(r.rung)]


def active_rows(rows: Sequence[TrialRow], key: str) -> list[TrialRow]:
    return [r for r in rows if r.params.get(key, INACTIVE) != INACTIVE]


def fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _terciles(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(lowest, first cut, second cut, highest): cuts by rank, so a log-spaced factor bins as in log space."""
    xs = np.sort(np.asarray(values, dtype=float))
    return float(xs[0]), float(xs[len(xs) // 3]), float(xs[(2 * len(xs)) // 3]), float(xs[-1])


def with_strata(factors: Sequence[Factor], rows: Sequence[TrialRow]) -> list[Factor]:
    """`factors` with each numeric one that the design stratified (its rows carry strata) levelled by them."""
    return [replace(f, strata=f.numeric and any(f.key in r.strata for r in rows), bins=None) for f in factors]


def with_bins(factors: Sequence[Factor], rows: Sequence[TrialRow]) -> list[Factor]:
    """`factors` with each numeric one's terciles fixed from its values in `rows` (where it is binned)."""
    out = []
    for f in factors:
        vals = [r.params[f.key] for r in active_rows(rows, f.key)]
        binned = f.numeric and len(set(vals)) > MAX_LEVELS_AS_IS
        out.append(replace(f, bins=_terciles([float(v) for v in vals]) if binned else None))
    return out


def level_codes(factor: Factor, rows: Sequence[TrialRow]) -> tuple[list[str], np.ndarray]:
    """Each row's level of `factor` as an index into the returned level names, in level order; -1 where the
    factor is inactive. A numeric factor with more than `MAX_LEVELS_AS_IS` distinct values is binned in
    terciles (`factor.bins`, else those of its values in `rows`), labelled as ranges. Bins follow the
    multiset of sampled values, so a permutation of the values across rows keeps them."""
    vals = [r.params.get(factor.key, INACTIVE) for r in rows]
    active = [i for i, v in enumerate(vals) if v != INACTIVE]
    codes = np.full(len(rows), -1, dtype=int)
    if factor.strata:                    # design trials: the stratum each value was drawn in is its level
        vals = [r.strata.get(factor.key, v) if v != INACTIVE else v for r, v in zip(rows, vals)]
        distinct = sorted({str(vals[i]) for i in active})
        index = {v: k for k, v in enumerate(distinct)}
        for i in active:
            codes[i] = index[str(vals[i])]
        return distinct, codes
    distinct = sorted({vals[i] for i in active}, key=lambda v: (str(type(v)), v))
    if factor.bins is None and (not factor.numeric or len(distinct) <= MAX_LEVELS_AS_IS):
        names = [fmt(v) for v in distinct]
        index = {v: k for k, v in enumerate(distinct)}
        for i in active:
            codes[i] = index[vals[i]]
        return names, codes
    lo, c1, c2, hi = factor.bins or _terciles([float(vals[i]) for i in active])
    names = [f"[{fmt(lo)}, {fmt(c1)})", f"[{fmt(c1)}, {fmt(c2)})", f"[{fmt(c2)}, {fmt(hi)}]"]
    for i in active:
        codes[i] = int(np.searchsorted([c1, c2], float(vals[i]), side="right"))
    used = sorted(set(codes[active].tolist()))          # a bin can be empty when values tie at a cut
    remap = {old: new for new, old in enumerate(used)}
    codes[active] = [remap[c] for c in codes[active]]
    return [names[k] for k in used], codes


def levels(factor: Factor, rows: Sequence[TrialRow]) -> dict[str, list[TrialRow]]:
    """The active rows by level, in level order (see `level_codes`)."""
    names, codes = level_codes(factor, rows)
    return {name: [r for r, c in zip(rows, codes) if c == k] for k, name in enumerate(names)}

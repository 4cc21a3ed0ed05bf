"""Aggregation of benchmark records: selection by validation, mean ± std tables, the full-mode estimate."""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Iterable, Sequence

from crosspt.bench.methods import SOURCE_STAGES, SPECS, Method

if TYPE_CHECKING:
    from crosspt.bench.settings import BenchSettings

# GLUE dev split sizes (the test split of the benchmark), for scaling measured evaluation times
DEV_SIZES = {"sst2": 872, "rte": 277, "mrpc": 408, "cola": 1043, "stsb": 1500, "qnli": 5463}


def select_best(records: Iterable[dict]) -> dict[tuple, dict]:
    """Per (method, task, k, seed): the record with the best validation score (ties: the earlier lr)."""
    best: dict[tuple, dict] = {}
    for r in records:
        key = (r["method"], r["task"], r["k"], r["seed"])
        if key not in best or r["val"] > best[key]["val"]:
            best[key] = r
    return best


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _cell(by_seed: dict[int, float]) -> dict:
    """{mean, std, n, seeds} over the seeds of one cell."""
    mu, sd = mean_std([by_seed[x] for x in sorted(by_seed)])
    return {"mean": mu, "std": sd, "n": len(by_seed), "seeds": {str(x): by_seed[x] for x in sorted(by_seed)}}


def summarize(selected: Sequence[dict], methods: Sequence[str], tasks: Sequence[str],
              shots: Sequence[int]) -> dict:
    """Cells (method, task, k) -> mean/std over seeds of the test score, plus per-method averages.

    The average of a method at k is computed per seed (mean over the tasks) and then mean ± std over
    seeds; its mean equals the mean of the task means when every seed ran every task."""
    by: dict[tuple, dict[int, float]] = {}
    for r in selected:
        by.setdefault((r["method"], r["task"], r["k"]), {})[r["seed"]] = r["test"]
    cells, avgs = {}, {}
    for m in methods:
        for k in shots:
            per_seed: dict[int, list[float]] = {}
            for t in tasks:
                vals = by.get((m, t, k))
                if vals:
                    cells[f"{m}|{t}|{k}"] = _cell(vals)
                    for x, v in vals.items():
                        per_seed.setdefault(x, []).append(v)
            # a seed counts towards the average only if it ran every task
            full = {x: statistics.fmean(v) for x, v in per_seed.items() if len(v) == len(tasks)}
            if full:
                avgs[f"{m}|{k}"] = _cell(full)
    return {"methods": list(methods), "tasks": list(tasks), "shots": list(shots), "cells": cells, "avg": avgs}


def full_job_counts(full: BenchSettings) -> dict[str, int]:
    """Jobs per method of the full grid `full` (every method, as the harness's phases make them)."""
    n_lr, n_t, n_k, n_s = len(full.lrs), len(full.tasks), len(full.shots), len(full.seeds)
    pool, targets = set(full.source_tasks), set(full.tasks)
    # PT runs on the targets and on the source pool; a pool task that is also a target at the same k once
    pt = n_lr * (n_t * n_k * n_s + n_s * len(pool) - (n_s * len(pool & targets) if full.src_k() in full.shots else 0))
    counts = {}
    for m, spec in SPECS.items():
        if m is Method.PT:
            counts[m] = pt
        elif m in SOURCE_STAGES:                 # one multi-task source stage per target and seed
            counts[m] = n_lr * n_t * n_s
        else:
            counts[m] = (n_lr if spec.trains else 1) * n_t * n_k * n_s
    return counts


def estimate_full_wall(summary: dict, full: BenchSettings) -> dict:
    """Rough sequential wall time of `full` from the measured runs of this (smaller) benchmark.

    Per method: measured mean seconds per job split into epochs (scaled by full.epochs / epochs and by
    full.max_length / max_length) and the rest (loading + test evaluation, scaled by the mean test size);
    job counts from the full grid. An order-of-magnitude figure, not a promise."""
    runs = [r for r in summary["runs"] if r.get("wall_s")]
    if not runs:
        return {}
    q = summary["settings"]

    def test_size(tasks, cap):
        return statistics.fmean(min(DEV_SIZES.get(t, 1000), cap or 10 ** 9) for t in tasks)

    test_ratio = test_size(full.tasks, full.max_test) / test_size(q["tasks"], q["max_test"])
    epoch_ratio = (full.epochs / q["epochs"]) * (full.max_length / q["max_length"])
    per: dict[str, list[float]] = {}
    for r in runs:
        ep = sum(r.get("epoch_s") or [])
        per.setdefault(r["method"], []).append((r["wall_s"] - ep) * test_ratio + ep * epoch_ratio)
    counts = full_job_counts(full)
    detail, total = {}, 0.0
    for m, n in counts.items():
        if m in per:
            sec = statistics.fmean(per[m])
            detail[str(m)] = {"jobs": n, "est_s_per_job": round(sec, 1)}
            total += n * sec
    return {"jobs": sum(counts.values()), "est_s_sequential": total, "test_ratio": test_ratio,
            "epoch_ratio": epoch_ratio, "detail": detail}


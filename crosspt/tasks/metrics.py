"""Task metrics in plain numpy, so scoring needs neither sklearn nor scipy at run time.

Degenerate inputs (constant predictions or labels) score 0.0 instead of NaN plus a warning:
a search must be able to rank a collapsed trial, not crash on it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from crosspt.tasks.specs import Metric, TaskSpec, get_task

# the key of compute_metrics' result that model selection reads, per metric
_PRIMARY = {Metric.ACCURACY: "accuracy", Metric.F1_ACC: "combined", Metric.MCC: "mcc",
            Metric.PEARSON_SPEARMAN: "combined"}


def primary_metric(task: TaskSpec | str) -> str:
    """Key of compute_metrics' result used for model selection."""
    task = get_task(task) if isinstance(task, str) else task
    return _PRIMARY[task.metric]


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold))


def f1_binary(pred: np.ndarray, gold: np.ndarray, positive: int = 1) -> float:
    tp = float(np.sum((pred == positive) & (gold == positive)))
    fp = float(np.sum((pred == positive) & (gold != positive)))
    fn = float(np.sum((pred != positive) & (gold == positive)))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom > 0 else 0.0


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Multi-class MCC (Gorodkin's R_K, which equals the phi coefficient for two classes)."""
    classes, inv = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    g, p = inv[: len(gold)], inv[len(gold):]
    n = len(classes)
    cm = np.zeros((n, n), dtype=np.float64)
    np.add.at(cm, (g, p), 1.0)
    t = cm.sum(axis=1)            # true occurrences per class
    q = cm.sum(axis=0)            # predicted occurrences per class
    c = np.trace(cm)
    s = cm.sum()
    cov_pg = c * s - t @ q
    cov_pp = s * s - q @ q
    cov_gg = s * s - t @ t
    if cov_pp <= 0 or cov_gg <= 0:
        return 0.0
    return float(cov_pg / np.sqrt(cov_pp * cov_gg))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64) - np.mean(x)
    y = y.astype(np.float64) - np.mean(y)
    denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
    if not np.isfinite(denom) or denom <= 0:
        return 0.0
    r = float(np.sum(x * y) / denom)
    return max(-1.0, min(1.0, r))


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties get their average rank (as scipy.stats.rankdata's default)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start of each run of equal values
    new = np.concatenate([[True], xs[1:] != xs[:-1]])
    run_id = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.concatenate([starts[1:], [len(xs)]])
    avg = (starts + ends + 1) / 2.0          # mean of 1-based ranks start+1..end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


def compute_metrics(task: TaskSpec | str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """Scores of one task's predictions against gold labels, keyed as the task's metric implies."""
    task = get_task(task) if isinstance(task, str) else task
    pred = np.asarray(predictions)
    gold = np.asarray(labels)
    if pred.shape != gold.shape or pred.ndim != 1:
        raise ValueError(f"task '{task.name}': predictions {pred.shape} and labels {gold.shape} "
                         f"must be 1-D and the same length")
    if len(gold) == 0:
        raise ValueError(f"task '{task.name}': no predictions to score")
    if task.metric == Metric.PEARSON_SPEARMAN:
        p, s = pearson(pred, gold), spearman(pred, gold)
        return {"pearson": p, "spearman": s, "combined": (p + s) / 2}
    pred = pred.astype(np.int64)
    gold = gold.astype(np.int64)
    if task.metric == Metric.ACCURACY:
        return {"accuracy": accuracy(pred, gold)}
    if task.metric == Metric.F1_ACC:
        f1, acc = f1_binary(pred, gold), accuracy(pred, gold)
        return {"f1": f1, "accuracy": acc, "combined": (f1 + acc) / 2}
    if task.metric == Metric.MCC:
        return {"mcc": matthews(pred, gold)}
    raise ValueError(f"task '{task.name}': unknown metric '{task.metric}'")


def average_primary(metrics_by_task: Mapping[str, Mapping[str, float]]) -> float:
    """Mean over tasks of each task's primary metric: the multi-task selection score."""
    if not metrics_by_task:
        raise ValueError("no task metrics to average")
    return float(np.mean([m[primary_metric(t)] for t, m in metrics_by_task.items()]))

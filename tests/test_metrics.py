"""Metrics agree with sklearn/scipy, and degenerate inputs score 0.0 without warnings."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from crosspt.tasks.metrics import average_primary, compute_metrics, primary_metric, rankdata
from crosspt.tasks.specs import get_task

sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_f1_mcc_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, size=200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    m = compute_metrics(get_task("mrpc"), pred.tolist(), gold.tolist())
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold, pred))
    assert m["f1"] == pytest.approx(sklearn_metrics.f1_score(gold, pred))
    assert m["combined"] == pytest.approx((m["f1"] + m["accuracy"]) / 2)
    c = compute_metrics(get_task("cola"), pred, gold)
    assert c["mcc"] == pytest.approx(sklearn_metrics.matthews_corrcoef(gold, pred))
    a = compute_metrics(get_task("rte"), pred, gold)
    assert a == {"accuracy": pytest.approx(sklearn_metrics.accuracy_score(gold, pred))}


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_mcc_and_accuracy(seed):
    rng = np.random.default_rng(100 + seed)
    gold = rng.integers(0, 3, size=150)
    pred = rng.integers(0, 3, size=150)
    from crosspt.tasks.metrics import matthews
    assert matthews(pred, gold) == pytest.approx(sklearn_metrics.matthews_corrcoef(gold, pred))
    assert compute_metrics("cb", pred, gold)["accuracy"] == pytest.approx(
        sklearn_metrics.accuracy_score(gold, pred))


@pytest.mark.parametrize("seed", range(5))
def test_pearson_spearman_match_scipy(seed):
    rng = np.random.default_rng(seed)
    gold = np.round(rng.uniform(0, 5, size=300) * 5) / 5        # many ties, like STS-B
    pred = np.clip(gold + rng.normal(0, 1.0, size=300), 0, 5)
    pred[:40] = np.round(pred[:40])                              # ties in predictions too
    m = compute_metrics(get_task("stsb"), pred, gold)
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0])
    assert m["combined"] == pytest.approx((m["pearson"] + m["spearman"]) / 2)


def test_rankdata_matches_scipy():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 10, size=100)
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x))


def test_degenerate_inputs_score_zero_without_warnings():
    gold = [0, 1, 0, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_metrics("cola", [1] * 5, gold)["mcc"] == 0.0
        assert compute_metrics("cola", [1] * 5, [1] * 5)["mcc"] == 0.0
        m = compute_metrics("mrpc", [0] * 5, [0] * 5)
        assert m["f1"] == 0.0 and m["accuracy"] == 1.0
        s = compute_metrics("stsb", [2.0] * 5, [0.0, 1.0, 2.0, 3.0, 4.0])
        assert s == {"pearson": 0.0, "spearman": 0.0, "combined": 0.0}


def test_shape_mismatch_and_empty_raise():
    with pytest.raises(ValueError):
        compute_metrics("rte", [0, 1], [0])
    with pytest.raises(ValueError):
        compute_metrics("rte", [], [])


def test_primary_metric_and_average():
    assert primary_metric("rte") == "accuracy"
    assert primary_metric("mrpc") == "combined"
    assert primary_metric("stsb") == "combined"
    assert primary_metric(get_task("cola")) == "mcc"
    avg = average_primary({"rte": {"accuracy": 0.6}, "cola": {"mcc": 0.2},
                           "mrpc": {"f1": 0.9, "accuracy": 0.7, "combined": 0.8}})
    assert avg == pytest.approx((0.6 + 0.2 + 0.8) / 3)

"""Every end state recorded as what it was, and nothing deleted that is not proved lost: the end-of-search
reconciliation against Tune's saved state, pruned trials through a restore, time-budget stops, two drivers
of one search. Real sqlite MLflow stores and Optuna studies; Tune's state files as Tune writes them."""
from __future__ import annotations

import pytest

from crosspt.errors import SearchStateError
from crosspt.registry import tracking as T


def _search_with_children(uri: str, n: int) -> tuple[str, str, list[str]]:
    c = T.client(uri)
    exp = T.ensure_experiment(uri, "ends")
    parent = c.create_run(exp).info.run_id
    kids = [c.create_run(exp, tags={"mlflow.parentRunId": parent, T.TRIAL_TAG: f"t{i}"}).info.run_id
            for i in range(n)]
    for k in kids:
        c.set_terminated(k, "FINISHED")
    return exp, parent, kids


def _active(uri: str, exp: str, parent: str) -> int:
    return len(T.child_runs(uri, exp, parent))


def test_unreadable_tune_state_deletes_no_child_run(tmp_path):
    """Tune's experiment state made unreadable before the end-of-search reconciliation (as the driver runs
    it: `reconcile_child_runs(..., tune_trials(root), search_ended=True)`): one line naming the folder and
    what to run, and every child run still active. Before: the state read as no trials, every child run
    was taken for an orphan and soft-deleted."""
    from crosspt.search.reconcile import reconcile_child_runs, tune_trials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp, parent, kids = _search_with_children(uri, 3)
    root = tmp_path / "ray_results" / "ends"
    root.mkdir(parents=True)
    (root / "experiment_state-2026-12-07_00-00-00.json").write_text('{"trial_data": [')     # cut mid-write
    assert _active(uri, exp, parent) == 3
    raised = None
    try:
        reconcile_child_runs(uri, exp, parent, tune_trials(str(root)), search_ended=True)
    except SearchStateError as e:
        raised = str(e)
    assert _active(uri, exp, parent) == 3
    assert raised and "\n" not in raised and str(root) in raised and "--resume" in raised, raised


def test_no_saved_tune_state_is_no_trials(tmp_path):
    """A folder where Tune saved nothing yet (the driver died before its first save) has no trials: that,
    and only that, is what makes every child run an orphan on `--resume`."""
    from crosspt.search.reconcile import tune_trials

    assert tune_trials(str(tmp_path / "never_started")) == []
    (tmp_path / "empty").mkdir()
    assert tune_trials(str(tmp_path / "empty")) == []


def test_a_normal_end_deletes_no_run_tune_does_not_name(tmp_path):
    """At the end of a search there is no orphan pass: a child run whose trial Tune's record lacks stays
    where it is (counted as unknown), the runs of trials Tune knows are closed by their status."""
    from types import SimpleNamespace

    from crosspt.search.reconcile import reconcile_child_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp, parent, kids = _search_with_children(uri, 3)
    trials = [SimpleNamespace(trial_id="t0", status="TERMINATED", last_result={"final_epoch": True})]
    counts = reconcile_child_runs(uri, exp, parent, trials, search_ended=True)
    assert counts == {"orphaned": 0, "closed": 0, "unknown": 2}
    assert _active(uri, exp, parent) == 3

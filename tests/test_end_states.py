"""Every end state recorded as what it was, and nothing deleted that is not proved lost: the end-of-search
reconciliation against Tune's saved state, pruned trials through a restore, time-budget stops, two drivers
of one search. Real sqlite MLflow stores and Optuna studies; Tune's state files as Tune writes them."""
from __future__ import annotations

import pytest

from crosspt.errors import SearchStateError
from crosspt.registry import best_run, experiments, run_log, store


def _search_with_children(uri: str, n: int) -> tuple[str, str, list[str]]:
    c = store.client(uri)
    exp = experiments.ensure_experiment(uri, "ends")
    parent = c.create_run(exp).info.run_id
    kids = [c.create_run(exp, tags={"mlflow.parentRunId": parent, experiments.TRIAL_TAG: f"t{i}"}).info.run_id
            for i in range(n)]
    for k in kids:
        c.set_terminated(k, "FINISHED")
    return exp, parent, kids


def _active(uri: str, exp: str, parent: str) -> int:
    return len(experiments.child_runs(uri, exp, parent))


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


def _space(tmp_path, scheduler: dict):
    import yaml

    from crosspt.config.space import load_space

    tree = {"name": "ends", "base": {"backbone": {"name": "minilm"}, "tasks": ["rte"], "train": {"epochs": 4}},
            "space": {"optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.3}},
            "objective": {"metric": "best_val_score", "mode": "max"},
            "budget": {"num_samples": 2, "max_epochs": 4}, "scheduler": scheduler,
            "search": {"algorithm": "optuna", "seed": 0}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tree))
    return load_space(tmp_path / "space.yaml")


def test_a_pruned_trial_replays_pruned_in_optuna(tmp_path):
    """A trial restored after a crash whose earlier attempt was pruned (its child run FINISHED with
    `pruned=true`) reports that run again instead of training (`trainable.replay_result`); the searcher
    then records it PRUNED in the Optuna study, as it was. Before: the replay said `final_epoch`, and the
    study held it COMPLETE with its partial score, for TPE to learn from."""
    import optuna

    from crosspt.search.optuna_glue import make_searcher, rdb_storage
    from crosspt.search.trainable import replay_result

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = store.client(uri)
    exp = experiments.ensure_experiment(uri, "ends")
    rid = c.create_run(exp, tags={experiments.TRIAL_TAG: "tid0"}).info.run_id
    run_log.log_metrics(c, rid, {"best_val_score": 0.61, "epoch": 1})
    c.set_tag(rid, best_run.STOPPED_BY_TAG, best_run.STOPPED_BY_SCHEDULER)
    best_run.close_pruned(c, rid, 1)
    optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(_space(tmp_path, {"type": "asha", "grace_period": 1}), optuna_url, "ends")
    searcher.suggest("tid0")
    searcher.on_trial_complete("tid0", replay_result(c.get_run(rid)))
    study = optuna.load_study(study_name="ends", storage=rdb_storage(optuna_url))
    assert [t.state.name for t in study.trials] == ["PRUNED"]


def test_a_time_budget_stop_is_not_pruned_by_asha(tmp_path):
    """A trial stopped before its last epoch is recorded as pruned by ASHA only where ASHA decided it
    (`DesignASHA` tags the run as it returns STOP); a stop of the search (time_budget_s, FIFO) says so.
    Before: every early end read "Pruned: the scheduler (ASHA) stopped this trial"."""
    from ray.tune.experiment import Trial

    from crosspt.search.optuna_glue import MLFLOW_RUN_ATTR, make_scheduler

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = store.client(uri)
    exp = experiments.ensure_experiment(uri, "ends")
    budget, good, bad = (c.create_run(exp).info.run_id for _ in range(3))
    # the search's time budget ran out mid-trial: nothing tagged it, it closes as the trial does (`finish_pruned`)
    best_run.close_pruned(c, budget, 1)
    run = c.get_run(budget)
    note = run.data.tags["mlflow.note.content"]
    assert "ASHA" not in note and "time budget" in note, note
    assert run.data.tags[best_run.STOPPED_BY_TAG] == best_run.STOPPED_BY_SEARCH and run.data.tags[best_run.PRUNED_TAG] == "true"

    asha = make_scheduler(_space(tmp_path, {"type": "asha", "grace_period": 1, "reduction_factor": 2}), 4, tracking_uri=uri)
    trials = {rid: Trial("run_trial", trial_id=f"t{i}", stub=True) for i, rid in enumerate((good, bad))}
    decisions = {}
    for rid, score in ((good, 0.9), (bad, 0.1)):
        asha.on_trial_add(None, trials[rid])
        decisions[rid] = asha.on_trial_result(None, trials[rid], {"training_iteration": 1, "best_val_score": score,
                                                                   MLFLOW_RUN_ATTR: rid})
    assert decisions == {good: asha.CONTINUE, bad: asha.STOP}
    best_run.close_pruned(c, bad, 0)
    note = c.get_run(bad).data.tags["mlflow.note.content"]
    assert note.startswith("Pruned: the scheduler (ASHA) stopped this trial after epoch 0"), note
    assert best_run.STOPPED_BY_TAG not in c.get_run(good).data.tags


def test_a_second_driver_of_one_search_is_refused(tmp_path):
    """Two drivers claim one new search before either wrote its state: the second is refused with one line
    naming the first; once the first releases it (or dies: the flock goes with its process), it can be
    claimed. Before: both claimed it and ran the same search into one Tune folder and one study."""
    from crosspt.search.state import claim_state, release_claim, search_paths

    space = _space(tmp_path, {"type": "fifo"})
    paths = search_paths(space, str(tmp_path / "ray_results"), f"sqlite:///{tmp_path / 'mlflow.db'}", "ends")
    assert claim_state(paths, "ends", "ends", resume=False, overwrite=False) is None
    try:
        with pytest.raises(SearchStateError) as e:
            claim_state(paths, "ends", "ends", resume=False, overwrite=False)
        assert "\n" not in str(e.value) and "already being run" in str(e.value), str(e.value)
        # another process (a second `crosspt search`): refused, naming the holder
        import subprocess
        import sys

        code = ("import sys; from crosspt.errors import SearchStateError; from crosspt.search.state import *;"
                "from crosspt.config.space import load_space;"
                f"p = search_paths(load_space({str(tmp_path / 'space.yaml')!r}), {str(tmp_path / 'ray_results')!r},"
                f" 'sqlite:///{tmp_path / 'mlflow.db'}', 'ends')\n"
                "try: claim_state(p, 'ends', 'ends', False, False)\n"
                "except SearchStateError as e: print(e); sys.exit(2)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "is being run by another driver (pid" in out.stdout, out.stdout + out.stderr
    finally:
        release_claim(paths)
    assert claim_state(paths, "ends", "ends", resume=False, overwrite=False) is None
    release_claim(paths)


@pytest.mark.slow
def test_a_report_that_cannot_be_drawn_is_the_search_s_last_line(ray_head, tiny_t5_path, data_dir, tmp_path):
    """The search's report cannot be written (its folder's name is taken by a file): `crosspt search` ends
    with one `error:` line saying so and how to draw it again, exit 1, the trials kept; `crosspt report
    --parent` prints the same line. Before: exit 0, the failure only inside the summary's table and a tag."""
    import yaml
    from test_reliability import cli_env, run, search_cmd, tiny_tree

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_tree(tiny_t5_path, "noreport", samples=2, epochs=1)))
    db, storage = tmp_path / "mlflow.db", tmp_path / "ray_results"
    storage.mkdir()
    (storage / "noreport_report").write_text("in the way")
    env = cli_env(RAY_ADDRESS=ray_head.address, CROSSPT_DATA_DIR=str(data_dir))
    out = run(search_cmd(space, db, storage, "--summary-json", str(tmp_path / "s.json")), env, tmp_path, 480)
    last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
    assert out.returncode == 1 and last.startswith("error: the design-factor report of parent run"), \
        f"rc={out.returncode}\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}"
    assert "FileExistsError" in last and "crosspt report --parent" in last, last
    import json

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["num_trials"] == 2
    again = run([*search_cmd(space, db, storage)[:3], "report", "--parent", summary["parent_run_id"],
                 "--tracking-uri", f"sqlite:///{db}", "--out", str(storage / "noreport_report")], env, tmp_path, 300)
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == last, again.stderr[-1500:]

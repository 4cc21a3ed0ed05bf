"""Reliability: faults injected into real processes, and what a search does about them.

- a search driver SIGKILLed mid-search, then `crosspt search --resume` (no rerun, no duplicate, nothing
  left RUNNING), a second search under the same name refused, `--overwrite` starting over;
- trials that raise, that diverge (NaN loss), whose process dies (`CROSSPT_FAULT` testing hook), with
  retries (`resources.max_retries`): FAILED in Tune and MLflow, the search goes on and reports them;
- a Ray Train worker of a 2-worker trial SIGKILLed: the trial recovers from its last checkpoint;
- an MLflow server that is not there: one `error:` line before anything starts;
- bad search-space / config files (hypothesis): a ConfigError naming the key, never another exception;
- artifacts: safetensors only, metadata checked against the config, nothing unpickled;
- exposure: a local Ray listens on loopback only; no secret reaches MLflow params or tags.

The processes are real: the test Ray head (`ray start --head` on 127.0.0.1), `crosspt` CLI drivers as
subprocesses, Tune trial actors, Ray Train worker groups, sqlite MLflow stores, tiny random T5 models.
"""
from __future__ import annotations

import ast
import json
import re
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from crosspt.registry import experiments, store
from crosspt.config.schema import load_config
from crosspt.errors import ArtifactError, ConfigError

REPO = Path(__file__).resolve().parents[1]


# ---- helpers -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_tree(backbone: Path, name: str, *, samples: int, epochs: int, **extra) -> dict:
    """A search space over a tiny random T5 on real RTE rows: seconds per trial on 2 CPUs."""
    tree = {
        "name": name,
        "base": {"tasks": ["rte"], "seed": 0, "backbone": {"name": str(backbone), "max_length": 48},
                 "data": {"shots": 4, "max_test": 16}, "prompt": {"private_len": 4},
                 "train": {"batch_size": 8, "eval_batch_size": 32, "patience": None},
                 "scaling": {"num_workers": 1, "in_process": True}},
        "space": {"optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.3},
                  "prompt.private_len": {"type": "int", "low": 2, "high": 6}},
        "objective": {"metric": "best_val_score", "mode": "max"},
        "budget": {"num_samples": samples, "max_epochs": epochs},
        "scheduler": {"type": "fifo"},
        "search": {"algorithm": "optuna", "seed": 0},
    }
    for k, v in extra.items():
        tree[k] = {**tree.get(k, {}), **v} if isinstance(v, dict) else v
    return tree


def cli_env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("CROSSPT_FAULT", None)
    env.update({k: v for k, v in extra.items() if v is not None})
    for k in [k for k, v in extra.items() if v is None]:
        env.pop(k, None)
    return env


def search_cmd(space: Path, db: Path, storage: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "crosspt.cli", "search", "--space", str(space), "--tracking-uri", f"sqlite:///{db}",
            "--storage-path", str(storage), *more]


def run(cmd: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """A CLI run bounded in time: a hang fails the test instead of blocking the suite."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(cmd[2:5])} hung for {timeout}s:\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def sql(db: Path, query: str, *args) -> list:
    """Read the MLflow sqlite store directly (no client, safe while another process writes it)."""
    if not db.is_file():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(query, args).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


def trial_runs(db: Path) -> list[tuple]:
    """(trial_id, status, end_time, lifecycle) of every child run that belongs to a trial."""
    return sql(db, "select t.value, r.status, r.end_time, r.lifecycle_stage from runs r join tags t "
                   "on t.run_uuid = r.run_uuid and t.key = ?", experiments.TRIAL_TAG)


def ray_procs(head, title: str) -> list[int]:
    """PIDs of the test head's Ray processes whose title starts with `title` (ray::ImplicitFunc = a Tune
    trial, ray::RayTrainWorker = a Train worker). Only descendants of our own head: other Rays on the
    machine are not ours to look at."""
    pids = []
    for p in psutil.Process(head.proc.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and " ".join(p.cmdline()).startswith(title):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
             every: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"driver exited ({proc.returncode}) before {what}:\n"
                        + (log.read_text()[-4000:] if log else ""))
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {what}" + (f":\n{log.read_text()[-4000:]}" if log else ""))


def killable_search(tmp_path: Path, backbone: Path, name: str, samples: int, epochs: int, ray_head, data_dir):
    """A space file of `samples` tiny trials, and where its search keeps things: (space, db, storage, env)."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_tree(backbone, name, samples=samples, epochs=epochs)))
    env = cli_env(RAY_ADDRESS=ray_head.address, CROSSPT_DATA_DIR=str(data_dir))
    return space, tmp_path / "mlflow.db", tmp_path / "ray_results", env


# ---- 1. a killed driver, resumed -----------------------------------------------------------------
@pytest.mark.slow
def test_killed_driver_resumes_without_rerun_or_duplicates(ray_head, tiny_t5_path, data_dir, tmp_path):
    """SIGKILL the search driver (its own process group) once a trial has FINISHED in MLflow; the trial
    actors it owned die with it; `--resume` finishes the search: every trial exactly once in Tune and
    in MLflow, the finished ones not run again, nothing RUNNING. Then the name is taken (exit 2 without
    --resume/--overwrite) and `--overwrite` starts over."""
    samples, epochs = 3, 2
    space, db, storage, env = killable_search(tmp_path, tiny_t5_path, "killed", samples, epochs, ray_head, data_dir)
    log = tmp_path / "driver1.log"
    t0 = time.time()
    with open(log, "w") as out:
        driver = subprocess.Popen(search_cmd(space, db, storage), cwd=tmp_path, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: any(s == "FINISHED" for _, s, _, _ in trial_runs(db)), 420,
                 "a FINISHED trial in MLflow", driver, log)
        actors = ray_procs(ray_head, "ray::ImplicitFunc")
        os.killpg(driver.pid, signal.SIGKILL)                    # the fault: no cleanup, no signal handler
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    killed_at = time.time() - t0
    # Ray ends the actors of a dead driver (they are owned by it): none of its trials keeps running
    wait_for(lambda: not any(alive(p) for p in actors), 60, f"the dead driver's trial actors {actors} to exit")
    before = {tid: (status, end) for tid, status, end, _ in trial_runs(db)}
    finished_before = {tid for tid, (s, _) in before.items() if s == "FINISHED"}
    running_before = {tid for tid, (s, _) in before.items() if s == "RUNNING"}

    # a new search under the same name is refused, before anything starts
    out = run(search_cmd(space, db, storage), env, tmp_path, 300)
    assert out.returncode == 2, out.stderr[-3000:]
    errs = error_lines(out.stderr)
    assert len(errs) == 1 and "--resume" in errs[0] and "--overwrite" in errs[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert {tid for tid, *_ in trial_runs(db)} == set(before)

    # resume: the search runs to its end
    t1 = time.time()
    out = run(search_cmd(space, db, storage, "--resume", "--summary-json", str(tmp_path / "resumed.json")),
              env, tmp_path, 480)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    resume_s = time.time() - t1
    summary = json.loads((tmp_path / "resumed.json").read_text())
    tune_ids = [t["trial_id"] for t in summary["trials"]]
    assert summary["num_trials"] == samples and len(set(tune_ids)) == samples
    assert summary["num_failed"] == 0 and all(t["status"] == "FINISHED" for t in summary["trials"])
    assert all(t["epochs"] == epochs for t in summary["trials"]), summary["trials"]

    runs = trial_runs(db)
    active = [(tid, s, end) for tid, s, end, life in runs if life == "active"]
    orphans = [tid for tid, s, end, life in runs if life == "deleted"]
    # exactly one child run per trial, none left RUNNING, and every trial has one
    duplicated = len(active) - len({tid for tid, *_ in active})
    lost = set(tune_ids) - {tid for tid, *_ in active}
    assert sorted(tid for tid, *_ in active) == sorted(tune_ids), (active, tune_ids)
    assert all(s == "FINISHED" for _, s, _ in active), active
    c = store.client(f"sqlite:///{db}")
    from mlflow.entities import ViewType

    for tid in orphans:          # a trial Tune never recorded: closed KILLED, tagged, soft-deleted
        r = c.search_runs([summary["experiment_id"]], f"tags.`{experiments.TRIAL_TAG}` = '{tid}'",
                          run_view_type=ViewType.DELETED_ONLY)[0]
        assert r.info.status == "KILLED" and r.data.tags.get("crosspt.orphaned") == "true"
    # the trials that had finished were not run again: same end time, no restart, one value per epoch
    by_tid = {tid: (s, end) for tid, s, end in active}
    rerun = []
    for tid in finished_before:
        run_ = experiments.find_trial_run(f"sqlite:///{db}", summary["experiment_id"], summary["parent_run_id"], tid)
        steps = [m.step for m in c.get_metric_history(run_.info.run_id, "epoch")]
        if by_tid[tid][1] != before[tid][1] or "crosspt.restarts" in run_.data.tags or sorted(steps) != list(range(epochs)):
            rerun.append((tid, steps, run_.data.tags.get("crosspt.restarts")))
    assert not rerun, rerun
    replayed = [tid for tid in finished_before if "crosspt.replayed" in
                experiments.find_trial_run(f"sqlite:///{db}", summary["experiment_id"], summary["parent_run_id"], tid).data.tags]
    # the trials that were RUNNING continued in their own child run
    continued = [tid for tid in running_before if tid in by_tid]
    parent = c.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags.get("crosspt.resumes") == "1"
    import optuna

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    print(f"\nkilled driver at {killed_at:.0f}s: {len(finished_before)} trial(s) FINISHED, {len(running_before)} "
          f"RUNNING, {len(actors)} trial actor(s) (all exited); resume took {resume_s:.0f}s: {samples} trials, "
          f"{len(rerun)} rerun, {len(replayed)} finished-but-unrecorded reported from MLflow, {duplicated} "
          f"duplicated, {len(lost)} lost, {len(continued)} continued, "
          f"{len(orphans)} orphaned run(s) closed, "
          f"{sum(t.state.name == 'FAIL' for t in study.trials)} stale Optuna trial(s) marked FAIL")

    # overwrite (`--overwrite`, here in-process to spare a CLI start) discards the saved search and starts
    # it again under a new parent run
    from crosspt.search.driver import run_search
    from crosspt.config.space import load_space

    again = run_search(load_space(space, ["budget.num_samples=1", "budget.max_epochs=1"]), data_dir=str(data_dir),
                       tracking_uri=f"sqlite:///{db}", storage_path=str(storage), overwrite=True, verbose=0)
    assert again["parent_run_id"] != summary["parent_run_id"] and again["num_trials"] == 1
    state = json.loads((storage / "killed" / "crosspt_search.json").read_text())
    assert state["parent_run_id"] == again["parent_run_id"]
    assert len(optuna.load_study(study_name="killed", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 1


KILL_TABLE: dict[str, str] = {}


@pytest.fixture(scope="module")
def kill_table():
    yield KILL_TABLE
    if KILL_TABLE:
        print("\nkill point      -> outcome of --resume\n" + "\n".join(f"{k:<15} -> {v}" for k, v in KILL_TABLE.items()))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_ray", "before_tuner", "mid_trial", "reconcile"])
def test_resume_works_from_every_kill_point(point, kill_table, ray_head, tiny_t5_path, data_dir, tmp_path):
    """The driver dies (SIGKILL, no cleanup) before Ray starts, after crosspt's state file but before Tune's
    `tuner.pkl`, mid trial, or at the final reconciliation; `--resume` ends the search: exit 0, no traceback,
    num_samples trials, none RUNNING, none duplicated, the parent FINISHED (where Tune had saved nothing,
    the trials start afresh under the same parent run)."""
    # mid_trial: 8 epochs, so that a trial is still RUNNING after its first logged epoch when the poll looks
    # (with 2 epochs the faster loop could finish both trials between two polls: the driver was never killed)
    samples, epochs = 2, (8 if point == "mid_trial" else 2)
    space, db, storage, env = killable_search(tmp_path, tiny_t5_path, "kill", samples, epochs, ray_head, data_dir)
    log = tmp_path / "driver1.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(search_cmd(space, db, storage), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  env={**env, **({"CROSSPT_DRIVER_KILL": point} if point != "mid_trial" else {})},
                                  start_new_session=True)
    try:
        if point == "mid_trial":
            wait_for(lambda: sql(db, "select 1 from runs r join metrics m on m.run_uuid = r.run_uuid "
                                     "where r.status = 'RUNNING' and m.key = 'val_score'"), 420,
                     "a trial mid-way (an epoch logged, still RUNNING)", driver, log)
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(420)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    had_tune_state = any((storage / "kill").glob("experiment_state*.json"))
    had_tuner_pkl = (storage / "kill" / "tuner.pkl").is_file()
    before = trial_runs(db)

    out = run(search_cmd(space, db, storage, "--resume", "--summary-json", str(tmp_path / "resumed.json")),
              env, tmp_path, 480)
    # the driver's own output has no traceback; Ray forwards its workers' lines with a `(run_trial pid=N)`
    # prefix, and a trial actor SIGTERMed as the resumed search shuts down may print Ray's own teardown noise
    # there ("Exception ignored in ... sigterm_handler ... SystemExit: 1"); a trial that failed shows in the
    # summary and the runs below
    own = "\n".join(line for line in (out.stderr + out.stdout).splitlines() if not re.search(r"\(\w+ pid=\d+", line))
    assert "Traceback" not in own, out.stderr[-4000:]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    summary = json.loads((tmp_path / "resumed.json").read_text())
    assert summary["num_trials"] == samples and len({t["trial_id"] for t in summary["trials"]}) == samples
    active = [(tid, s) for tid, s, _, life in trial_runs(db) if life == "active"]
    assert not [a for a in active if a[1] == "RUNNING"], active
    assert len(active) == len({tid for tid, _ in active}) == samples, active
    assert sorted(tid for tid, _ in active) == sorted(t["trial_id"] for t in summary["trials"])
    c = store.client(f"sqlite:///{db}")
    parent = c.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags.get("crosspt.resumes") == "1"
    parents = sql(db, "select count(*) from runs r join tags t on t.run_uuid = r.run_uuid and t.key = ?", experiments.SEARCH_TAG)
    assert parents == [(1,)], parents
    KILL_TABLE[point] = (f"exit 0, {samples} trials {sorted(s for _, s in active)}, 0 RUNNING, 0 duplicated, "
                         f"parent FINISHED; at the kill: {len(before)} child run(s), tuner.pkl={had_tuner_pkl}, "
                         f"Tune state={had_tune_state} -> {'restored' if had_tune_state else 'trials started afresh'}")
    print(f"\n{point} -> {KILL_TABLE[point]}")


def test_orphaned_and_ended_child_runs_are_closed(tmp_path):
    """The bookkeeping `--resume` does first, on a real sqlite MLflow store: children of trials Tune never
    recorded are orphans (tagged and soft-deleted, also one that had FINISHED on its own; KILLED if it was
    RUNNING); children of trials Tune recorded as ended get that status (a trial the scheduler stopped:
    FINISHED, tagged pruned); children of unfinished trials stay RUNNING for the resumed trial to continue."""
    from crosspt.search.reconcile import reconcile_child_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = store.client(uri)
    exp = experiments.ensure_experiment(uri, "reconcile")
    parent = c.create_run(exp).info.run_id
    ids = {}
    for tid in ("orphan", "finished_orphan", "done", "pruned", "crashed", "running"):
        ids[tid] = c.create_run(exp, tags={"mlflow.parentRunId": parent, experiments.TRIAL_TAG: tid}).info.run_id
    # a trial Tune never recorded that finished on its own before the driver died: it must not stay in
    # the default view beside its replacement (promote and report would count it)
    c.set_terminated(ids["finished_orphan"], "FINISHED")
    other = c.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id      # not a trial's: left alone
    trials = [SimpleNamespace(trial_id="done", status="TERMINATED", last_result={"final_epoch": True}),
              SimpleNamespace(trial_id="pruned", status="TERMINATED", last_result={"final_epoch": False}),
              SimpleNamespace(trial_id="crashed", status="ERROR", last_result={}, error_file=None),
              SimpleNamespace(trial_id="running", status="RUNNING", last_result={})]
    counts = reconcile_child_runs(uri, exp, parent, trials)
    assert counts == {"orphaned": 2, "closed": 3, "unknown": 0}
    status = {tid: c.get_run(rid) for tid, rid in ids.items()}
    assert status["orphan"].info.status == "KILLED" and status["orphan"].info.lifecycle_stage == "deleted"
    assert status["orphan"].data.tags["crosspt.orphaned"] == "true"
    fo = status["finished_orphan"]
    assert fo.info.status == "FINISHED" and fo.info.lifecycle_stage == "deleted", (fo.info.status, fo.info.lifecycle_stage)
    assert fo.data.tags["crosspt.orphaned"] == "true"
    assert c.get_run(other).info.lifecycle_stage == "active"
    assert status["done"].info.status == "FINISHED"
    assert status["pruned"].info.status == "FINISHED" and status["pruned"].data.tags["pruned"] == "true"
    assert status["crashed"].info.status == "FAILED" and status["crashed"].data.tags["error"]
    assert status["running"].info.status == "RUNNING"
    # once the search has ended nothing stays RUNNING
    assert reconcile_child_runs(uri, exp, parent, trials, search_ended=True)["closed"] == 1
    assert c.get_run(ids["running"]).info.status == "KILLED"
    # the orphans are out of the default view; the trials Tune knows and the untagged child stay
    assert sorted(r.info.run_id for r in experiments.child_runs(uri, exp, parent)) == \
        sorted([ids[t] for t in ("done", "pruned", "crashed", "running")] + [other])


# ---- 2. trials that fail (and a secret that must not leak) -----------------------------------------
SECRET = "sekrit-7f3a9c"


@pytest.fixture(scope="module")
def faulty_search(ray_head, tiny_t5_path, data_dir, tmp_path_factory):
    """One search, max_retries=1, three trials with injected faults at epoch 1 (after a checkpoint):
    trial000 raises every time, trial001's loss becomes NaN, trial002's process dies once (exit).
    The driver's environment holds a fake secret, and the space's base a tracking URI with a password."""
    from crosspt.search.driver import run_search
    from crosspt.config.space import SearchSpace

    tmp = tmp_path_factory.mktemp("faulty")
    marker = tmp / "exit-once"
    tree = tiny_tree(tiny_t5_path, "faulty", samples=3, epochs=2,
                     resources={"max_retries": 1, "max_concurrent_trials": 2},
                     search={"algorithm": "random", "seed": 0,
                             "points": [{"optim.prompt_lr": 0.03, "prompt.private_len": 4},
                                        {"optim.prompt_lr": 0.02, "prompt.private_len": 4},
                                        {"optim.prompt_lr": 0.01, "prompt.private_len": 4}]})
    tree["base"]["tracking"] = {"tracking_uri": f"http://alice:{SECRET}x@127.0.0.1:{free_port()}"}
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSPT_FAULT", f"raise@epoch=1,run=trial000;nan@epoch=1,run=trial001;"
                                   f"exit@epoch=1,run=trial002,once={marker}")
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("CROSSPT_TEST_PASSWORD", SECRET)
        t0 = time.time()
        summary = run_search(SearchSpace.model_validate(tree), data_dir=str(data_dir), tracking_uri=uri,
                             storage_path=str(tmp / "ray_results"), verbose=0)
    summary["test_wall_s"] = time.time() - t0
    return SimpleNamespace(summary=summary, uri=uri, marker=marker, tmp=tmp)


def _child(fs, number: int):
    runs = experiments.child_runs(fs.uri, fs.summary["experiment_id"], fs.summary["parent_run_id"])
    return next(r for r in runs if r.info.run_name == f"trial{number:03d}")


@pytest.mark.slow
def test_failing_trials_end_failed_and_the_search_goes_on(faulty_search):
    s, c = faulty_search.summary, store.client(faulty_search.uri)
    by_status = {}
    for t in s["trials"]:
        by_status.setdefault(t["status"], []).append(t)
    assert s["num_trials"] == 3 and s["num_failed"] == 2, s["trials"]
    assert len(by_status.get("FINISHED", [])) == 1
    errors = sorted(t["error"] for t in by_status["ERROR"])
    assert any("InjectedFault" in e and "epoch 1" in e for e in errors), errors
    assert any("TrainingDiverged" in e and "nan" in e for e in errors), errors
    from crosspt.search.summary import format_summary

    text = format_summary(s, "best_val_score")
    assert "2 failed" in text
    assert c.get_run(s["parent_run_id"]).info.status == "FINISHED"
    csv = Path(c.download_artifacts(s["parent_run_id"], "trials.csv", str(faulty_search.tmp))).read_text()
    assert "TrainingDiverged" in csv and "InjectedFault" in csv          # the error column
    assert c.get_run(s["parent_run_id"]).data.metrics["num_failed"] == 2

    # trial000 raised at epoch 1, was retried once (max_retries=1) from its epoch-0 checkpoint, raised again
    r1 = _child(faulty_search, 0)
    assert r1.info.status == "FAILED" and r1.data.tags["error"].startswith("InjectedFault")
    assert r1.data.tags.get("crosspt.restarts") == "1" and "crosspt.retryable" not in r1.data.tags
    assert r1.data.tags["crosspt.previous_error"].startswith("InjectedFault")     # the first attempt's
    assert [m.step for m in c.get_metric_history(r1.info.run_id, "epoch")] == [0]
    # trial001 diverged: stopped at the first non-finite loss, marked not retryable, and its retry refused
    # at once (no epoch trained again)
    r2 = _child(faulty_search, 1)
    assert r2.info.status == "FAILED" and r2.data.tags["error"].startswith("TrainingDiverged: loss became nan at epoch 1")
    assert r2.data.tags.get("crosspt.retryable") == "false" and "crosspt.restarts" not in r2.data.tags
    assert [m.step for m in c.get_metric_history(r2.info.run_id, "epoch")] == [0]
    # trial002's process died at epoch 1 (once): Tune restarted it from its checkpoint and it finished
    r3 = _child(faulty_search, 2)
    assert faulty_search.marker.is_file()
    assert r3.info.status == "FINISHED" and r3.data.tags.get("crosspt.restarts") == "1"
    assert sorted(m.step for m in c.get_metric_history(r3.info.run_id, "epoch")) == [0, 1]
    print(f"\nfaulty search: {s['num_trials']} trials, {s['num_failed']} failed, 1 recovered after its process "
          f"died; {s['test_wall_s']:.0f}s")


@pytest.mark.slow
def test_no_secret_reaches_mlflow_params_or_tags(faulty_search):
    """Environment variables are never logged; a password inside a URI in the config is masked."""
    s, c = faulty_search.summary, store.client(faulty_search.uri)
    runs = [c.get_run(s["parent_run_id"])] + experiments.child_runs(faulty_search.uri, s["experiment_id"], s["parent_run_id"])
    seen = 0
    for r in runs:
        for k, v in {**r.data.params, **r.data.tags}.items():
            assert SECRET not in f"{k}={v}", (r.info.run_name, k)
            seen += 1
    assert seen > 40
    for r in runs[1:]:                  # the configuration is config.yaml (params are the searched factors)
        text = Path(c.download_artifacts(r.info.run_id, "config.yaml", str(faulty_search.tmp / r.info.run_id))).read_text()
        assert SECRET not in text and "alice:***@" in text
    space_yaml = Path(c.download_artifacts(s["parent_run_id"], "search_space.yaml", str(faulty_search.tmp))).read_text()
    assert SECRET not in space_yaml


def test_fault_hook_is_parsed_strictly():
    from crosspt.run.faults import parse_faults

    assert parse_faults("raise@epoch=1,run=t1;nan@epoch=0,rank=1") == [
        {"kind": "raise", "epoch": 1, "run": "t1"}, {"kind": "nan", "epoch": 0, "rank": 1}]
    assert parse_faults(None) == [] and parse_faults("") == []
    for bad in ("boom@epoch=1", "raise@when=1", "nan@epoch=x"):
        with pytest.raises(ValueError):
            parse_faults(bad)


# ---- 3. a dead Ray Train worker ----------------------------------------------------------------
@pytest.mark.slow
def test_dead_train_worker_recovers_from_checkpoint(ray_head, tiny_t5_path, data_dir, tmp_path):
    """A 2-worker trial (scaling.in_process=false); once epoch 0's checkpoint is reported, one Train
    worker is SIGKILLed. Ray Train (FailureConfig from resources.max_retries=1) restarts the worker group
    from that checkpoint and the trial finishes: epoch 0 is not trained again. Bounded: no hang."""
    epochs = 2
    tree = tiny_tree(tiny_t5_path, "deadworker", samples=1, epochs=epochs, resources={"max_retries": 1})
    tree["base"]["scaling"] = {"num_workers": 2, "in_process": False}
    tree["base"]["data"]["shots"] = 8
    tree["base"]["train"]["batch_size"] = 4
    tree["search"] = {"algorithm": "random", "seed": 0}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(tree))
    db, storage, log = tmp_path / "mlflow.db", tmp_path / "ray_results", tmp_path / "driver.log"
    env = cli_env(RAY_ADDRESS=ray_head.address, CROSSPT_DATA_DIR=str(data_dir))
    seen: set[int] = set()

    def epoch0_reported():
        seen.update(ray_procs(ray_head, "ray::RayTrainWorker"))
        logged = sql(db, "select count(*) from metrics where key = 'epoch' and step = 0")
        workers = ray_procs(ray_head, "ray::RayTrainWorker")
        return workers if logged and logged[0][0] >= 1 and len(workers) == 2 else None

    t0 = time.time()
    with open(log, "w") as out:
        driver = subprocess.Popen(search_cmd(space, db, storage, "--summary-json", str(tmp_path / "s.json")),
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        workers = wait_for(epoch0_reported, 360, "epoch 0 reported by a 2-worker trial", driver, log, every=0.2)
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time() - t0
        deadline = time.time() + 420
        while driver.poll() is None and time.time() < deadline:
            seen.update(ray_procs(ray_head, "ray::RayTrainWorker"))
            time.sleep(0.3)
        assert driver.poll() is not None, f"search hung after a worker died:\n{log.read_text()[-4000:]}"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(30)
    assert driver.returncode == 0, log.read_text()[-4000:]
    assert not alive(victim)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["num_trials"] == 1 and summary["trials"][0]["status"] == "FINISHED", summary["trials"]
    assert len(seen) >= 3, f"no replacement worker group was started: {sorted(seen)}"
    run_ = experiments.child_runs(f"sqlite:///{db}", summary["experiment_id"], summary["parent_run_id"])[0]
    assert run_.info.status == "FINISHED"
    steps = sorted(m.step for m in store.client(f"sqlite:///{db}").get_metric_history(run_.info.run_id, "epoch"))
    assert steps.count(0) == 1, f"epoch 0 trained again, not restored from its checkpoint: {steps}"
    assert set(steps) == set(range(epochs))
    print(f"\ndead worker: killed pid {victim} at {killed_at:.0f}s; {len(seen)} Train worker processes seen; "
          f"epochs logged {steps}; search took {time.time() - t0:.0f}s")


# ---- 4. MLflow not there --------------------------------------------------------------------------
@pytest.mark.slow
def test_unreachable_mlflow_fails_before_anything_starts(tiny_t5_path, data_dir, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"                    # nothing listens there
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_tree(tiny_t5_path, "nomlflow", samples=1, epochs=1)))
    storage = tmp_path / "ray_results"
    cmd = [sys.executable, "-m", "crosspt.cli", "search", "--space", str(space), "--tracking-uri", url,
           "--storage-path", str(storage), "--data-dir", str(data_dir)]
    out = run(cmd, cli_env(RAY_ADDRESS=None), tmp_path, 240)
    assert out.returncode == 2, out.stderr[-3000:]
    errs = error_lines(out.stderr)
    assert len(errs) == 1 and url in errs[0] and "not reachable" in errs[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not storage.exists()                                 # no search state, no trial folder
    for marker in ("Started a local Ray", "Connecting to existing Ray", "ray.init", "Trial"):
        assert marker not in out.stdout + out.stderr                  # Ray never started or joined
    assert not list(tmp_path.glob("*.db"))                      # no local MLflow/Optuna store either


# ---- 5. bad input: property-based ----------------------------------------------------------------
def _schema(model=None) -> dict:
    from pydantic import BaseModel

    from crosspt.config.schema import RunConfig

    out = {}
    for name, f in (model or RunConfig).model_fields.items():
        ann = f.annotation
        out[name] = _schema(ann) if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return out


SCHEMA = _schema()


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    return [k for name, sub in tree.items()
            for k in (_leaves(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"])]


LEAVES = _leaves(SCHEMA)
NUMERIC_LEAVES = ["prompt.n_sources", "prompt.source_len", "prompt.private_len", "prompt.top_k", "optim.prompt_lr",
                  "optim.router_lr", "optim.warmup_steps", "train.epochs", "prompt.temperature.start", "seed"]
junk = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=10), st.lists(st.integers(-2, 9), max_size=3),
                 st.dictionaries(st.text("abc", max_size=3), st.integers(), max_size=2))
plausible = st.one_of(
    st.integers(-2, 40), st.floats(-1, 10), st.booleans(), st.none(),
    st.sampled_from(["cat", "wavg", "task", "attention", "random", "vocab", "text", "source", "natural", "opaque",
                     "index", "auto", "seq2seq", "encoder", "class", "order", "similar", "minilm"]),
    st.lists(st.sampled_from(["sst2", "rte", "cb", "nosuchtask"]), max_size=3))
unknown = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


def _defaults() -> dict:
    from crosspt.config.schema import RunConfig

    return RunConfig().model_dump(mode="json")


DEFAULTS = _defaults()


@st.composite
def config_trees(draw, schema=SCHEMA, defaults=DEFAULTS):
    """Some schema keys, mostly with valid values (the defaults), some plausible-but-wrong or junk
    values, junk in place of a section, and unknown keys."""
    tree = {}
    for name, sub in schema.items():
        pick = draw(st.integers(0, 39))
        if pick <= 15:
            continue
        if sub:
            tree[name] = draw(config_trees(sub, defaults[name])) if pick <= 38 else draw(junk)
        else:
            tree[name] = defaults[name] if pick <= 36 else draw(plausible) if pick <= 38 else draw(junk)
    if draw(st.integers(0, 19)) == 0:
        tree[draw(unknown)] = draw(junk)
    return tree


def _paths(tree, prefix="") -> set[str]:
    out = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            out |= {f"{prefix}{k}"} | _paths(v, f"{prefix}{k}.")
    return out


def _load_or_config_error(loader, tree: dict, tmp: Path, names: set[str]):
    path = tmp / "input.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    try:
        return loader(path)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg.strip()
        assert any(n in msg for n in names), f"no key named in: {msg}"
        return None
    # any other exception type fails the property


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tree=config_trees(), overrides=st.lists(st.tuples(st.sampled_from(LEAVES + ["prompt.bogus", "tasks.x"]),
                                                         st.text("ab01.[],:- ", max_size=8)), max_size=2))
def test_config_files_fail_only_with_a_config_error_naming_the_key(tree, overrides, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfg", numbered=True)
    names = _paths(tree) | {k.rsplit(".", i)[0] for k, _ in overrides for i in range(k.count(".") + 1)} | {"(top level)"}
    cfg = _load_or_config_error(lambda p: load_config(p, [f"{k}={v}" for k, v in overrides]), tree, tmp, names)
    if cfg is not None:
        assert cfg.prompt.n_candidates >= 1


def _param(kind, low=None, high=None, values=None, when=None, step=None):
    p = {"type": kind}
    p.update({k: v for k, v in (("low", low), ("high", high), ("values", values), ("when", when),
                                 ("step", step)) if v is not None})
    return p


INT_KEYS = ["prompt.n_sources", "prompt.source_len", "prompt.private_len", "prompt.top_k", "optim.warmup_steps",
            "train.epochs", "seed"]
FLOAT_KEYS = ["optim.prompt_lr", "optim.router_lr", "prompt.temperature.start", "optim.weight_decay"]
CAT_KEYS = {"prompt.composition": ["cat", "wavg"], "prompt.init": ["random", "vocab"], "prompt.router": ["task", "attention"],
            "prompt.label_semantics": ["natural", "opaque", "index"], "prompt.learn_sources": [True, False]}


@st.composite
def space_trees(draw):
    """Mostly well-formed spaces (each key its natural distribution, bounds as numbers or references to
    earlier keys with offsets, `when` conditions on earlier keys), then a few things broken: a wrong
    type, an unknown key, junk in a field or a section, bad points, an objective that is not reported."""
    keys = draw(st.lists(st.sampled_from(INT_KEYS + FLOAT_KEYS + list(CAT_KEYS)), min_size=1, max_size=4, unique=True))
    space = {}
    for i, key in enumerate(keys):
        earlier_ints = [k for k in keys[:i] if k in INT_KEYS] + ["prompt.private_len", "prompt.source_len"]
        ref = st.sampled_from(earlier_ints)
        when = draw(st.one_of(st.none(), st.none(), st.dictionaries(st.sampled_from(keys[:i] or ["prompt.private_len"]),
                                                                    st.one_of(st.integers(0, 3), st.sampled_from(["cat", "task"]),
                                                                              st.lists(st.integers(0, 3), max_size=2),
                                                                              st.builds(lambda o, v: f"{o}{v}", st.sampled_from(
                                                                                  [">", ">=", "<", "==", "!="]), st.integers(0, 3))),
                                                                    max_size=1)))
        if key in CAT_KEYS:
            space[key] = _param("choice", values=draw(st.lists(st.sampled_from(CAT_KEYS[key]), min_size=1, max_size=3)),
                                when=when)
        elif key in INT_KEYS:
            lo = draw(st.one_of(st.integers(-1, 6), ref, st.builds(lambda k, n: f"{k} - {n}", ref, st.integers(0, 3))))
            hi = draw(st.one_of(st.integers(0, 12), ref, st.builds(lambda k, n: f"{k} + {n}", ref, st.integers(0, 3))))
            space[key] = _param("int", lo, hi, when=when, step=draw(st.sampled_from([None, None, 1, 2])))
        else:
            lo, hi = sorted(draw(st.lists(st.floats(-0.5, 2.0), min_size=2, max_size=2)))
            space[key] = _param(draw(st.sampled_from(["uniform", "loguniform"])), lo, hi, when=when)
    tree = {"name": "prop", "base": {"tasks": ["rte"], "prompt": {"private_len": 4}}, "space": space,
            "budget": {"num_samples": 2, "max_epochs": 2}}
    for _ in range(draw(st.integers(0, 2))):             # then break something
        where = draw(st.sampled_from(["space", "param", "kind", "base", "top", "objective", "points", "resources"]))
        if where == "space":
            space[draw(st.one_of(unknown, st.sampled_from(["prompt", "prompt.bogus", "tasks"])))] = \
                draw(st.one_of(junk, st.just(_param("int", 1, 2))))
        elif where == "param":
            space[draw(st.sampled_from(keys))][draw(st.sampled_from(["low", "high", "values", "step", "log",
                                                                     "when", "type", "extra"]))] = draw(junk)
        elif where == "kind":
            space[draw(st.sampled_from(keys))]["type"] = draw(st.sampled_from(["int", "uniform", "loguniform",
                                                                               "choice", "normal"]))
        elif where == "base":
            tree["base"] = draw(st.one_of(config_trees(), junk))
        elif where == "top":
            tree[draw(st.sampled_from(["budget", "scheduler", "search", "resources", "name", draw(unknown)]))] = draw(junk)
        elif where == "objective":
            tree["objective"] = {"metric": draw(st.one_of(st.sampled_from(["loss", "val_rte_accuracy"]), junk)),
                                 "mode": draw(st.sampled_from(["max", "min", "up"]))}
        elif where == "points":
            tree["search"] = {"algorithm": "random", "points": [{draw(st.sampled_from(keys + ["seed"])): draw(plausible)}]}
        else:
            tree["resources"] = {"max_retries": draw(st.one_of(st.integers(-2, 3), junk)),
                                 "max_concurrent_trials": draw(st.one_of(st.just("auto"), st.integers(-1, 3), junk))}
    return tree


# Shapes that once leaked a Python error (TypeError/OverflowError/YAMLError) instead of a ConfigError:
# a numeric bound resolving to a non-number or infinity, an ordering `when` on a categorical factor, a
# `when` condition that is not YAML, an int with log+step (Optuna refused it at the first trial).
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.filter_too_much])  # examples: conftest profile
@given(tree=space_trees())
def test_space_files_fail_only_with_a_config_error_naming_the_key(tree, tmp_path_factory):
    from crosspt.config.space import load_space

    tmp = tmp_path_factory.mktemp("space", numbered=True)
    names = _paths(tree) | {"(top level)"}
    space = _load_or_config_error(load_space, tree, tmp, names)
    if space is not None:
        assert space.budget.num_samples >= 1
        import ray

        assert not ray.is_initialized() or os.environ.get("RAY_ADDRESS")   # validating starts nothing


@pytest.mark.parametrize("case", ["bound-is-a-list", "bound-is-none", "when-str-vs-int", "int-bound-inf",
                                  "when-not-yaml", "int-log-with-step", "base-section-is-null"])
def test_space_shapes_that_once_leaked_errors(case, tmp_path):
    from crosspt.config.space import load_space

    spaces = {
        "bound-is-a-list": {"base": {"tasks": ["rte"]},
                            "space": {"prompt.private_len": {"type": "int", "low": 1, "high": "tasks"}}},
        "bound-is-none": {"base": {"prompt": {"top_k": None}},
                          "space": {"prompt.private_len": {"type": "int", "low": 1, "high": "prompt.top_k"}}},
        "when-str-vs-int": {"space": {"prompt.composition": {"type": "choice", "values": ["cat", "wavg"]},
                                      "prompt.top_k": {"type": "int", "low": 1, "high": 1,
                                                       "when": {"prompt.composition": ">1"}}}},
        "int-bound-inf": {"space": {"prompt.private_len": {"type": "int", "low": 1, "high": math.inf}}},
        "when-not-yaml": {"space": {"prompt.n_sources": {"type": "int", "low": 0, "high": 2},
                                    "prompt.top_k": {"type": "int", "low": 1, "high": 1,
                                                     "when": {"prompt.n_sources": "> [1"}}}},
        # validates, then Optuna refuses it when the search asks for the first trial
        "int-log-with-step": {"space": {"prompt.private_len": {"type": "int", "low": 1, "high": 8, "step": 2,
                                                               "log": True}}},
        # found by CI's run of the property test: `train:` left empty while the budget sets train.epochs
        "base-section-is-null": {"base": {"train": None}, "budget": {"max_epochs": 2},
                                 "space": {"prompt.private_len": {"type": "int", "low": 1, "high": 8}}},
    }
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(spaces[case], sort_keys=False))
    with pytest.raises(ConfigError, match=r"prompt\.(private_len|top_k)|base\.train"):     # names the key
        load_space(f)


# ---- 6. artifacts -------------------------------------------------------------------------------
def test_artifacts_are_checked_against_the_config(tiny_t5_path, tiny_decoder_path, data_dir, tmp_path):
    from crosspt.run.artifacts import load_bank, load_prompt_artifact, save_bank, save_prompt_artifact
    from crosspt.backbones.loader import load_backbone
    from crosspt.config.schema import config_hash
    from crosspt.run.model import build_model
    from crosspt.tasks.specs import resolve_tasks
    from crosspt.run.inputs import load_source_bank

    cfg = load_config(None, {"tasks": ["rte"], "backbone.name": str(tiny_t5_path), "prompt.n_sources": 2,
                             "prompt.source_len": 4, "prompt.private_len": 4, "data.data_dir": str(data_dir)})
    tasks = resolve_tasks(cfg.tasks)
    backbone = load_backbone(str(tiny_t5_path), tasks, max_length=48)
    dim = backbone.embed_dim
    good = save_bank(tmp_path / "good.safetensors", torch.randn(2, 4, dim), backbone=str(tiny_t5_path),
                     tasks=["sst2", "cb"])
    wrong_dim = save_bank(tmp_path / "dim.safetensors", torch.randn(2, 4, dim * 2), backbone=str(tiny_t5_path),
                          tasks=["sst2", "cb"])
    wrong_bb = save_bank(tmp_path / "bb.safetensors", torch.randn(2, 4, dim), backbone=str(tiny_decoder_path),
                         tasks=["sst2", "cb"])
    assert load_source_bank(cfg.model_copy(update={"prompt": cfg.prompt.model_copy(
        update={"source_bank": str(good)})}), dim, tasks).shape == (2, 4, dim)
    for path, key in ((wrong_dim, "dim"), (wrong_bb, "backbone")):
        c = cfg.model_copy(update={"prompt": cfg.prompt.model_copy(update={"source_bank": str(path)})})
        with pytest.raises(ArtifactError, match=rf"{path.name}: {key} is .* in the artifact but .* in the config"):
            load_source_bank(c, dim, tasks)
    with pytest.raises(ArtifactError, match="source_len"):
        load_bank(good, source_len=8)
    # the same model under another spelling is the same backbone (a hub id vs its local folder)
    load_bank(good, backbone=f"some-org/{tiny_t5_path.name}")

    # a run's prompt artifact carries the config hash it was trained with
    model = build_model(cfg.model_copy(update={"prompt": cfg.prompt.model_copy(update={"n_sources": 0})}),
                        tasks, backbone=backbone)
    art = save_prompt_artifact(tmp_path / "prompts.safetensors", model, config_hash=config_hash(cfg),
                               backbone=str(tiny_t5_path))
    tensors, meta = load_prompt_artifact(art, config_hash=config_hash(cfg), dim=dim)
    assert meta["config_hash"] == config_hash(cfg) and "router_weights" in tensors
    other = config_hash(cfg.model_copy(update={"seed": 1}))
    with pytest.raises(ArtifactError, match=f"config_hash is '{config_hash(cfg)}' in the artifact but '{other}'"):
        load_prompt_artifact(art, config_hash=other)
    with pytest.raises(ArtifactError, match="not a crosspt source-prompt bank"):
        load_bank(art)
    with pytest.raises(ArtifactError, match="not a crosspt prompt artifact"):
        load_prompt_artifact(good)


def test_a_pickle_posing_as_an_artifact_is_refused_unopened(tmp_path):
    from crosspt.run.artifacts import load_bank, load_prompt_artifact, load_tensors

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "bank.safetensors"
    torch.save({"bank": torch.zeros(1, 1, 1), "x": Payload()}, evil)        # a pickle with a side effect
    for loader in (load_tensors, load_bank, load_prompt_artifact):
        with pytest.raises(ArtifactError, match="not a readable safetensors file"):
            loader(evil)
    assert not marker.exists()


@pytest.mark.slow
def test_cli_refuses_a_bank_of_another_backbone(tiny_t5_path, tiny_decoder_path, data_dir, tmp_path):
    from crosspt.run.artifacts import save_bank

    bank = save_bank(tmp_path / "bank.safetensors", torch.randn(2, 4, 64), backbone=str(tiny_decoder_path),
                     tasks=["sst2", "cb"])
    out = run([sys.executable, "-m", "crosspt.cli", "train", "--backbone", str(tiny_t5_path), "--tasks", "rte",
               "--shots", "4", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out"),
               "--set", "prompt.n_sources=2", "--set", "prompt.source_len=4", "--set", f"prompt.source_bank={bank}",
               "--set", "scaling.in_process=true", "--set", "train.epochs=1"], cli_env(), tmp_path, 240)
    assert out.returncode == 2, out.stderr[-3000:]
    errs = error_lines(out.stderr)
    assert len(errs) == 1 and "backbone is" in errs[0] and "bank.safetensors" in errs[0], out.stderr[-2000:]
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_nothing_in_the_package_unpickles():
    """No pickle/cloudpickle/dill/joblib/pandas-pickle loads, no np.load(allow_pickle=True), and every
    torch.load passes weights_only=True."""
    bad = []
    for f in sorted((REPO / "crosspt").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.Call):
                continue
            fn = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{f.relative_to(REPO)}:{node.lineno}: {fn}"
            if fn.split(".")[-1] in ("load", "loads") and fn.split(".")[0] in ("pickle", "cPickle", "cloudpickle",
                                                                                 "dill", "joblib", "_pickle"):
                bad.append(where)
            elif fn in ("torch.load", "load") and fn == "torch.load" and kw.get("weights_only") != "True":
                bad.append(where)
            elif fn.endswith("read_pickle") or (fn.endswith("np.load") or fn == "numpy.load") and \
                    kw.get("allow_pickle") == "True":
                bad.append(where)
            elif fn.endswith("Unpickler"):
                bad.append(where)
    assert not bad, bad
    # pickle may be imported only to name its error (reconcile.py catches a truncated Tune state that Ray's own
    # reader failed to unpickle); every other use of the module is refused
    for f in sorted((REPO / "crosspt").rglob("*.py")):
        text = f.read_text()
        assert "from pickle" not in text, f
        if "import pickle" in text:
            uses = {ast.unparse(n) for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Attribute)
                    and isinstance(n.value, ast.Name) and n.value.id == "pickle"}
            assert uses <= {"pickle.UnpicklingError", "pickle.PickleError"}, (f, uses)


# ---- 7. exposure --------------------------------------------------------------------------------
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(tmp_path):
    """crosspt's local Ray (no RAY_ADDRESS): the dashboard, and every other port of the processes it
    starts (GCS, raylet, workers, agents), listen on loopback only."""
    script = textwrap.dedent("""
        import json, time, psutil, ray
        from crosspt.run.trainer import init_ray
        init_ray()
        node_ip = ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote())
        time.sleep(2)
        me = psutil.Process()
        procs = {p.pid: p.name() for p in me.children(recursive=True)} | {me.pid: "driver"}
        ports = [(procs[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in procs]
        print("RESULT " + json.dumps({"node_ip": node_ip, "ports": ports,
                                      "dashboard": ray._private.worker.global_worker.node.address_info["webui_url"]}))
        ray.shutdown()
    """)
    out = run([sys.executable, "-c", script], cli_env(RAY_ADDRESS=None, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=None),
              tmp_path, 240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    dash_host, dash_port = res["dashboard"].rsplit(":", 1)
    assert dash_host.split("//")[-1] == "127.0.0.1"
    assert res["node_ip"] == "127.0.0.1"
    listening = {(ip, port) for _, ip, port in res["ports"]}
    assert ("127.0.0.1", int(dash_port)) in listening, res["ports"]
    exposed = [p for p in res["ports"] if p[1] not in LOOPBACK]
    assert len(res["ports"]) >= 5 and not exposed, exposed


@pytest.mark.slow
def test_test_servers_bind_loopback(mlflow_server):
    """The MLflow server the tests start listens on 127.0.0.1 only."""
    port = int(mlflow_server.url.rsplit(":", 1)[1])
    listen = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listen and all(c.laddr.ip in LOOPBACK for c in listen), listen


@pytest.mark.slow
def test_test_ray_head_binds_loopback(ray_head):
    procs = {p.pid for p in psutil.Process(ray_head.proc.pid).children(recursive=True)} | {ray_head.proc.pid}
    listen = [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
              if c.status == psutil.CONN_LISTEN and c.pid in procs]
    assert listen and all(ip in LOOPBACK for ip, _ in listen), listen

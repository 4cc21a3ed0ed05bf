"""Every use crosspt makes of Ray's private modules and attributes, and why each has no public way.

Each name here has a test in tests/test_upstream_shapes.py that fails when Ray changes the shape it relies
on (a module, a constant or an attribute gone or renamed), so an upgrade breaks there, by name, rather than
deep inside a search. Nothing else in the package reaches into Ray's privates.
"""
from __future__ import annotations

import contextlib
import json
import os


# ---- ray._private: the job's runtime_env and the single-machine switch ----------------------------------

def job_runtime_env() -> dict:
    """The runtime_env that `ray job submit` gave this driver ({} outside a job). Ray exposes it only through
    the private constant naming the variable it is passed in."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}").get("runtime_env") or {}


@contextlib.contextmanager
def cluster_mode_off():
    """`ray_constants.ENABLE_RAY_CLUSTER` off in this process while the block runs: this process reads the
    module constant, set when Ray was imported, when it picks the node address, so the environment variable
    alone comes too late for it. Ray has no public switch for it."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


# ---- ray.train._internal: deleting a checkpoint that is gone already -----------------------------------

def tolerate_deleted_checkpoints() -> None:
    """Hand-rolled around a Ray Tune bug: a restored trial's checkpoint list can name a checkpoint that the
    killed driver had already deleted (`num_to_keep`) after its last state snapshot. When Tune later drops it,
    `_delete_fs_path` raises FileNotFoundError and the trial errors (seen in the mid-trial resume drill; the
    kind of failure reported in ray-project/ray#27790 with `keep_checkpoints_num`). A checkpoint that is already
    gone is what deleting it wants, so that one error is ignored."""
    from ray.train._internal import checkpoint_manager as cm

    original = cm._delete_fs_path
    if getattr(original, "crosspt_tolerant", False):
        return

    def delete(fs, fs_path):
        try:
            original(fs=fs, fs_path=fs_path)
        except FileNotFoundError:
            pass
    delete.crosspt_tolerant = True
    cm._delete_fs_path = delete


# ---- ray.tune.search.optuna.OptunaSearch: its study and its trials -------------------------------------
# `OptunaSearch` keeps the Optuna study and the Tune-trial -> Optuna-trial map private and offers no hook to
# enqueue trials with user attributes or to end a trial as PRUNED (`crosspt.search.optuna_glue`).

def optuna_study(searcher):
    """The searcher's `optuna.Study` (None before it has one)."""
    return getattr(searcher, "_ot_study", None)


def optuna_trials(searcher) -> dict:
    """Tune trial id -> the live `optuna.Trial` the searcher asked for it ({} on a searcher without any)."""
    return getattr(searcher, "_ot_trials", {})


def completed_trials(searcher) -> set:
    """The Tune trial ids the searcher has told the study about (it ignores their later results)."""
    return searcher._completed_trials


# ---- ray.tune.schedulers.AsyncHyperBandScheduler: undoing a stop ---------------------------------------
# ASHA has no notion of a trial exempt from stopping (`crosspt.search.optuna_glue.DesignASHA`).

def asha_before_last_step(scheduler, result: dict) -> bool:
    """Whether `result` is before the scheduler's last step (`time_attr` below `max_t`)."""
    return result.get(scheduler._time_attr, 0) < scheduler._max_t


def asha_uncount_stop(scheduler) -> None:
    """Takes back one STOP from the scheduler's count of stopped trials (its debug string shows it)."""
    scheduler._num_stopped -= 1

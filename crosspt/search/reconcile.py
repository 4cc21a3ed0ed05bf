"""After a crash: make MLflow agree with Tune's record of the trials.

A driver killed mid-search leaves child runs RUNNING. On `--resume` (and once more when the search ends)
each is closed with the status Tune recorded for its trial, or, for a trial Tune never recorded, ended as an
orphan that the restored search replaces. The Optuna side is `crosspt.search.optuna_glue.fail_stale_trials`.
"""
from __future__ import annotations

import pickle  # for its error class only (tests/test_reliability.py)
import sys
from pathlib import Path

from crosspt.errors import SearchStateError
from crosspt.registry import best_run, experiments, store


def tune_trials(root: str) -> list:
    """The trials in a Tune experiment's saved state (id, status, last result, error file); none when Tune
    saved nothing yet (the driver died before its first save: every child run is an orphan then).

    A state that exists but cannot be read is a `SearchStateError`, never an empty list: reconciliation
    against an empty list would take every child run of the search for an orphan and delete it."""
    from ray.tune import ExperimentAnalysis

    from crosspt.search.state import tune_state_saved

    if not tune_state_saved(root):
        return []
    try:
        return list(ExperimentAnalysis(root).trials)
    # what a damaged or half-written state raises: a missing or unreadable file (OSError), bad JSON
    # (ValueError), a trial record without its fields (KeyError), a truncated or foreign pickled trial
    except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise SearchStateError(
            f"Tune's saved state in {root} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "no child run was changed. Restore that folder's experiment_state-*.json from a backup, then run "
            "`crosspt search --space <space.yaml> --resume` with the same --storage-path") from e


def reconcile_child_runs(uri: str, experiment_id: str, parent_run_id: str, trials: list,
                         search_ended: bool = False) -> dict[str, int]:
    """Close child runs left RUNNING by a driver that died.

    A child of a trial Tune never recorded (created after the last experiment-state save) is an orphan,
    whatever its status: the restored search replaces that trial, so its run is tagged `crosspt.orphaned`,
    ended KILLED if it was RUNNING (a run that finished keeps its status), and soft-deleted (`mlflow runs
    restore` brings it back). A child without a trial tag is not a trial's and is left alone. A child of a
    trial Tune recorded as ended is closed with that trial's status. A child of an unfinished trial is left
    alone (the trial resumes and continues it) unless the search has ended.

    At the end of a search (`search_ended`) there is no orphan pass: orphans come only from a driver that
    died, and `--resume` has taken them out before its Tune run started. A child whose trial Tune does not
    know at that point is left as it is and counted as `unknown` (one line on stderr): nothing is deleted
    that is not proved an orphan."""
    c = store.client(uri)
    by_id = {t.trial_id: t for t in trials}
    counts = {"orphaned": 0, "closed": 0, "unknown": 0}
    for run in experiments.child_runs(uri, experiment_id, parent_run_id):
        tid = run.data.tags.get(experiments.TRIAL_TAG)
        if not tid:                     # not a trial's run
            continue
        rid, t = run.info.run_id, by_id.get(tid)
        if t is None and search_ended:
            counts["unknown"] += 1
            continue
        if t is None:
            # a trial Tune never recorded, also one that ended on its own before the driver died (FINISHED
            # or FAILED): the resumed search does not know it and ran a replacement, so it must not stay in
            # the default view, where `promote`, `report` and the best-run readers would count it
            c.set_tag(rid, "crosspt.orphaned", "true")
            c.set_tag(rid, "error", "orphaned: the search driver died before Tune recorded this trial; "
                                    "the resumed search ran a replacement")
            if run.info.status == "RUNNING":
                c.set_terminated(rid, "KILLED")
            c.delete_run(rid)
            counts["orphaned"] += 1
            continue
        if run.info.status != "RUNNING":
            continue
        status = getattr(t, "status", "")
        if status == "TERMINATED":
            if (t.last_result or {}).get("final_epoch"):
                c.set_terminated(rid, "FINISHED")
            else:
                best_run.close_pruned(c, rid, (t.last_result or {}).get("epoch"))
        elif status == "ERROR":
            c.set_tag(rid, "error", read_error(t)[:5000])
            c.set_terminated(rid, "FAILED")
        elif search_ended:
            c.set_tag(rid, "error", f"the search ended with this trial {status or 'unfinished'}")
            c.set_terminated(rid, "KILLED")
        else:
            continue
        counts["closed"] += 1
    if counts["unknown"]:
        print(f"reconcile: {counts['unknown']} child run(s) of parent run {parent_run_id} belong to trials Tune's "
              "saved state does not name; left as they are", file=sys.stderr)
    return counts


def read_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        return Path(path).read_text()[-2000:] if path else "trial failed"
    except OSError:
        return "trial failed"


def unfinished_trial_ids(trials: list) -> set[str]:
    """The Tune trials a restored search continues (not TERMINATED, not ERROR)."""
    return {t.trial_id for t in trials if getattr(t, "status", "") not in ("TERMINATED", "ERROR")}


def status_callback(uri: str, experiment_id: str, parent_run_id: str):
    """Closes child runs the trial itself could not close: ASHA stops (FINISHED + pruned, `best_run.close_pruned`),
    crashes (FAILED)."""
    from ray import tune

    class MlflowTrialStatus(tune.Callback):
        def _close(self, trial, status, error=None, pruned=False):
            from mlflow.exceptions import MlflowException

            try:
                run = experiments.find_trial_run(uri, experiment_id, parent_run_id, trial.trial_id)
            # the store did not answer (its error, or the HTTP client's: an OSError). Raised here, it would
            # end the whole search from inside Tune's loop; the end-of-search reconciliation closes the run
            except (MlflowException, OSError) as e:
                print(f"reconcile: child run of trial {trial.trial_id} not closed now ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]}); the end of the search closes it", file=sys.stderr)
                return
            if run is None or run.info.status != "RUNNING":
                return
            c = store.client(uri)
            if pruned:
                best_run.close_pruned(c, run.info.run_id, (trial.last_result or {}).get("epoch"))
                return
            if error:
                c.set_tag(run.info.run_id, "error", str(error)[:5000])
            c.set_terminated(run.info.run_id, status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            if last.get("final_epoch"):
                self._close(trial, "FINISHED")
            else:
                self._close(trial, "FINISHED", pruned=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            err = getattr(trial, "error_msg", None) or read_error(trial)
            self._close(trial, "FAILED", error=err)

    return MlflowTrialStatus()


"""The best-run rule: which child runs compete for "the best trial", and how a stopped one is kept out."""
from __future__ import annotations

PRUNED_TAG = "pruned"                  # a trial stopped before its last epoch (`close_pruned`)
STOPPED_BY_TAG = "crosspt.stopped_by"  # ... by whom: the scheduler (ASHA's decision) or the search (time budget)
STOPPED_BY_SCHEDULER, STOPPED_BY_SEARCH = "scheduler", "search"


def close_pruned(c, run_id: str, epoch=None) -> None:
    """End a child run that stopped before its last epoch: FINISHED (it ended as the search meant it to, and
    the UI draws KILLED like FAILED, with a red cross) with the tag `pruned=true`, which keeps its score out
    of every "best trial" (`best_finished_child`), and a description saying who stopped it: the scheduler
    (ASHA), when its decision tagged the run `STOPPED_BY_TAG=scheduler` (`crosspt.search.optuna_glue`), else
    the search itself (its `time_budget_s` ran out, or it was stopped), tagged `search`."""
    by = c.get_run(run_id).data.tags.get(STOPPED_BY_TAG) or STOPPED_BY_SEARCH
    when = f" after epoch {int(epoch)}" if isinstance(epoch, (int, float)) and epoch >= 0 else ""
    c.set_tag(run_id, PRUNED_TAG, "true")
    c.set_tag(run_id, STOPPED_BY_TAG, by)
    if when:
        c.set_tag(run_id, "stopped_at_epoch", str(int(epoch)))
    what = (f"Pruned: the scheduler (ASHA) stopped this trial{when}." if by == STOPPED_BY_SCHEDULER else
            f"Stopped by the search{when}, before its last epoch: its time budget (time_budget_s) ran out or "
            f"the search was stopped. Not pruned by the scheduler.")
    c.set_tag(run_id, "mlflow.note.content",
              f"{what} Its scores are from fewer epochs than a finished trial's, so it never counts as the "
              f"search's best.")
    c.set_terminated(run_id, "FINISHED")


def is_pruned(run) -> bool:
    return run.data.tags.get(PRUNED_TAG) == "true"


# The one rule for "the best trial" (the search's parent run, its summary, `crosspt promote`): FINISHED
# child runs only, not pruned, by the objective metric, ties to the earliest start. A trial ASHA stopped
# (tagged pruned: FINISHED since this version, KILLED before) scored fewer epochs than a finished one, so
# its score never competes; failed ones neither.
def best_finished_child(c, experiment_id: str, metric: str, mode: str, parent_run_id: str | None = None):
    """The best FINISHED, unpruned child run (of one parent, or of any search in the experiment), or None."""
    parent = f"= '{parent_run_id}'" if parent_run_id else "LIKE '%'"
    token = None
    while True:
        page = c.search_runs([experiment_id], max_results=200, page_token=token,
                             filter_string=f"attributes.status = 'FINISHED' and tags.`mlflow.parentRunId` {parent}",
                             order_by=[f"metrics.`{metric}` {'DESC' if mode == 'max' else 'ASC'}",
                                       "attributes.start_time ASC"])
        for run in page:
            value = run.data.metrics.get(metric)
            if not is_pruned(run) and value is not None and value == value:    # a NaN or missing score is no best
                return run
        token = page.token
        if not token:
            return None

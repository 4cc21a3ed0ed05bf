"""The experiment a search logs to and its runs: one parent run per search (`SEARCH_TAG`), one child run
per trial (`TRIAL_TAG`). The experiment is created once, by the driver, with an absolute artifact
location (Ray workers change directory)."""
from __future__ import annotations

from crosspt.registry.store import artifact_root_for, client

TRIAL_TAG = "crosspt.trial_id"         # Tune's trial id: how a trial finds its child run again
SEARCH_TAG = "crosspt.search"

# MLflow 3 opens an experiment without this tag on its GenAI overview (traces, prompts); this is a
# training experiment, so the UI should open on its runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name`, created (or restored) when needed. Two searches that create the same
    new experiment at once: the one that loses the race takes the winner's."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        root = artifact_root_for(uri)
        try:
            return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                       tags=EXPERIMENT_KIND)
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    for k, v in EXPERIMENT_KIND.items():
        if exp.tags.get(k) is None:             # made by an older crosspt, or by hand
            c.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def find_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str):
    found = client(uri).search_runs([experiment_id],
                                    filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                                                  f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return found[0] if found else None


def latest_search(c, experiment_id: str):
    """The parent run of the experiment's latest search (by start time), or None: what `crosspt report`
    and `crosspt promote` read when no parent run is named."""
    found = c.search_runs([experiment_id], filter_string=f"tags.`{SEARCH_TAG}` LIKE '%'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list:
    return client(uri).search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                   max_results=10000)

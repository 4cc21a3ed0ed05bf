"""The MLflow UI's view of a search: which columns its runs table opens with, saved on the experiment."""
from __future__ import annotations

import json
import re
import time

from crosspt.registry.best_run import PRUNED_TAG

# MLflow 3.17's runs table opens with the columns Source, Models and Dataset only, whatever the runs log:
# a metric or param column shows once someone picks it. Its "saved views" are experiment tags
# (`mlflow.sharedViewState.<key>`, an envelope around the table's UI state) that a link opens
# (`&viewStateShareKey=<key>`) and the view menu lists; a search saves one with its factors and scores.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."


def view_key(search_name: str) -> str:
    return "crosspt-" + re.sub(r"[^A-Za-z0-9_-]+", "-", search_name)[:80]


def search_view_state(factors: list[str], metric: str, mode: str) -> dict:
    """The runs table's UI state of a search: run name, the score metrics, the searched factors, whether a
    trial was pruned, sorted best first."""
    def col(kind: str, name: str) -> str:
        return f"{kind}.`{name}`"

    metrics = list(dict.fromkeys([metric, "test_score", "trainable_params"]))
    return {"selectedColumns": [col("attributes", "Duration"), *(col("metrics", m) for m in metrics),
                                *(col("params", f) for f in factors), col("tags", PRUNED_TAG)],
            "orderByKey": col("metrics", metric), "orderByAsc": mode == "min",
            "runsHiddenMode": "SHOW_ALL"}


def save_search_view(c, experiment_id: str, search_name: str, factors: list[str], metric: str, mode: str) -> str:
    """Save (or replace) the search's view of the runs table on its experiment; returns its key."""
    now = int(time.time() * 1000)
    key = view_key(search_name)
    envelope = {"name": f"crosspt search {search_name}", "createdAt": now, "updatedAt": now,
                "state": json.dumps(search_view_state(factors, metric, mode))}
    c.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, json.dumps(envelope))
    return key

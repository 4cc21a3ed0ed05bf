"""The one place crosspt copies a format MLflow keeps to itself.

`MlflowClient.log_table` appends to a table file the run has already (MLflow 3.17 reads the old file,
concatenates, writes it back) and has no way to replace it; a second `crosspt report` of the same search
would stack both reports' rows. So a replaced table is written here in log_table's own file format (the
JSON that its `write_to_file` writes) and logged as a plain artifact over the old one. The UI's
Evaluation view finds it by the run's `mlflow.loggedArtifacts` tag, which the first `log_table` set.
tests/test_upstream_shapes.py fails when log_table's file stops matching what this writes.
"""
from __future__ import annotations

import tempfile
from pathlib import Path


def write_table_file(table: dict[str, list], local: str | Path) -> None:
    """`table` (column -> values) as `log_table` writes a `.json` table: pandas' split orient, no index."""
    import pandas as pd

    pd.DataFrame(table).to_json(local, orient="split", index=False, date_format="iso")


def replace_table(client, run_id: str, table: dict[str, list], path: str) -> None:
    """The table artifact `path` of the run, replaced by `table` (`log_table` would append to it)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(path).name
        write_table_file(table, local)
        client.log_artifact(run_id, str(local), str(Path(path).parent))

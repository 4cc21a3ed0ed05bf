"""Provenance: what code, backbone and data a run used, as tags and dataset inputs."""
from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path

CONFIG_HASH_TAG = "crosspt.config_hash"
BACKBONE_REVISION_TAG = "crosspt.backbone.revision"   # a hub commit or sha256: of a local folder (registry/revision.py)
VERSIONED = ("crosspt", "torch", "transformers", "ray", "mlflow", "optuna")
DATA_SOURCE_TAG = "crosspt.data_source"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """`git rev-parse HEAD` of the checkout crosspt runs from; None outside a git repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def provenance_tags(data_dir: str | None) -> dict[str, str]:
    """Tags every run carries: the git commit (MLflow's own tag, shown in the UI), package versions,
    and where the task data came from."""
    tags = {f"crosspt.version.{pkg}": _version(pkg) for pkg in VERSIONED}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags[DATA_SOURCE_TAG] = str(data_dir) if data_dir else "huggingface hub"
    return tags


def split_datasets(splits: dict[str, dict[str, list]], data_dir: str | None) -> list:
    """One MLflow dataset input per task and split (`{task: {split: [Example]}}`), its digest a hash of
    the sample ids: two runs with the same digest trained and were scored on the same rows."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source_type, source = ("local", {"uri": str(data_dir)}) if data_dir else ("hugging_face", {"path": "glue"})
    out = []
    for task, by_split in splits.items():
        for split, examples in by_split.items():
            digest = hashlib.sha256("\n".join(e.uid for e in examples).encode()).hexdigest()[:16]
            ds = Dataset(name=f"{task}-{split}", digest=digest, source_type=source_type, source=json.dumps(source),
                         profile=json.dumps({"num_rows": len(examples)}))
            out.append(DatasetInput(ds, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    return out

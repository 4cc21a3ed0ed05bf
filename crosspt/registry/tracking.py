"""MLflow: where runs go, one parent run per search, one child run per trial, plots.

Everything goes through an explicit `MlflowClient` and run ids (no global "active run"), because
trials log from Ray actors in other processes. The experiment is created once, by the driver, with an
absolute artifact location (Ray workers change directory).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from crosspt.errors import ConfigError

MAX_PARAM_LEN = 6000        # MLflow 3's limit on a param value
MAX_KEY_LEN = 250
TRIAL_TAG = "crosspt.trial_id"
INITIAL_PREFIX = "initial."     # = crosspt.run.loop.INITIAL_PREFIX, repeated so that tracking never imports torch
SEARCH_TAG = "crosspt.search"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit > $MLFLOW_TRACKING_URI > sqlite store `mlflow.db` in the working directory (absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            return f"sqlite:///{path.resolve()}"
    if "://" not in uri:
        raise ConfigError(f"tracking URI {uri!r}: use an absolute sqlite:///... path or an http(s):// server "
                          f"(MLflow 3 refuses the plain file store)")
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer fails the search before any trial starts."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status >= 400:
                raise ConfigError(f"MLflow tracking server at {uri} answered HTTP {r.status}")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"MLflow tracking server not reachable at {uri} ({reason})") from None


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def artifact_root_for(uri: str) -> str | None:
    """Absolute artifact folder beside a sqlite store; a server picks its own (proxied) location."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


# MLflow 3 opens an experiment without this tag on its GenAI overview (traces, prompts); this is a
# training experiment, so the UI should open on its runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        for k, v in EXPERIMENT_KIND.items():
            if exp.tags.get(k) is None:             # made by an older crosspt, or by hand
                c.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    root = artifact_root_for(uri)
    return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None, tags=EXPERIMENT_KIND)


# ---- provenance: what code and data a run used ---------------------------------------------------
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


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<secret>[^/@\s]+)@")


def redact(text: str) -> str:
    """Hide the password of `scheme://user:password@host` URLs (a tracking URI in a config, say)."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def flat_params(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        s = "" if v is None else redact(str(v))
        out[k[:MAX_KEY_LEN]] = s[:MAX_PARAM_LEN]
    return out


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flat_params(params).items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(c, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k[:MAX_KEY_LEN], float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i:i + 500])


def router_heatmap(weights, task_names: list[str], cand_names: list[str], path: str | Path,
                   title: str = "router weights (evaluation)") -> Path:
    """Tasks x candidate prompts, the deterministic router weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    w = np.asarray(weights, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * max(1, w.shape[1]), 1.0 + 0.5 * max(1, w.shape[0])))
    im = ax.imshow(w, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cand_names)), cand_names, rotation=30, ha="right")
    ax.set_yticks(range(len(task_names)), task_names)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", color="w" if w[i, j] < 0.6 else "k",
                    fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class TrialLogger:
    """One trial's child run. Picklable: created in the trial, used from Train callbacks too.

    `find` looks for the child run of this Tune trial id under the parent: a restored search `resume`s
    it (no duplicates), else `start` creates it."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str | None, trial_id: str | None,
                 trial_number: int | None, run_name: str):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.trial_id, self.trial_number, self.run_name = trial_id, trial_number, run_name
        self.run_id: str | None = None
        self.last_metrics: dict | None = None
        self._logged_best_epoch = None

    def find(self):
        """This trial's child run from an earlier attempt (a retry, or a restored search), or None."""
        return find_trial_run(self.uri, self.experiment_id, self.parent_run_id, self.trial_id)

    def resume(self, found) -> str:
        """Continue `found`, this trial's run from an earlier attempt: RUNNING again, restarts counted."""
        c = client(self.uri)
        self.run_id = found.info.run_id
        c.update_run(self.run_id, status="RUNNING")
        c.set_tag(self.run_id, "crosspt.restarts", str(int(found.data.tags.get("crosspt.restarts", "0")) + 1))
        if "error" in found.data.tags:        # a retry: the earlier attempt's error is history now
            c.set_tag(self.run_id, "crosspt.previous_error", found.data.tags["error"][:5000])
            c.delete_tag(self.run_id, "error")
        return self.run_id

    def start(self, params: dict[str, Any], config_yaml: str, tags: dict[str, str] | None = None,
              datasets: list | None = None) -> str:
        """Create this trial's child run with its params, tags, dataset inputs and config."""
        c = client(self.uri)
        # a single `crosspt train` run has no parent and no trial: the same run, without the search tags
        trial_tags = {} if self.parent_run_id is None else {
            "mlflow.parentRunId": self.parent_run_id, TRIAL_TAG: self.trial_id,
            "crosspt.trial_number": str(self.trial_number)}
        run = c.create_run(self.experiment_id, run_name=self.run_name, tags={**trial_tags, **(tags or {})})
        self.run_id = run.info.run_id
        log_params(c, self.run_id, {**params, **({} if self.trial_number is None else
                                                  {"trial_number": self.trial_number})})
        if datasets:
            c.log_inputs(self.run_id, datasets=datasets)
        c.log_text(self.run_id, redact(config_yaml), "config.yaml")
        return self.run_id

    def log_epoch(self, metrics: dict[str, Any], checkpoint_dir: str | Path | None) -> None:
        c = client(self.uri)
        self.last_metrics = dict(metrics)
        # the untrained evaluation (`crosspt.run.loop.INITIAL_PREFIX` keys of epoch 0) at step -1
        initial = {k[len(INITIAL_PREFIX):]: v for k, v in metrics.items() if k.startswith(INITIAL_PREFIX)}
        if initial:
            log_metrics(c, self.run_id, initial, step=-1)
        log_metrics(c, self.run_id, {k: v for k, v in metrics.items() if not k.startswith(INITIAL_PREFIX)},
                    step=int(metrics.get("epoch", 0)))
        if checkpoint_dir is None:
            return
        best_epoch = metrics.get("best_epoch")
        if best_epoch == self._logged_best_epoch and not metrics.get("final_epoch"):
            return                         # prompts unchanged since the last upload
        self._logged_best_epoch = best_epoch
        self.log_prompts(Path(checkpoint_dir))

    def log_prompts(self, checkpoint_dir: Path) -> None:
        from crosspt.run.artifacts import load_tensors

        c = client(self.uri)
        prompts = checkpoint_dir / "prompts.safetensors"
        if not prompts.is_file():
            return
        c.log_artifact(self.run_id, str(prompts), "prompts")
        tensors, meta = load_tensors(prompts)
        n_src = int(meta.get("n_sources", 0))
        cands = [f"source{i}" for i in range(n_src)] + (["private"] if int(meta.get("private_len", 0)) else [])
        src_names = meta.get("source_tasks") or []
        cands = [f"src:{src_names[i]}" if i < len(src_names) else c_ for i, c_ in enumerate(cands)]
        with tempfile.TemporaryDirectory() as d:
            png = router_heatmap(tensors["router_weights"].numpy(), list(meta["tasks"]), cands,
                                 Path(d) / "router_heatmap.png")
            c.log_artifact(self.run_id, str(png), "plots")
        result = checkpoint_dir / "result.json"
        if result.is_file():
            c.log_artifact(self.run_id, str(result))

    def finish(self, status: str = "FINISHED", error: str | None = None, tags: dict | None = None) -> None:
        c = client(self.uri)
        if error:
            c.set_tag(self.run_id, "error", error[:5000])
        for k, v in (tags or {}).items():
            c.set_tag(self.run_id, k, str(v))
        c.set_terminated(self.run_id, status)


def train_callback(logger: TrialLogger):
    """A Ray Train callback (runs in the Train controller) that logs rank 0's reports to `logger`'s run."""
    from ray.train.v2.api.callback import UserCallback

    class MlflowReport(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is None:
                logger.log_epoch(metrics[0], None)
                return
            with checkpoint.as_directory() as d:
                logger.log_epoch(metrics[0], d)

    return MlflowReport()


def find_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str):
    found = client(uri).search_runs([experiment_id],
                                    filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                                                  f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return found[0] if found else None


# The one rule for "the best trial" (the search's parent run, its summary, `crosspt promote`): FINISHED
# child runs only, by the objective metric, ties to the earliest start. A trial ASHA stopped (KILLED,
# tagged pruned) scored fewer epochs than a finished one, so its score never competes; failed ones neither.
def best_finished_child(c, experiment_id: str, metric: str, mode: str, parent_run_id: str | None = None):
    """The best FINISHED child run (of one parent, or of any search in the experiment), or None."""
    parent = f"= '{parent_run_id}'" if parent_run_id else "LIKE '%'"
    found = c.search_runs([experiment_id], max_results=1,
                          filter_string=f"attributes.status = 'FINISHED' and tags.`mlflow.parentRunId` {parent}",
                          order_by=[f"metrics.`{metric}` {'DESC' if mode == 'max' else 'ASC'}",
                                    "attributes.start_time ASC"])
    run = found[0] if found else None
    value = run.data.metrics.get(metric) if run else None
    return run if value is not None and value == value else None      # a NaN or missing score is no best


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list:
    return client(uri).search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                   max_results=10000)

"""MLflow: where runs go, one parent run per search, one child run per trial, plots.

Everything goes through an explicit `MlflowClient` and run ids (no global "active run"), because
trials log from Ray actors in other processes. The experiment is created once, by the driver, with an
absolute artifact location (Ray workers change directory).

A new sqlite store is created and migrated by the first client of a process (MLflow runs its alembic
migrations on first use); two processes that open a new store at once race through those migrations and
one dies (`CommandError: Online migration expected to match one row ...`). `client` therefore opens a
sqlite store once per process under a file lock beside it (`prepare_store`): the first process creates
and migrates, the others wait and find it ready. A server migrates its own store when it starts.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from crosspt.errors import ConfigError

MAX_PARAM_LEN = 6000        # MLflow 3's limit on a param value
MAX_KEY_LEN = 250
TRIAL_TAG = "crosspt.trial_id"         # Tune's trial id: how a trial finds its child run again
CONFIG_HASH_TAG = "crosspt.config_hash"
BACKBONE_REVISION_TAG = "crosspt.backbone.revision"   # a hub commit or sha256: of a local folder (registry/revision.py)
PRUNED_TAG = "pruned"                  # a trial stopped before its last epoch (`close_pruned`)
STOPPED_BY_TAG = "crosspt.stopped_by"  # ... by whom: the scheduler (ASHA's decision) or the search (time budget)
STOPPED_BY_SCHEDULER, STOPPED_BY_SEARCH = "scheduler", "search"
# metrics that are the same at every epoch: logged once (step 0), not charted as per-step lines
ONCE_METRICS = ("trainable_params", "total_params")
# a router's metrics: logged only for runs whose router has them (TrialLogger.routed)
ROUTER_METRICS = ("temperature",)
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


def check_store_reaches_nodes(uri: str, nodes: int, shared: bool = False) -> None:
    """Refuse a sqlite store for a search on a cluster of several nodes: trials log from the node they run
    on, and a trial on another node would open (and create) a sqlite file at that path on its own disk,
    so its runs would never reach this store. `shared`: the path is on storage every node mounts at the
    same place (`tracking.shared_store: true`), which makes it one file."""
    if sqlite_path(uri) is not None and nodes > 1 and not shared:
        raise ConfigError(f"tracking store {uri} is a sqlite file on this machine but the Ray cluster has "
                          f"{nodes} nodes: trials on the others would log to their own local file; use an MLflow "
                          f"server (--tracking-uri http://HOST:PORT), or set tracking.shared_store: true when "
                          f"every node mounts that path from shared storage")


def client(uri: str):
    from mlflow import MlflowClient

    prepare_store(uri)
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def file_lock(path: str | Path):
    """An exclusive `flock` on `path` (created) for the block: processes on this machine (and on a shared
    filesystem that supports flock) take turns."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


_PREPARED: set[str] = set()
_PREPARING = threading.Lock()


def prepare_store(uri: str) -> None:
    """Create or migrate a sqlite tracking store (tracking and model-registry tables) once, under a file
    lock beside it, so that searches started at once on a new store do not race through MLflow's
    migrations; once per process (MLflow keeps one engine per URI). Other URIs pass through."""
    db = sqlite_path(uri)
    if db is None or uri in _PREPARED:
        return
    from mlflow import MlflowClient

    with _PREPARING, file_lock(db.with_name(db.name + ".lock")):
        if uri in _PREPARED:
            return
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)             # the tracking store: created or migrated here
        c.search_registered_models(max_results=1)       # the registry store on the same file
        _PREPARED.add(uri)


def artifact_root_for(uri: str) -> str | None:
    """Absolute artifact folder beside a sqlite store; a server picks its own (proxied) location."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


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


# ---- the runs table as a search reads ------------------------------------------------------------
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
                 trial_number: int | None, run_name: str, routed: bool = True):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.trial_id, self.trial_number, self.run_name = trial_id, trial_number, run_name
        # the run's router has a temperature (ROUTER_METRICS are logged only then); the router heatmap needs
        # no flag: a prompt artifact with fewer than two candidates has none
        self.routed = routed
        self.run_id: str | None = None
        self.last_metrics: dict | None = None
        self._logged_best_epoch = None
        self._logged_once = False

    def find(self):
        """This trial's child run from an earlier attempt (a retry, or a restored search), or None."""
        return find_trial_run(self.uri, self.experiment_id, self.parent_run_id, self.trial_id)

    def resume(self, found) -> str:
        """Continue `found`, this trial's run from an earlier attempt: RUNNING again, restarts counted."""
        c = client(self.uri)
        self.run_id = found.info.run_id
        self._logged_once = all(k in found.data.metrics for k in ONCE_METRICS)
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
        log_params(c, self.run_id, params)
        if datasets:
            c.log_inputs(self.run_id, datasets=datasets)
        c.log_text(self.run_id, redact(config_yaml), "config.yaml")
        return self.run_id

    def log_epoch(self, metrics: dict[str, Any], checkpoint_dir: str | Path | None) -> None:
        c = client(self.uri)
        self.last_metrics = dict(metrics)
        # the untrained evaluation (`crosspt.run.loop.INITIAL_PREFIX` keys of epoch 0) at step -1
        kept = {k: v for k, v in metrics.items() if self.routed or k not in ROUTER_METRICS}
        initial = {k[len(INITIAL_PREFIX):]: v for k, v in kept.items() if k.startswith(INITIAL_PREFIX)}
        if initial:
            log_metrics(c, self.run_id, {k: v for k, v in initial.items() if k not in ONCE_METRICS}, step=-1)
        once = {k: kept[k] for k in ONCE_METRICS if k in kept}
        if once and not self._logged_once:
            log_metrics(c, self.run_id, once, step=0)
            self._logged_once = True
        log_metrics(c, self.run_id, {k: v for k, v in kept.items()
                                     if not k.startswith(INITIAL_PREFIX) and k not in ONCE_METRICS},
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
        if len(cands) >= 2:          # one candidate has no router: its "weights" are all 1.00
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

    def finish_pruned(self, epoch) -> None:
        close_pruned(client(self.uri), self.run_id, epoch)


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


def latest_search(c, experiment_id: str):
    """The parent run of the experiment's latest search (by start time), or None: what `crosspt report`
    and `crosspt promote` read when no parent run is named."""
    found = c.search_runs([experiment_id], filter_string=f"tags.`{SEARCH_TAG}` LIKE '%'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list:
    return client(uri).search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                   max_results=10000)

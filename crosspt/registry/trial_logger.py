"""One trial's child run: its params, per-epoch metrics, prompts and router plot, and its end."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from crosspt.registry.best_run import close_pruned
from crosspt.registry.experiments import TRIAL_TAG, find_trial_run
from crosspt.registry.run_log import log_metrics, log_params, redact
from crosspt.registry.store import client

# metrics that are the same at every epoch: logged once (step 0), not charted as per-step lines
ONCE_METRICS = ("trainable_params", "total_params")
# a router's metrics: logged only for runs whose router has them (TrialLogger.routed)
ROUTER_METRICS = ("temperature",)
INITIAL_PREFIX = "initial."     # = crosspt.run.loop.INITIAL_PREFIX, repeated so that logging never imports torch


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

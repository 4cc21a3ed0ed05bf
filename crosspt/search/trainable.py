"""What one Tune trial runs: a sampled configuration -> one training run + its child MLflow run.

`run_trial` is Tune's function trainable. The loop runs in the trial itself (`scaling.in_process`, one
worker; `budget.repeats` side by side, `crosspt.search.repeats`) or in a Ray Train worker group the trial
drives. The child run is found again on a retry or a restored search (`TrialLogger.find`): a trial that
had finished is replayed from MLflow instead of trained again, one that failed deterministically is not
retried, any other continues its run.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from crosspt.config.schema import RunConfig, config_hash, config_to_yaml
from crosspt.config.space import SearchSpace
from crosspt.errors import CrossPTError, first_in_chain
from crosspt.registry import best_run, provenance, run_log, store
from crosspt.registry.trial_logger import TrialLogger, train_callback
from crosspt.run.checkpoint import BEST_FILE, RESULT_FILE
from crosspt.run.inputs import data_preparations
from crosspt.run.loop import Session, TrainingDiverged
from crosspt.run.shipping import localise, shipped_splits
from crosspt.search.params import logged_params

RETRYABLE_TAG = "crosspt.retryable"
MLFLOW_RUN_KEY = "mlflow_run_id"     # = optuna_glue.MLFLOW_RUN_ATTR: each report names the trial's child run


class TrialNotRetried(RuntimeError):
    """A retry of a trial whose earlier attempt failed deterministically (divergence, bad input)."""


class TuneSession(Session):
    """A one-worker trial running the loop in the Tune trial itself (no Train worker group).

    Each epoch's metrics go to the trial's MLflow run at once (one batched call); its prompts, their router
    heatmap and the result once, as the trial ends (`end`): drawing a plot whenever the best epoch moved
    cost more than the epoch's metrics. The end's work happens before the last report, not after it: Tune
    gives a function trainable's thread no time once its last result is in (an actor handed to the next
    trial waits 2 s for it, then is replaced by a new one; a stopped actor waits for nothing). A trial
    stopped early (ASHA) learns it inside a report, so it can only upload its prompts, without the plot."""

    def __init__(self, logger: TrialLogger | None, use_gpu: bool, started: tuple[float, float] | None = None,
                 prepared: int | None = None):
        import torch

        self.logger = logger
        self._device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self._prompts: Path | None = None          # the latest checkpoint's prompt files, not uploaded yet
        # when the trial started (wall, this process's CPU seconds), and the process's task-file reads then
        self.started, self.started_cpu = started or (time.time(), time.process_time())
        self._prepared = data_preparations() if prepared is None else prepared
        self.ended = False

    def device(self):
        return self._device

    def latest_checkpoint(self):
        from ray import tune

        ckpt = tune.get_checkpoint()
        return Path(ckpt.to_directory()) if ckpt else None

    def report(self, metrics, checkpoint_dir):
        from ray import tune

        if self.logger:
            self.logger.log_epoch(metrics, None)
            if checkpoint_dir is not None:
                self._keep_prompts(Path(checkpoint_dir))
            if metrics.get("final_epoch"):
                self.end()
            metrics = {**metrics, MLFLOW_RUN_KEY: self.logger.run_id}    # the searcher tells Optuna
        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)

    def end(self, plots: bool = True) -> None:
        """The trial's end in its run, once: the best prompts (with the router heatmap and the result when
        `plots`) and the `trial.*` timings."""
        if self.ended or not self.logger:
            return
        self.ended = True
        try:
            if self._prompts is not None and plots:
                self.logger.log_prompts(self._prompts)
            elif self._prompts is not None:
                store.client(self.logger.uri).log_artifact(self.logger.run_id, str(self._prompts / BEST_FILE), "prompts")
        finally:
            self.discard_prompts()
        self._log_timing()

    def _keep_prompts(self, checkpoint_dir: Path) -> None:
        """Copy what `TrialLogger.log_prompts` uploads (KBs) out of the checkpoint, which the loop deletes."""
        if not (checkpoint_dir / BEST_FILE).is_file():
            return
        keep = Path(tempfile.mkdtemp(prefix="crosspt_prompts_"))
        for name in (BEST_FILE, RESULT_FILE):
            if (checkpoint_dir / name).is_file():
                shutil.copy2(checkpoint_dir / name, keep / name)
        self.discard_prompts()
        self._prompts = keep

    def discard_prompts(self) -> None:
        if self._prompts is not None:
            shutil.rmtree(self._prompts, ignore_errors=True)
            self._prompts = None

    def _log_timing(self) -> None:
        """What the trial paid besides training, as metrics of its run (`trial.*`): seconds from the trial's
        start (the function trainable called: actor start-up not included) to its first optimizer step, and
        from the end of its last step to its end (this call: its last report and the run's closing follow);
        seconds evaluating, and of those scoring the assessment rows; the whole trial; each also in this process's CPU seconds (`*_cpu_s`, `cpu_s`: what
        the trial itself spent, whatever else ran on the machine); how many times it read task files to draw
        k-shot splits. The loop's clock (`Session.clock`) exists only where the loop ran in this process (not
        in a Train worker group, nor for `budget.repeats`)."""
        now, now_cpu, clock = time.time(), time.process_time(), self.clock or {}
        timing = {"wall_s": now - self.started, "cpu_s": now_cpu - self.started_cpu,
                  "data_preparations": data_preparations() - self._prepared}
        if "first_step" in clock:
            timing["start_to_first_step_s"] = clock["first_step"] - self.started
            timing["start_to_first_step_cpu_s"] = clock["first_step_cpu"] - self.started_cpu
        if "last_step" in clock:
            timing["last_step_to_end_s"] = now - clock["last_step"]
            timing["last_step_to_end_cpu_s"] = now_cpu - clock["last_step_cpu"]
        if "eval_s" in clock:
            timing["eval_s"], timing["eval_cpu_s"] = clock["eval_s"], clock["eval_cpu_s"]
        if "assess_s" in clock:          # the assessment pass (part of eval_s): what `data.assess_rows` costs
            timing["assess_s"] = clock["assess_s"]
        run_log.log_metrics(store.client(self.logger.uri), self.logger.run_id,
                            {TIMING_PREFIX + k: v for k, v in timing.items()})


TIMING_PREFIX = "trial."


def trial_number_of(trial_dirname: str, trial_id: str) -> int:
    """Tune names a trial's folder `<trainable>_<trial_id>_<index>_<params>_<date>`: the index."""
    m = re.search(re.escape(trial_id) + r"_(\d+)", trial_dirname)
    return int(m.group(1)) if m else -1


def trial_identity(tctx) -> tuple[str, int]:
    """(name, number) of the running trial: `("trial003", 3)`, the name the searcher gave it (Optuna's
    trial number, `crosspt.search.optuna_glue.trial_name`). A trial of a search started before trials had
    names (restored) is numbered by its folder as then."""
    name = tctx.get_trial_name() or ""
    m = re.fullmatch(r"trial(\d+)", name)
    if m:
        return name, int(m.group(1))
    number = trial_number_of(Path(tctx.get_trial_dir()).name, tctx.get_trial_id())
    return f"trial{number:03d}", number


def run_trial(params: dict, ctx: dict) -> None:
    """Tune's function trainable: one sampled configuration -> one training run + its child MLflow run.
    `ctx`: `crosspt.search.driver.SearchRun.trial_context()`."""
    from ray import tune

    space = SearchSpace.model_validate(ctx["space"])
    tctx = tune.get_context()
    trial_id = tctx.get_trial_id()
    name, number = trial_identity(tctx)
    cfg = space.config_for(params)
    cfg = cfg.model_copy(update={"name": name})         # the trial's one name, in config.yaml too
    if ctx.get("data_dir"):
        cfg.data.data_dir = ctx["data_dir"]
    # params and the config hash name the driver's paths; the run reads this node's copies where it lacks them
    run_cfg = localise(cfg, ctx.get("shipped"))
    started, prepared = (time.time(), time.process_time()), data_preparations()
    # the k-shot splits the driver drew for this configuration's data keys (none: the trial draws them)
    splits = shipped_splits(cfg, ctx.get("shipped"))
    logger = None
    if ctx.get("tracking_uri"):
        from crosspt.config.liveness import is_live

        # a router's temperature is logged only where it acts (the liveness table); plots check themselves
        logger = TrialLogger(ctx["tracking_uri"], ctx["experiment_id"], ctx["parent_run_id"], trial_id, number,
                             run_name=name, routed=is_live("prompt.temperature.start", cfg))
        prior = logger.find()             # an earlier attempt: a Tune retry, or a search restored after a crash
        if prior is not None and prior.info.status == "FINISHED":
            _replay_finished(prior, logger)   # it completed, but the dead driver had not recorded that: no rerun
            return
        if prior is not None and prior.info.status == "FAILED" and prior.data.tags.get(RETRYABLE_TAG) == "false":
            raise TrialNotRetried(f"{prior.data.tags.get('error', 'failed')} [not retried: this configuration "
                                  f"fails the same way every time]")
        if prior is not None:
            logger.resume(prior)
        else:
            from crosspt.search.design import design_point, design_tags

            splits = _start_run(logger, cfg, run_cfg, space, params, splits,
                                design_tags(design_point(ctx.get("design"), number)))
    session = TuneSession(logger, run_cfg.scaling.use_gpu, started, prepared)
    try:
        _train(run_cfg, space, session, trial_id, ctx, splits)
    except SystemExit:
        # Tune ends a function trainable it has stopped (ASHA, or after the last epoch) with SystemExit(0)
        if logger:
            session.end(plots=False)          # stopped early: little time left (`TuneSession`)
            last = logger.last_metrics or {}
            if last.get("final_epoch"):
                logger.finish("FINISHED")
            else:
                logger.finish_pruned(last.get("epoch", -1))
        raise
    except BaseException as e:
        if logger:
            try:
                session.end(plots=False)
            except Exception:          # noqa: BLE001 - the trial's own error is the one to report
                session.discard_prompts()
            logger.finish("FAILED", error=f"{type(e).__name__}: {e}",
                          tags={RETRYABLE_TAG: "false"} if deterministic_failure(e) else None)
        raise
    if logger:
        session.end()                         # a run resumed after its end reports nothing: ends here
        logger.finish("FINISHED")


def _start_run(logger: TrialLogger, cfg: RunConfig, run_cfg: RunConfig, space: SearchSpace, params: dict,
               splits: dict | None, phase_tags: dict[str, str] | None = None) -> dict:
    """A new trial's child run (params, config, tags, dataset inputs); returns its k-shot splits (the
    shipped ones, else drawn once here): logged as the run's inputs and trained on.

    Params are the searched factors only (`logged_params`): they are the runs table's and the charts'
    columns. The whole configuration is the `config.yaml` artifact; what identifies it (config hash,
    tasks, backbone and its revision) are tags."""
    from crosspt.registry.revision import backbone_revision
    from crosspt.run.inputs import prepare_data

    if splits is None:
        _, splits = prepare_data(run_cfg)
    revision = backbone_revision(run_cfg.backbone.name)
    logger.start(logged_params(cfg, space, params), config_to_yaml(cfg),
                 datasets=provenance.split_datasets(splits, cfg.data.data_dir),
                 tags={"crosspt.sampled": run_log.redact(json.dumps(params, default=str))[:5000],
                       provenance.CONFIG_HASH_TAG: config_hash(cfg), "crosspt.tasks": ",".join(cfg.tasks),
                       "crosspt.backbone": run_log.redact(cfg.backbone.name),
                       **({provenance.BACKBONE_REVISION_TAG: revision} if revision else {}),
                       **(phase_tags or {}), **provenance.provenance_tags(cfg.data.data_dir)})
    return splits


def _train(cfg: RunConfig, space: SearchSpace, session: TuneSession, trial_id: str, ctx: dict,
           splits: dict | None) -> None:
    """The trial's training: repeats side by side, one in-process loop, or a Ray Train worker group."""
    logger = session.logger
    if space.budget.repeats > 1:
        from crosspt.search.repeats import repeat_configs, run_repeats

        rest = [shipped_splits(c, ctx.get("shipped")) for c in repeat_configs(cfg, space.budget.repeats)[1:]]
        run_repeats(cfg, space, session, splits=[splits, *rest])
    elif cfg.scaling.num_workers == 1 and cfg.scaling.in_process:
        from crosspt.run.loop import run_loop

        run_loop(cfg, session, splits=splits)
    else:
        _fit_trainer_in_trial(cfg, trial_id, ctx, logger, splits)


def deterministic_failure(exc: BaseException) -> bool:
    """Divergence and user errors (bad config/data/artifact) repeat on a retry: retrying them is pointless."""
    return first_in_chain(exc, (TrainingDiverged, CrossPTError)) is not None


def _replay_finished(run, logger: TrialLogger) -> None:
    """Report a completed trial's final metrics (from its child run) again instead of training it again;
    the run keeps its status and end time and gets a `crosspt.replayed` count."""
    from ray import tune

    store.client(logger.uri).set_tag(run.info.run_id, "crosspt.replayed",
                                     str(int(run.data.tags.get("crosspt.replayed", "0")) + 1))
    tune.report(replay_result(run))


def replay_result(run) -> dict[str, Any]:
    """The result a restored trial reports for its earlier attempt's FINISHED child run `run`: the logged
    metrics, and `final_epoch` only where that attempt ran its last epoch. A pruned run (FINISHED too, tagged
    `pruned`) replays as stopped early, so the searcher records it PRUNED in Optuna, never COMPLETE with a
    partial score that TPE would learn from as a full run's."""
    m: dict[str, Any] = dict(run.data.metrics)
    m.update({"final_epoch": not best_run.is_pruned(run), "replayed": True, MLFLOW_RUN_KEY: run.info.run_id})
    if "epoch" in m:
        m["training_iteration"] = int(m["epoch"]) + 1      # as many iterations as epochs, as in the first run
    return m


def _fit_trainer_in_trial(cfg: RunConfig, trial_id: str, ctx: dict, logger, splits: dict | None) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from crosspt.run.loop import ray_worker_loop
    from crosspt.run.trainer import train_scaling

    callbacks = [TuneReportCallback()] + ([train_callback(logger)] if logger else [])
    trainer = TorchTrainer(
        ray_worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "shipped": ctx.get("shipped"), "splits": splits},
        scaling_config=train_scaling(cfg.scaling),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=ctx["train_storage"],
                                       callbacks=callbacks,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=ctx.get("train_max_failures", 0))),
    )
    trainer.fit()

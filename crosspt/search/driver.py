"""The product's main job: Ray Tune + Optuna (TPE) + ASHA over the CrossPT design factors.

Each trial is one training run (a Ray Train `TorchTrainer`, or the same loop in-process for one worker),
logged as a child MLflow run under one parent run per search. The driver owns everything that must
happen exactly once: validating the space, creating the MLflow experiment and parent run, the Optuna
study (persistent sqlite, so a resumed search keeps its sampler history), and closing child runs of
trials that ASHA stopped or that crashed.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crosspt.config.schema import RunConfig, config_hash, config_to_yaml
from crosspt.errors import ConfigError, CrossPTError
from crosspt.config.space import OptunaDefineByRun, SearchSpace, check_repeats
from crosspt.run.faults import FAULT_ENV, parse_faults
from crosspt.run.loop import Session, TrainingDiverged
from crosspt.run.shipping import localise
from crosspt.registry import tracking as T
from crosspt.search.params import trial_params

STATE_FILE = "crosspt_search.json"
RETRYABLE_TAG = "crosspt.retryable"


class TrialNotRetried(RuntimeError):
    """A retry of a trial whose earlier attempt failed deterministically (divergence, bad input)."""


# ---- inside a trial --------------------------------------------------------------------------------
class TuneSession(Session):
    """A one-worker trial running the loop in the Tune trial itself (no Train worker group)."""

    def __init__(self, logger: T.TrialLogger | None, use_gpu: bool):
        import torch

        self.logger = logger
        self._device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")

    def device(self):
        return self._device

    def latest_checkpoint(self):
        from ray import tune

        ckpt = tune.get_checkpoint()
        return Path(ckpt.to_directory()) if ckpt else None

    def report(self, metrics, checkpoint_dir):
        from ray import tune

        if self.logger:
            self.logger.log_epoch(metrics, checkpoint_dir)
        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)


def _resumable_optuna_search():
    """`OptunaSearch` that tells the study how each trial really ended, and survives a restore.

    Tune hands every ending trial's last result to `on_trial_complete`, the ones ASHA stopped too, and
    Ray's `OptunaSearch` would then mark a stopped trial COMPLETE with its partial value: TPE would learn
    from it as if it were a full run and the importances would count it. Here only a trial that ran its
    last epoch (`final_epoch`) is COMPLETE; a stopped one is PRUNED at its last step (TPE ranks pruned
    trials by how far they got), a failed one FAIL.

    Restores: Optuna's sqlite study is written at once, Tune's experiment state only every few seconds, so
    a restored trial may already be finished in the study (its driver told Optuna, then died before Tune
    saved). Results for such a trial are dropped instead of failing the search with UpdateFinishedTrialError."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    finished_already = (optuna.exceptions.UpdateFinishedTrialError, KeyError)

    class ResumableOptunaSearch(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict):
            try:
                super().on_trial_result(trial_id, result)
            except finished_already:
                self._completed_trials.add(trial_id)      # its value is in the study already

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            try:
                if error or not result or trial_id in self._completed_trials:
                    super().on_trial_complete(trial_id, None, error)      # FAIL, or PRUNED without a value
                    return
                self._report_last(trial_id, result)
                if result.get("final_epoch"):
                    super().on_trial_complete(trial_id, result)           # COMPLETE with its value
                else:
                    self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            except finished_already:
                pass
            self._completed_trials.add(trial_id)

        def _report_last(self, trial_id: str, result: dict) -> None:
            """The result a trial ended on (the one ASHA stopped it at, or its last epoch) goes to
            `on_trial_complete`, not to `on_trial_result`: its intermediate value is reported here (a step
            reported already is ignored by Optuna with a warning)."""
            value, step = result.get(self.metric), result.get("training_iteration")
            if isinstance(value, (int, float)) and isinstance(step, int):
                self._ot_trials[trial_id].report(float(value), step)

    ResumableOptunaSearch.__module__, ResumableOptunaSearch.__qualname__ = __name__, "ResumableOptunaSearch"
    return ResumableOptunaSearch


def __getattr__(name: str):
    # built on first use (this module does not import Ray at import time) and found here by name, so the
    # pickled searcher in Tune's experiment state restores as this class
    if name == "ResumableOptunaSearch":
        cls = globals()[name] = _resumable_optuna_search()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trial_number_of(trial_dirname: str, trial_id: str) -> int:
    """Tune names a trial's folder `<trainable>_<trial_id>_<index>_<params>_<date>`: the index."""
    m = re.search(re.escape(trial_id) + r"_(\d+)", trial_dirname)
    return int(m.group(1)) if m else -1


def run_trial(params: dict, ctx: dict) -> None:
    """Tune's function trainable: one sampled configuration -> one training run + its child MLflow run."""
    from ray import tune

    space = SearchSpace.model_validate(ctx["space"])
    tctx = tune.get_context()
    trial_id = tctx.get_trial_id()
    number = trial_number_of(Path(tctx.get_trial_dir()).name, trial_id)
    cfg = space.config_for(params)
    cfg = cfg.model_copy(update={"name": f"{space.name}-trial{number:03d}"})
    if ctx.get("data_dir"):
        cfg.data.data_dir = ctx["data_dir"]
    # params and the config hash name the driver's paths; the run reads this node's copies where it lacks them
    run_cfg = localise(cfg, ctx.get("shipped"))
    logger, splits = None, None
    if ctx.get("tracking_uri"):
        logger = T.TrialLogger(ctx["tracking_uri"], ctx["experiment_id"], ctx["parent_run_id"], trial_id, number,
                               run_name=f"trial-{number:03d}")
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
            all_params = {**trial_params(cfg, space, params), "search.name": space.name,
                          "search.seed": space.search.seed, "config_hash": config_hash(cfg)}
            from crosspt.run.loop import prepare_data

            _, splits = prepare_data(run_cfg)     # drawn once: logged as the run's inputs, trained on below
            logger.start(all_params, config_to_yaml(cfg), datasets=T.split_datasets(splits, cfg.data.data_dir),
                         tags={"crosspt.sampled": T.redact(json.dumps(params, default=str))[:5000],
                               **T.provenance_tags(cfg.data.data_dir)})
    try:
        if space.budget.repeats > 1:
            run_repeats(run_cfg, space, TuneSession(logger, cfg.scaling.use_gpu), ctx.get("fault"))
        elif cfg.scaling.num_workers == 1 and cfg.scaling.in_process:
            from crosspt.run.loop import run_loop

            run_loop(run_cfg, TuneSession(logger, cfg.scaling.use_gpu), fault=ctx.get("fault"), splits=splits)
        else:
            _fit_trainer_in_trial(run_cfg, trial_id, ctx, logger)
    except SystemExit:
        # Tune ends a function trainable it has stopped (ASHA, or after the last epoch) with SystemExit(0)
        if logger:
            last = logger.last_metrics or {}
            if last.get("final_epoch"):
                logger.finish("FINISHED")
            else:
                logger.finish("KILLED", tags={"pruned": "true",
                                              "stopped_at_epoch": last.get("epoch", -1)})
        raise
    except BaseException as e:
        if logger:
            logger.finish("FAILED", error=f"{type(e).__name__}: {e}",
                          tags={RETRYABLE_TAG: "false"} if deterministic_failure(e) else None)
        raise
    if logger:
        logger.finish("FINISHED")


# ---- repeats: one configuration on several k-shot samples ---------------------------------------------
REPEAT_SEED_STRIDE = 1000         # repeat i trains with seed + 1000 i: its own k-shot sample, init, order


def repeat_configs(cfg: RunConfig, repeats: int) -> list[RunConfig]:
    return [cfg.model_copy(update={"seed": cfg.seed + REPEAT_SEED_STRIDE * i}) for i in range(repeats)]


def _averaged(metric: str) -> bool:
    """Scores are averaged over repeats; counters (epoch, params, steps) are the same in every repeat."""
    return metric.startswith(("val_", "test_")) or metric == "best_val_score"


def mean_over_repeats(series: list[list[dict]], per_repeat: tuple[str, ...]) -> list[dict]:
    """Per epoch, repeat 0's metrics with every score replaced by its mean over the repeats, plus each
    repeat's value (`<m>_r<i>`) and the std (`<m>_std`) of the metrics in `per_repeat`. A repeat that
    stopped earlier (patience) counts with its last epoch; `final_epoch` only on the last row."""
    from statistics import mean, pstdev

    from crosspt.search.report import repeat_metric

    rows = []
    for e in range(max(len(s) for s in series)):
        at = [s[min(e, len(s) - 1)] for s in series]
        row = dict(at[0], epoch=e, final_epoch=e == max(len(s) for s in series) - 1)
        for k, v in at[0].items():
            values = [m.get(k) for m in at]
            if _averaged(k) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
                row[k] = mean(values)
                if k in per_repeat:
                    row.update({repeat_metric(k, i): x for i, x in enumerate(values)}, **{f"{k}_std": pstdev(values)})
        rows.append(row)
    return rows


def run_repeats(cfg: RunConfig, space: SearchSpace, session: TuneSession, fault: str | None) -> None:
    """`budget.repeats` R: the configuration trains and validates on R k-shot samples, and Tune/ASHA/Optuna
    see the mean per epoch.

    Sequential, not epoch-interleaved: `run_loop` drives its own epochs, and interleaving them would
    mean running R loops at once (R models in memory, a barrier per epoch) or reaching into its steps.
    The cost: ASHA can stop a trial only after all R repeats ran, so repeats trade its savings for
    less noisy decisions. Repeat 0 (the trial's own seed, the configuration promoted later) supplies
    the checkpoint and prompts; a restored trial runs its repeats again from the start."""
    import tempfile

    from crosspt.run.loop import run_loop
    from crosspt.run.session import LocalSession

    metrics = (space.objective.metric, space.scheduler.metric, "val_score", "test_score")
    with tempfile.TemporaryDirectory(prefix="crosspt_repeats_") as tmp:
        sessions = [LocalSession(Path(tmp) / f"r{i}", use_gpu=cfg.scaling.use_gpu, keep=1)
                    for i in range(space.budget.repeats)]
        for rcfg, rsession in zip(repeat_configs(cfg, space.budget.repeats), sessions):
            run_loop(rcfg, rsession, fault=fault)
        rows = mean_over_repeats([s.reports for s in sessions], metrics)
        for row in rows:
            session.report(row, sessions[0].checkpoints[-1] if row["final_epoch"] and sessions[0].checkpoints else None)


def run_datasets(cfg: RunConfig) -> list:
    """The run's k-shot splits as MLflow dataset inputs (drawn again: deterministic from the config)."""
    from crosspt.run.loop import prepare_data

    _, splits = prepare_data(cfg)
    return T.split_datasets(splits, cfg.data.data_dir)


def deterministic_failure(exc: BaseException) -> bool:
    """Divergence and user errors (bad config/data/artifact) repeat on a retry: retrying them is pointless."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (TrainingDiverged, CrossPTError)):
            return True
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        stack += list(getattr(e, "exceptions", []) or [])
        stack += list((getattr(e, "worker_failures", None) or {}).values())
    return False


def _replay_finished(run, logger: T.TrialLogger) -> None:
    """Report a completed trial's final metrics (from its child run) again instead of training it again;
    the run keeps its status and end time and gets a `crosspt.replayed` count."""
    from ray import tune

    T.client(logger.uri).set_tag(run.info.run_id, "crosspt.replayed",
                                 str(int(run.data.tags.get("crosspt.replayed", "0")) + 1))
    m: dict[str, Any] = dict(run.data.metrics)
    m.update({"final_epoch": True, "replayed": True})
    if "epoch" in m:
        m["training_iteration"] = int(m["epoch"]) + 1      # as many iterations as epochs, as in the first run
    tune.report(m)


def _fit_trainer_in_trial(cfg: RunConfig, trial_id: str, ctx: dict, logger) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from crosspt.run.loop import ray_worker_loop
    from crosspt.run.trainer import train_scaling

    s = cfg.scaling
    callbacks = [TuneReportCallback()] + ([T.train_callback(logger)] if logger else [])
    trainer = TorchTrainer(
        ray_worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "fault": ctx.get("fault"),
                           "shipped": ctx.get("shipped")},
        scaling_config=train_scaling(s),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=ctx["train_storage"],
                                       callbacks=callbacks,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=ctx.get("train_max_failures", 0))),
    )
    trainer.fit()


# ---- the driver ------------------------------------------------------------------------------------
def _status_callback(uri: str, experiment_id: str, parent_run_id: str):
    """Closes child runs the trial itself could not close: ASHA stops (KILLED + pruned), crashes (FAILED)."""
    from ray import tune

    class MlflowTrialStatus(tune.Callback):
        def _close(self, trial, status, error=None, pruned=False):
            try:
                run = T.find_trial_run(uri, experiment_id, parent_run_id, trial.trial_id)
            except Exception:
                return
            if run is None or run.info.status != "RUNNING":
                return
            c = T.client(uri)
            if pruned:
                c.set_tag(run.info.run_id, "pruned", "true")
            if error:
                c.set_tag(run.info.run_id, "error", str(error)[:5000])
            c.set_terminated(run.info.run_id, status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            if last.get("final_epoch"):
                self._close(trial, "FINISHED")
            else:
                self._close(trial, "KILLED", pruned=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            err = getattr(trial, "error_msg", None) or _read_error(trial)
            self._close(trial, "FAILED", error=err)

    return MlflowTrialStatus()


def _read_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        return Path(path).read_text()[-2000:] if path else "trial failed"
    except OSError:
        return "trial failed"


def derive_concurrency(space: SearchSpace, cfg: RunConfig, nodes: list[dict] | None = None) -> int:
    """Trials that fit at once (`resources.max_concurrent_trials: auto`), capped by an explicit number:
    Train V2 worker groups sit outside Tune's accounting, so a higher value than the cluster can place
    deadlocks the search. `nodes`: Ray's `ray.nodes()` (read from the running cluster when None)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    fit = max(1, trials_that_fit(nodes, cfg.scaling.worker_resources(), cfg.scaling.num_workers))
    asked = space.resources.max_concurrent_trials
    return fit if asked == "auto" else max(1, min(int(asked), fit))


def trials_that_fit(nodes: list[dict], per_worker: dict[str, float], num_workers: int) -> int:
    """How many trials of `num_workers` workers of `per_worker` resources the alive `nodes` can place:
    per node the minimum over the asked resources of floor(node total / per worker), summed, over the
    workers a trial needs. Counted per node, since a worker's bundle cannot straddle two machines
    (two nodes of 3 CPUs hold two 2-CPU trials, not three)."""
    workers = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources", {})
        # Ray keeps resources in 1e-4 units: 1 / 0.25 GPU is 4 there, floor() must not see 3.9999
        workers += min(math.floor(have.get(k, 0.0) / v + 1e-6) for k, v in per_worker.items() if v > 0)
    return workers // num_workers


def trial_resources(cfg: RunConfig) -> dict:
    """What Tune reserves for one trial: the in-process trial runs the loop itself and holds one worker's
    CPUs and (possibly fractional) GPU; a worker-group trial only drives the group, which asks for its own."""
    if cfg.scaling.num_workers == 1 and cfg.scaling.in_process:
        return {"cpu": cfg.scaling.cpus_per_worker, "gpu": cfg.scaling.gpus}
    return {"cpu": 0, "memory": 1}


@dataclass
class SearchPaths:
    """Where one search keeps its state. A search is identified by (MLflow experiment, space name): the
    same space under another experiment is another search, with its own Tune folder and Optuna study.

    `root` is a local folder or a storage URI (`s3://...`, `gs://...`, `file://...`) handed to Tune as it
    is; the small files crosspt reads itself go through pyarrow's filesystem for that URI."""
    root: str           # Tune experiment folder
    study_name: str     # Optuna study (and Tune experiment name)
    optuna_url: str

    def _fs(self):
        from pyarrow import fs

        return fs.FileSystem.from_uri(self.root) if is_uri(self.root) else (fs.LocalFileSystem(), self.root)

    @property
    def storage(self) -> str:
        return self.root.rsplit("/", 1)[0]

    def exists(self) -> bool:
        from pyarrow import fs

        fsys, path = self._fs()
        return fsys.get_file_info(path).type != fs.FileType.NotFound

    def read_state(self) -> dict | None:
        fsys, path = self._fs()
        try:
            with fsys.open_input_stream(f"{path}/{STATE_FILE}") as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return None

    def write_state(self, state: dict) -> None:
        fsys, path = self._fs()
        fsys.create_dir(path, recursive=True)
        with fsys.open_output_stream(f"{path}/{STATE_FILE}") as f:
            f.write(json.dumps(state).encode())

    def remove(self) -> None:
        fsys, path = self._fs()
        fsys.delete_dir(path)

    def has_tune_state(self) -> bool:
        """Tune saved its experiment state (trials) at least once: a resume restores it; before that a
        resume starts the trials afresh."""
        from pyarrow import fs

        fsys, path = self._fs()
        infos = fsys.get_file_info(fs.FileSelector(path, allow_not_found=True))
        return any(Path(i.path).name.startswith("experiment_state") for i in infos)


def is_uri(path: str) -> bool:
    return "://" in path


def search_paths(space: SearchSpace, storage_path: str | None, tracking_uri: str, experiment: str) -> SearchPaths:
    """The search's folder `<storage>/<space name>` (`<space name>--<experiment>` when the experiment is not
    the space's own name) and its Optuna study, in `optuna.db` beside a sqlite MLflow store, else in the
    local storage folder (or the working directory when storage is a URI)."""
    storage = storage_path or space.storage_path or "ray_results"
    if is_uri(storage):
        storage = storage.rstrip("/")
        local = Path.cwd().resolve()
    else:
        storage = str(Path(storage).expanduser().resolve())
        local = Path(storage)
    slug = re.sub(r"[^\w.-]+", "_", experiment)
    name = space.name if experiment == space.name else f"{space.name}--{slug}"
    if tracking_uri.startswith("sqlite:///"):
        optuna_db = Path(tracking_uri[len("sqlite:///"):]).parent / "optuna.db"
    else:
        optuna_db = local / "optuna.db"
    return SearchPaths(f"{storage}/{name}", name, f"sqlite:///{optuna_db}")


KILL_ENV = "CROSSPT_DRIVER_KILL"       # testing hook: the driver SIGKILLs itself at one named point
KILL_POINTS = ("before_ray", "before_tuner", "reconcile")


def _kill_point(point: str) -> None:
    """Resume drills: die here as a crashed driver would (no cleanup, no finally, no atexit)."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def run_search(space: SearchSpace, *, experiment: str | None = None, data_dir: str | None = None,
               tracking_uri: str | None = None, storage_path: str | None = None, resume: bool = False,
               overwrite: bool = False, verbose: int = 1, promote: str | None = None,
               promote_model: str | None = None, promote_force: bool = False) -> dict:
    """Run (or resume) a search to the end: its source bank first when the space asks to pre-train one,
    then the trials, the report, and (`promote`: an alias) the best FINISHED trial promoted as a version
    of `promote_model` (default: the space's name). Returns a summary with the best trial.

    Steps: check every input before anything starts (`_checked_inputs`), claim the search's saved state
    (`_claim_state`: refuse, overwrite or read it), pre-train or reuse the bank, resolve `models:/` banks
    once, open the parent run (a new one, or the killed driver's, reconciled), then Tune, the report and
    the promotion; the parent ends FINISHED, or FAILED with the error."""
    from crosspt.run.trainer import init_ray

    t0 = time.time()
    base, uri, data_dir, fault = _checked_inputs(space, data_dir, tracking_uri)
    exp_name = experiment or (base.tracking.experiment if base.tracking.experiment != "crosspt" else space.name)
    paths = search_paths(space, storage_path, uri, exp_name)
    state = _claim_state(paths, space.name, exp_name, resume, overwrite)
    space, bank = _pretrained_bank(space, uri, data_dir, paths)
    from crosspt.registry.models import resolve_space_banks     # models:/ source banks -> local files, once, here
    trial_space = resolve_space_banks(space, uri, dest_dir=_banks_dir(paths))

    experiment_id = T.ensure_experiment(uri, exp_name)
    c = T.client(uri)
    if resume:
        parent_run_id = _reopen_parent(c, uri, experiment_id, state["parent_run_id"], paths)
    else:
        parent_run_id = _open_parent(c, space, base, experiment_id, paths,
                                     {"experiment_id": experiment_id, "tracking_uri": uri,
                                      "optuna": paths.optuna_url, "experiment": exp_name})
    restore = resume and paths.has_tune_state()
    if resume and not restore:
        # the driver died before Tune saved any trial: the trials start afresh under the same parent run,
        # and the study the dead driver may have asked from starts again with them
        _delete_study(paths)
    _kill_point("before_ray")
    init_ray(runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": uri,
                                       **({"CROSSPT_DATA_DIR": data_dir} if data_dir else {})}})
    run = SearchRun(trial_space, base, uri, experiment_id, parent_run_id, data_dir, paths, fault,
                    shipped=ship_inputs(trial_space, base, data_dir))
    try:
        summary = _tune(run, restore, verbose)
    except BaseException as e:
        c.set_tag(parent_run_id, "error", f"{type(e).__name__}: {e}"[:5000])
        c.set_terminated(parent_run_id, "FAILED" if not isinstance(e, KeyboardInterrupt) else "KILLED")
        raise
    summary.update({"wall_s": time.time() - t0, "tracking_uri": uri, "experiment": exp_name,
                    "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                    "storage": paths.root})
    _log_parent(c, parent_run_id, summary, paths, space)
    c.set_terminated(parent_run_id, "FINISHED")
    summary["report"] = _report(c, uri, parent_run_id, paths)
    if bank:
        summary["source_bank"] = bank
    if promote:
        from crosspt.registry.models import promote as promote_best

        summary["promoted"] = promote_best(model_name=promote_model or space.name, alias=promote,
                                           experiment=exp_name, metric=space.objective.metric,
                                           mode=space.objective.mode, parent_run_id=parent_run_id,
                                           tracking_uri=uri, force=promote_force)
    return summary


def ship_inputs(space: SearchSpace, base: RunConfig, data_dir: str | None):
    """The task files and local source banks every trial reads, in Ray's object store once (a node that
    lacks the driver's paths writes them to its own cache, see run/shipping.py)."""
    import ray

    from crosspt.run.shipping import manifest, pack_search_inputs
    from crosspt.tasks.data import task_files
    from crosspt.tasks.specs import resolve_tasks

    files = [f for t in resolve_tasks(base.tasks) for f in task_files(t, data_dir)]
    bank_factor = space.space.get("prompt.source_bank")
    banks = [b for b in [base.prompt.source_bank, *((bank_factor.values or []) if bank_factor else [])]
             if isinstance(b, str) and not b.startswith("models:/")]
    packed = pack_search_inputs(files, data_dir, banks)
    return manifest(packed, ray.put(packed))


def _checked_inputs(space: SearchSpace, data_dir: str | None, tracking_uri: str | None):
    """Everything a search needs that can be wrong, checked before Ray starts or a run is created:
    `(base config, tracking URI, data folder, CROSSPT_FAULT spec)`."""
    from crosspt.run.trainer import preflight
    from crosspt.tasks.data import resolve_data_dir

    base = space.base_config()
    data_dir = resolve_data_dir(data_dir or base.data.data_dir)
    if data_dir:
        data_dir = str(Path(data_dir).expanduser().resolve())
        base.data.data_dir = data_dir
    preflight(base)                                       # unknown task/backbone/missing data: fail now
    check_repeats(space, base)
    uri = T.resolve_tracking_uri(tracking_uri or base.tracking.tracking_uri)
    T.check_reachable(uri)
    fault = os.environ.get(FAULT_ENV) or None             # testing hook, forwarded to every trial
    try:
        parse_faults(fault)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if os.environ.get(KILL_ENV, KILL_POINTS[0]) not in KILL_POINTS:
        raise ConfigError(f"{KILL_ENV}={os.environ[KILL_ENV]!r}: use one of {', '.join(KILL_POINTS)}")
    return base, uri, data_dir, fault


def _claim_state(paths: SearchPaths, search_name: str, exp_name: str, resume: bool, overwrite: bool):
    """The saved state of this search identity: refused without --resume/--overwrite, removed with
    --overwrite, read with --resume (None for a new search)."""
    if paths.exists() and not resume:
        if not overwrite:
            raise ConfigError(f"search '{search_name}' in experiment '{exp_name}' already has saved state in "
                              f"{paths.root}; pass --resume to continue it or --overwrite to start it again")
        paths.remove()
        _delete_study(paths)
    if not resume:
        return None
    state = paths.read_state()
    if state is None:
        raise ConfigError(f"nothing to resume: no search '{search_name}' in experiment '{exp_name}' "
                          f"({paths.root})")
    return state


def _reopen_parent(c, uri: str, experiment_id: str, parent_run_id: str, paths: SearchPaths) -> str:
    """The killed driver's parent run, RUNNING again; its child runs reconciled with Tune's state."""
    c.update_run(parent_run_id, status="RUNNING")
    c.set_tag(parent_run_id, "crosspt.resumes", str(int(c.get_run(parent_run_id).data.tags.get("crosspt.resumes", "0")) + 1))
    # child runs a killed driver left RUNNING: trials Tune never recorded are orphans (closed now);
    # trials it recorded as unfinished are resumed below and continue their own child run
    reconcile_child_runs(uri, experiment_id, parent_run_id, tune_trials(paths.root))
    return parent_run_id


def _open_parent(c, space: SearchSpace, base: RunConfig, experiment_id: str, paths: SearchPaths,
                 state: dict) -> str:
    """A new search's parent run (description, params, space, dataset inputs); the saved state names it."""
    search_name = space.name
    parent = c.create_run(experiment_id, run_name=f"search-{search_name}",
                          tags={T.SEARCH_TAG: search_name, "crosspt.storage": paths.root,
                                NOTE_TAG: parent_note(space), **T.provenance_tags(base.data.data_dir)})
    parent_run_id = parent.info.run_id
    if not c.get_experiment(experiment_id).tags.get(NOTE_TAG):   # the experiments list shows this line
        c.set_experiment_tag(experiment_id, NOTE_TAG, f"crosspt search `{search_name}`"
                             + (f": {space.description}" if space.description else ""))
    # at once: from here on a killed driver leaves a search that --resume can continue
    paths.write_state({"parent_run_id": parent_run_id, **state})
    T.log_params(c, parent_run_id, {"search.name": search_name, "search.seed": space.search.seed,
                                    "search.algorithm": space.search.algorithm,
                                    "search.num_samples": space.budget.num_samples,
                                    "search.scheduler": space.scheduler.type,
                                    "objective.metric": space.objective.metric,
                                    "objective.mode": space.objective.mode,
                                    "space.keys": ",".join(space.space)})
    c.log_text(parent_run_id, T.redact(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False)),
               "search_space.yaml")
    c.log_inputs(parent_run_id, datasets=run_datasets(base))
    return parent_run_id


def _report(c, uri: str, parent_run_id: str, paths: SearchPaths) -> dict:
    """The design-factor report of the finished search, beside its Tune folder (in the working directory
    for a storage URI) and on the parent run. A report that cannot be drawn is noted on the parent run and
    in the summary: the search's results are in MLflow already and stay valid."""
    from crosspt.search.report import format_table, report_search

    base = Path.cwd() if is_uri(paths.root) else Path(paths.storage)
    out = base / f"{paths.study_name}_report"
    try:
        rep, md = report_search(uri, parent_run_id=parent_run_id, out=out)
    except Exception as e:
        c.set_tag(parent_run_id, "crosspt.report", f"failed: {type(e).__name__}: {e}"[:500])
        return {"dir": str(out), "table": f"report: failed ({type(e).__name__}: {e})", "error": str(e)}
    return {"dir": str(md.parent), "table": format_table(rep)}


@dataclass
class SearchRun:
    """What the driver resolved once for one search, and every trial and the final bookkeeping need."""
    space: SearchSpace          # source banks resolved to local files
    base: RunConfig
    uri: str                    # MLflow tracking URI
    experiment_id: str
    parent_run_id: str
    data_dir: str | None
    paths: SearchPaths
    fault: str | None           # CROSSPT_FAULT testing hook, forwarded to every trial
    shipped: dict | None = None  # the task files and banks for nodes without them (run/shipping.py)

    def trial_context(self) -> dict:
        """The plain dict `run_trial` gets (Tune pickles it into every trial)."""
        return {"space": self.space.model_dump(mode="json"), "tracking_uri": self.uri,
                "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id,
                "data_dir": self.data_dir, "fault": self.fault, "train_storage": f"{self.paths.root}/_train",
                "train_max_failures": self.space.resources.max_retries, "shipped": self.shipped}


def make_searcher(space: SearchSpace, optuna_url: str, study_name: str):
    """Both algorithms are an Optuna study over the same define-by-run space (TPE, or Optuna's random
    sampler), persisted in sqlite: PRUNED/FAIL states, resume and the importance plot work for both."""
    import optuna

    import crosspt.search.driver as this

    s, obj = space.search, space.objective
    sampler = (optuna.samplers.RandomSampler(seed=s.seed) if s.algorithm == "random" else
               optuna.samplers.TPESampler(seed=s.seed, constant_liar=s.constant_liar,
                                          n_startup_trials=s.n_startup_trials))
    return this.ResumableOptunaSearch(OptunaDefineByRun(space), metric=obj.metric, mode=obj.mode, sampler=sampler,
                                      storage=optuna.storages.RDBStorage(optuna_url), study_name=study_name,
                                      points_to_evaluate=[dict(p) for p in s.points] or None)


def make_scheduler(space: SearchSpace, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sch = space.scheduler
    if sch.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(metric=sch.metric, mode=space.objective.mode, time_attr="training_iteration",
                         max_t=epochs, grace_period=min(sch.grace_period, epochs),
                         reduction_factor=sch.reduction_factor)


def _delete_study(paths: SearchPaths) -> None:
    import optuna

    try:
        optuna.delete_study(study_name=paths.study_name, storage=paths.optuna_url)
    except KeyError:
        pass


def _pretrained_bank(space: SearchSpace, uri: str, data_dir: str | None,
                     paths: SearchPaths) -> tuple[SearchSpace, dict | None]:
    """A space with `source_bank: {pretrain: ...}` gets its bank first: the registered version of the same
    spec, else one pre-trained now; the space then names that version (`models:/NAME/VERSION`, pinned:
    the alias may move later). Other spaces pass through."""
    p = space.source_pretrain()
    if p is None:
        return space, None
    from crosspt.registry.sources import ensure_source_bank

    bank = ensure_source_bank(space.source_pretrain_config(), tracking_uri=uri, model_name=p.model_name,
                              alias=p.alias, data_dir=data_dir, output_dir=_banks_dir(paths) / f"{space.name}-pretrain")
    print(f"source bank: {'reused' if bank['reused'] else 'pre-trained'} {bank['model_uri']} (spec {bank['spec']})")
    return space.with_source_bank(bank["model_uri"]), bank


def _banks_dir(paths: SearchPaths) -> Path:
    """Local folder for source banks fetched from the registry (trials read them as files)."""
    if is_uri(paths.root):
        from crosspt.registry.models import cache_dir

        return cache_dir() / "source_banks"
    return Path(paths.storage) / "_source_banks"


def _tune(run: SearchRun, restore: bool, verbose: int) -> dict:
    from ray import tune

    space, paths = run.space, run.paths
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=run.trial_context()),
                                    trial_resources(run.base))
    if restore:
        tuner = tune.Tuner.restore(paths.root, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        _kill_point("before_tuner")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=make_searcher(space, paths.optuna_url, paths.study_name),
                                        scheduler=make_scheduler(space, run.base.train.epochs),
                                        num_samples=space.budget.num_samples,
                                        max_concurrent_trials=derive_concurrency(space, run.base),
                                        time_budget_s=space.budget.time_budget_s),
            run_config=tune.RunConfig(name=paths.study_name, storage_path=paths.storage,
                                      callbacks=[_status_callback(run.uri, run.experiment_id, run.parent_run_id)],
                                      failure_config=tune.FailureConfig(max_failures=space.resources.max_retries),
                                      verbose=verbose),
        )
    results = tuner.fit()
    trials = tune_trials(paths.root)
    _kill_point("reconcile")
    reconcile_child_runs(run.uri, run.experiment_id, run.parent_run_id, trials, search_ended=True)
    _fail_stale_optuna_trials(paths.optuna_url, paths.study_name)
    return summarize(results, space, trials)


# ---- after a crash: make MLflow and Optuna agree with Tune's record ---------------------------------
def tune_trials(root: str) -> list:
    """The trials in a Tune experiment's saved state (id, status, last result, error file)."""
    from ray.tune import ExperimentAnalysis

    try:
        return list(ExperimentAnalysis(root).trials)
    except Exception:          # no state saved yet (the driver died at once): every child run is an orphan
        return []


def reconcile_child_runs(uri: str, experiment_id: str, parent_run_id: str, trials: list,
                         search_ended: bool = False) -> dict[str, int]:
    """Close child runs left RUNNING by a driver that died.

    A child of a trial Tune never recorded (created after the last experiment-state save) is an orphan:
    the restored search replaces that trial, so its run ends KILLED, tagged `crosspt.orphaned`, and is
    soft-deleted (`mlflow runs restore` brings it back). A child of a trial Tune recorded as ended is
    closed with that trial's status. A child of an unfinished trial is left alone (the trial resumes and
    continues it) unless the search has ended."""
    c = T.client(uri)
    by_id = {t.trial_id: t for t in trials}
    counts = {"orphaned": 0, "closed": 0}
    for run in T.child_runs(uri, experiment_id, parent_run_id):
        if run.info.status != "RUNNING":
            continue
        rid, t = run.info.run_id, by_id.get(run.data.tags.get(T.TRIAL_TAG, ""))
        if t is None:
            c.set_tag(rid, "crosspt.orphaned", "true")
            c.set_tag(rid, "error", "orphaned: the search driver died before Tune recorded this trial; "
                                    "the resumed search ran a replacement")
            c.set_terminated(rid, "KILLED")
            c.delete_run(rid)
            counts["orphaned"] += 1
            continue
        status = getattr(t, "status", "")
        if status == "TERMINATED":
            if (t.last_result or {}).get("final_epoch"):
                c.set_terminated(rid, "FINISHED")
            else:
                c.set_tag(rid, "pruned", "true")
                c.set_terminated(rid, "KILLED")
        elif status == "ERROR":
            c.set_tag(rid, "error", _read_error(t)[:5000])
            c.set_terminated(rid, "FAILED")
        elif search_ended:
            c.set_tag(rid, "error", f"the search ended with this trial {status or 'unfinished'}")
            c.set_terminated(rid, "KILLED")
        else:
            continue
        counts["closed"] += 1
    return counts


def _fail_stale_optuna_trials(optuna_url: str, study_name: str) -> None:
    """Optuna trials still RUNNING once the search is over were asked for by a driver that died."""
    import optuna

    try:
        storage = optuna.storages.RDBStorage(optuna_url)
        study = optuna.load_study(study_name=study_name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            storage.set_trial_state_values(
                storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), t.number),
                optuna.trial.TrialState.FAIL)
    except Exception:      # bookkeeping only: never fails a finished search
        pass


_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?([A-Z]\w*(?:Error|Exception|Diverged|Fault|NotRetried|Exit)\b.*)$")


def error_line(err: Any) -> str:
    """The line of a (Ray-wrapped) trial error that names the exception: `TrainingDiverged: loss ...`."""
    text = str(err or "").strip()
    if not text:
        return ""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for line in reversed(lines):
        m = _ERROR_LINE.match(line)
        if m and not m.group(1).startswith(("RayTaskError", "TuneError", "RayActorError(")):
            return m.group(1)[:300]
    return lines[-1][:300]


def _trial_id_of(path: str | None, trials: list) -> str:
    name = Path(path or "").name
    return next((t.trial_id for t in trials if t.trial_id and f"_{t.trial_id}_" in f"_{name}_"), "")


def summarize(results, space: SearchSpace, trials: list | None = None) -> dict:
    """Every trial (status, params, metrics) and the best one by the objective."""
    obj = space.objective
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append({
            "trial_id": m.get("trial_id") or _trial_id_of(getattr(r, "path", None), trials or []),
            "status": "ERROR" if r.error else ("FINISHED" if m.get("final_epoch") else "STOPPED"),
            "epochs": m.get("training_iteration", 0),
            obj.metric: m.get(obj.metric),
            "test_score": m.get("test_score"),
            "params": {k: v for k, v in (r.config or {}).items()},
            "error": error_line(r.error) if r.error else "",
        })
    # T.BEST_RULE: a stopped trial's score is from fewer epochs, not comparable with a finished one's
    scored = [x for x in rows if x["status"] == "FINISHED" and isinstance(x[obj.metric], (int, float))
              and not math.isnan(x[obj.metric])]
    best = (max if obj.mode == "max" else min)(scored, key=lambda x: x[obj.metric]) if scored else None
    return {"trials": rows, "best": best, "num_trials": len(rows),
            "num_failed": sum(x["status"] == "ERROR" for x in rows),
            "num_stopped": sum(x["status"] == "STOPPED" for x in rows)}


NOTE_TAG = "mlflow.note.content"         # the run's description in the MLflow UI (markdown)


def parent_note(space: SearchSpace, summary: dict | None = None) -> str:
    """The parent run's description: what was searched, on what budget, and (once known) the best trial."""
    def factor(key: str, p) -> str:
        rng = f"{p.values}" if p.type == "choice" else f"[{p.low}, {p.high}]"
        return f"- `{key}`: {p.type} {rng}" + (f" when {p.when}" if p.when else "")

    b, s = space.budget, space.search
    lines = [f"**Search `{space.name}`**" + (f" — {space.description}" if space.description else ""), "",
             "Space:", *[factor(k, p) for k, p in space.space.items()], "",
             f"Budget: {b.num_samples} trials, {space.base_config().train.epochs} epochs at most"
             + (f", {b.time_budget_s:g}s" if b.time_budget_s else "")
             + f"; searcher {s.algorithm} (seed {s.seed}), scheduler {space.scheduler.type}; "
               f"objective {space.objective.mode} `{space.objective.metric}`"]
    if summary is not None:
        best, m = summary.get("best"), space.objective.metric
        lines += ["", f"Result: {summary['num_trials']} trials, {summary['num_stopped']} stopped early, "
                      f"{summary['num_failed']} failed"]
        lines += [f"Best trial (finished trials only): `{best['trial_id']}` {m} = {best[m]:.4f}"
                  + (f", child run `{summary['best_run_id']}`" if summary.get("best_run_id") else "")
                  + f"; {json.dumps(best['params'], default=str)}"] if best else ["No trial finished."]
    return "\n".join(lines)


def _log_parent(c, parent_run_id: str, summary: dict, paths: SearchPaths, space: SearchSpace) -> None:
    trials, metric_key = summary["trials"], space.objective.metric
    # the one rule (T.best_finished_child, which `promote` uses too) picks the best, ties included: Tune's
    # row order and MLflow's start-time order can break a tie differently
    run = T.best_finished_child(c, summary["experiment_id"], metric_key, space.objective.mode, parent_run_id)
    if run is not None:
        tid = run.data.tags.get(T.TRIAL_TAG)
        summary["best"] = next((t for t in trials if t["trial_id"] == tid), summary["best"])
    best = summary["best"]
    keys = sorted({k for t in trials for k in t["params"]})
    columns = ["trial_id", "status", "epochs", "objective", "test_score", *keys, "error"]
    rows = [[t["trial_id"], t["status"], t["epochs"], t.get(metric_key), t["test_score"],
             *[t["params"].get(k, "") for k in keys], t["error"]] for t in trials]
    buf = io.StringIO()
    csv.writer(buf).writerows([columns, *rows])
    c.log_text(parent_run_id, buf.getvalue(), "trials.csv")          # for spreadsheets and scripts
    # the same rows as an MLflow table: the UI's artifact view shows it as a sortable table
    c.log_table(parent_run_id, {col: [str(r[i]) if r[i] is not None else "" for r in rows]
                                for i, col in enumerate(columns)}, "trials.json")
    T.log_metrics(c, parent_run_id, {"num_trials": summary["num_trials"], "num_failed": summary["num_failed"],
                                     "num_stopped": summary["num_stopped"], "wall_s": summary["wall_s"]})
    if best:
        T.log_metrics(c, parent_run_id, {f"best_{metric_key}": best[metric_key],
                                         **({"best_test_score": best["test_score"]} if best["test_score"] is not None else {})})
        T.log_params(c, parent_run_id, {f"best.{k}": v for k, v in best["params"].items()})
        if run is None or run.data.tags.get(T.TRIAL_TAG) != best["trial_id"]:
            run = T.find_trial_run(summary["tracking_uri"], summary["experiment_id"], parent_run_id, best["trial_id"])
        if run:
            c.set_tag(parent_run_id, "crosspt.best_run_id", run.info.run_id)
            summary["best_run_id"] = run.info.run_id
    c.set_tag(parent_run_id, NOTE_TAG, parent_note(space, summary))
    _importance_plot(c, parent_run_id, paths.optuna_url, paths.study_name)


def _importance_plot(c, parent_run_id: str, optuna_url: str, study_name: str) -> None:
    """Optuna's fANOVA parameter importances over the COMPLETE trials (pruned and failed ones carry no
    final value), as a PNG on the parent run; needs >= 2 of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=optuna_url)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(complete) < 2 or not any(t.params for t in complete):
            return
        ax = optuna.visualization.matplotlib.plot_param_importances(study)
        ax.figure.set_size_inches(8, 4)
        ax.figure.tight_layout()
        c.log_figure(parent_run_id, ax.figure, "plots/param_importances.png")
        plt.close(ax.figure)
    except Exception as e:  # importance needs variance in params/values; a plot never fails a search
        c.set_tag(parent_run_id, "importance_plot", f"skipped: {type(e).__name__}: {e}"[:500])


def format_summary(summary: dict, objective: str) -> str:
    lines = [f"{'trial':<10}{'status':<10}{'epochs':>7}{objective:>16}{'test':>10}  params"]
    for t in sorted(summary["trials"], key=lambda t: t["trial_id"]):
        v = t.get(objective)
        test = t.get("test_score")
        params = ", ".join(f"{k.split('.')[-1]}={_short(v_)}" for k, v_ in t["params"].items())
        lines.append(f"{t['trial_id'][-8:]:<10}{t['status']:<10}{t['epochs']:>7}"
                     f"{(f'{v:.4f}' if isinstance(v, float) else str(v)):>16}"
                     f"{(f'{test:.4f}' if isinstance(test, float) else '-'):>10}  {params}")
    b = summary.get("best")
    lines.append(f"{summary['num_trials']} trials ({summary['num_stopped']} stopped early by ASHA, "
                 f"{summary['num_failed']} failed) in {summary['wall_s']:.1f}s")
    if b:
        lines.append(f"best: trial {b['trial_id']} {objective}={b.get(objective):.4f}"
                     + (f" test_score={b['test_score']:.4f}" if b.get("test_score") is not None else ""))
        lines.append("best config: " + json.dumps(b["params"], default=str))
    lines.append(f"MLflow: {summary['tracking_uri']}  experiment '{summary['experiment']}'  "
                 f"parent run {summary['parent_run_id']}"
                 + (f"  best child run {summary['best_run_id']}" if summary.get("best_run_id") else ""))
    lines.append(f"MLflow UI: {runs_page(summary)}")
    lines.append(f"Ray results: {summary['storage']}")
    return "\n".join(lines)


def runs_page(summary: dict) -> str:
    """Where the search's runs table is in the MLflow UI. MLflow 3.17's UI has a global GenAI / Model
    training switch (GenAI by default) that wins over the experiment's `mlflow.experimentKind` tag, so the
    link names the workflow; for a sqlite store, behind `mlflow ui --backend-store-uri URI`."""
    uri = summary["tracking_uri"]
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{summary['experiment_id']}/runs?workflowType=machine_learning"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)

"""Source-prompt pre-training: one vanilla prompt per source task, trained in parallel as Ray tasks,
collected into a bank (`crosspt.artifacts.save_bank`), logged to MLflow and registered as a versioned
model that searches name as `models:/NAME@current`.

Each source task is a single-task run of the one config schema with the CrossPT parts switched off
(`prompt.n_sources=0`, `prompt.private_len = prompt.source_len`, task router, no bank): its learned
private prompt `[L_s, d]` IS the source prompt. The run loop is the same `run_loop` the trainer uses,
in-process inside each Ray task with a `LocalSession` (its checkpoints go to `<output>/<task>/`).
Ray asks `scaling.cpus_per_worker` CPUs (and one GPU with `scaling.use_gpu`) per task, so the tasks
run side by side as far as the cluster allows.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from crosspt.config.schema import RunConfig, build_config, config_hash, config_to_dict, config_to_yaml, flatten
from crosspt.registry.models import BANK_FILE, _check_alias_name, register_bank
from crosspt.tasks.data import ENV_DATA_DIR


def source_config(cfg: RunConfig, task: str) -> RunConfig:
    """The single-task vanilla prompt-tuning config that trains `task`'s source prompt."""
    tree = config_to_dict(cfg)
    tree["name"] = f"{cfg.name}-source-{task}"
    tree["tasks"] = [task]
    p = tree["prompt"]
    p.update(n_sources=0, private_len=p["source_len"], top_k=None, source_bank=None, learn_sources=False,
             router="task", composition="cat")
    if p["init"] == "source":
        p["init"] = "auto"
    tree["scaling"].update(num_workers=1, in_process=True)
    # the source half of the task's train split only: no target ever validates on a row a source prompt
    # was trained or selected on (crosspt.tasks.data.TrainPool)
    tree["data"]["train_pool"] = "source"
    return build_config(tree, f"source config for '{task}'")


def train_source(cfg_tree: dict, output_dir: str) -> dict:
    """Body of one Ray task: train one source prompt in-process; return it with the run's metrics."""
    from crosspt.run.artifacts import load_prompt_artifact
    from crosspt.run.loop import BEST_FILE, LocalSession, run_loop

    cfg = RunConfig.model_validate(cfg_tree)
    task = cfg.tasks[0]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    session = LocalSession(out, use_gpu=cfg.scaling.use_gpu, keep=1)
    result = run_loop(cfg, session)
    final = session.checkpoints[-1] / BEST_FILE          # the last checkpoint holds the best epoch's prompts
    tensors, meta = load_prompt_artifact(final)
    prompt = tensors["prompt.private.prompts"][0].float().contiguous()      # [L, d]
    (out / "result.json").write_text(json.dumps({k: v for k, v in result.items() if k != "history"}, default=str))
    return {"task": task, "prompt": prompt.numpy(), "result": {k: v for k, v in result.items() if k != "history"},
            "history": result.get("history", []), "output_dir": str(out)}


def pretrain_sources(cfg: RunConfig, *, tasks: list[str] | None = None, data_dir: str | None = None,
                     output_dir: str | Path | None = None, tracking_uri: str | None = None,
                     experiment: str | None = None, model_name: str | None = "glue-sources",
                     alias: str = "current", on_task_done=None) -> dict:
    """Train one source prompt per task in parallel (Ray), save the bank, log it, register it.

    Returns {"bank_path", "tasks", "metrics", "run_id", "experiment_id", "tracking_uri", "model_name",
    "version", "model_uri", "wall_s"}; `model_name=None` skips registration."""
    from crosspt.registry import experiments, run_log, store
    from crosspt.run.trainer import preflight

    t0 = time.time()
    cfg = _pretraining_config(cfg, tasks, data_dir)
    if model_name:
        _check_alias_name(alias)
    names = list(cfg.tasks)
    configs = {t: source_config(cfg, t) for t in names}
    for source_cfg in configs.values():                # unknown task/backbone/missing data: fail now
        preflight(source_cfg)
    uri = store.resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri)
    store.check_reachable(uri)
    exp_name = experiment or (cfg.tracking.experiment if cfg.tracking.experiment != "crosspt" else "crosspt-sources")
    out = _output_folder(cfg, output_dir)
    exp_id = experiments.ensure_experiment(uri, exp_name)
    c = store.client(uri)
    parent = c.create_run(exp_id, run_name=f"sources-{'-'.join(names)}",
                          tags={"crosspt.kind": "source-pretraining", "crosspt.source_tasks": ",".join(names)})
    run_id = parent.info.run_id
    with _marked_failed_on_error(c, run_id):
        run_log.log_params(c, run_id, {**flatten(config_to_dict(cfg)), "sources.tasks": ",".join(names),
                                       "config_hash": config_hash(cfg)})
        c.log_text(run_id, config_to_yaml(cfg), "config.yaml")
        done = _train_sources_on_ray(cfg, configs, out, uri, on_task_done)
        metrics = {t: _source_metrics(t, done[t]["result"]) for t in names}
        bank, bank_path = _save_source_bank(out, [done[t]["prompt"] for t in names], cfg, names, metrics, run_id)
        _log_source_results(c, run_id, done, metrics, bank_path, t0)
        summary = {"bank_path": str(bank_path), "tasks": names, "metrics": metrics, "run_id": run_id,
                   "experiment": exp_name, "experiment_id": exp_id, "tracking_uri": uri,
                   "source_len": int(bank.shape[1]), "dim": int(bank.shape[2]), "backbone": cfg.backbone.name,
                   "model_name": None, "version": None, "model_uri": None}
        if model_name:
            summary.update(_register_source_bank(c, uri, run_id, model_name, alias, cfg, bank))
        summary["wall_s"] = time.time() - t0
        c.set_terminated(run_id, "FINISHED")
        return summary


# ---- reuse: a registered bank of the same spec ------------------------------------------------------
SPEC_TAG = "crosspt.bank_spec"


def bank_spec(cfg: RunConfig) -> str:
    """What a bank is, as a hash: the per-task source configs it is trained from (`source_config`, so
    settings of the pre-training config that source training overrides do not count), in task order."""
    import hashlib

    hashes = [config_hash(source_config(cfg, t)) for t in cfg.tasks]
    return hashlib.sha256(",".join(hashes).encode()).hexdigest()[:16]


def find_source_bank(tracking_uri: str, model_name: str, spec: str):
    """The newest registered version of `model_name` whose bank has spec `spec`, or None."""
    from mlflow.exceptions import MlflowException

    from crosspt.registry import store

    try:
        versions = store.client(tracking_uri).search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return None
    same = [v for v in versions if (v.tags or {}).get(SPEC_TAG) == spec]
    return max(same, key=lambda v: int(v.version)) if same else None


def ensure_source_bank(cfg: RunConfig, *, tracking_uri: str, model_name: str, alias: str,
                       data_dir: str | None = None, output_dir: str | Path | None = None) -> dict:
    """`models:/NAME/VERSION` of a bank trained from `cfg` (its tasks are the source tasks): the
    registered version of the same spec when there is one, else a new one pre-trained now (and `alias`
    moved to it). `{"model_uri", "version", "reused", "spec"}`."""
    spec = bank_spec(_pretraining_config(cfg, None, data_dir))
    found = find_source_bank(tracking_uri, model_name, spec)
    if found is not None:
        return {"model_uri": f"models:/{model_name}/{found.version}", "version": str(found.version),
                "reused": True, "spec": spec}
    done = pretrain_sources(cfg, data_dir=data_dir, output_dir=output_dir, tracking_uri=tracking_uri,
                            model_name=model_name, alias=alias)
    return {"model_uri": f"models:/{model_name}/{done['version']}", "version": done["version"],
            "reused": False, "spec": spec}


def _output_folder(cfg: RunConfig, output_dir: str | Path | None) -> Path:
    """`output_dir` (default `crosspt_runs/<name>-sources-<time>`), absolute and created."""
    out = Path(output_dir or Path("crosspt_runs") / f"{cfg.name}-sources-{time.strftime('%Y%m%d-%H%M%S')}")
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def _marked_failed_on_error(c, run_id: str):
    """An error (or Ctrl-C) inside the block ends MLflow run `run_id` FAILED (KILLED), the error as its
    tag `error`, and goes on."""
    try:
        yield
    except BaseException as e:
        c.set_tag(run_id, "error", f"{type(e).__name__}: {e}"[:5000])
        c.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def _pretraining_config(cfg: RunConfig, tasks: list[str] | None, data_dir: str | None) -> RunConfig:
    """`cfg` with the source tasks and the data folder given as arguments, the folder pinned in."""
    from crosspt.run.trainer import pin_data_dir

    if tasks:
        cfg = cfg.model_copy(update={"tasks": list(tasks)}, deep=True)
        cfg = build_config(config_to_dict(cfg), "config")
    if data_dir:
        cfg = cfg.model_copy(deep=True)
        cfg.data.data_dir = str(Path(data_dir).expanduser().resolve())
    return pin_data_dir(cfg)


def _train_sources_on_ray(cfg: RunConfig, configs: dict[str, RunConfig], out: Path, uri: str,
                          on_task_done) -> dict[str, dict]:
    """One Ray task per source task (`train_source`), side by side as far as the cluster allows;
    `{task: train_source's dict}`, `on_task_done` called with each as it finishes."""
    import ray

    from crosspt.run.trainer import init_ray

    init_ray(runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": uri,
                                       **({ENV_DATA_DIR: cfg.data.data_dir} if cfg.data.data_dir else {})}})
    s = cfg.scaling
    remote = ray.remote(train_source)
    pending = [remote.options(num_cpus=s.cpus_per_worker, num_gpus=s.gpus,
                              name=f"pretrain-source-{t}").remote(source_cfg.model_dump(mode="json"), str(out / t))
               for t, source_cfg in configs.items()]
    done: dict[str, dict] = {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        res = ray.get(ready[0])
        done[res["task"]] = res
        if on_task_done:
            on_task_done(res)
    return done


def _source_metrics(task: str, result: dict) -> dict[str, float]:
    """What the bank records of one source run: best validation and test scores, best epoch, and the
    task's validation and test metrics (`val_<name>`, `test_<name>`)."""
    m = result["metrics"][task]
    return {"best_val_score": result["best_val_score"], "test_score": result["test_score"],
            "best_epoch": result["best_epoch"], **{f"val_{k}": v for k, v in m["val"].items()},
            **{f"test_{k}": v for k, v in m["test"].items()}}


def _save_source_bank(out: Path, prompts: list, cfg: RunConfig, names: list[str], metrics: dict,
                      run_id: str) -> tuple[torch.Tensor, Path]:
    """Stack the source prompts (`[L, d]` each, task order) into the bank `[n, L, d]` and save it as
    `out/sources.safetensors`, read back once to check it; (bank, path)."""
    from crosspt.run.artifacts import load_bank, save_bank

    bank = torch.stack([torch.tensor(np.array(p, dtype=np.float32)) for p in prompts])       # [n, L, d]
    bank_path = save_bank(out / BANK_FILE, bank, backbone=cfg.backbone.name, tasks=names, metrics=metrics,
                          extra={"config_hash": config_hash(cfg), "seed": cfg.seed, "shots": cfg.data.shots,
                                 "train_pool": "source",
                                 "label_semantics": cfg.prompt.label_semantics, "prefix": cfg.prompt.prefix,
                                 "run_id": run_id})
    load_bank(bank_path)                                                        # round-trip check
    return bank, bank_path


def _log_source_results(c, run_id: str, done: dict[str, dict], metrics: dict, bank_path: Path, t0: float) -> None:
    """Log to the pre-training run: each task's metrics and per-epoch curves, results and the bank file."""
    from crosspt.registry import run_log

    flat = {f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items()}
    flat["mean_test_score"] = sum(m["test_score"] for m in metrics.values()) / len(metrics)
    flat["wall_s"] = time.time() - t0
    run_log.log_metrics(c, run_id, flat)
    for t in metrics:
        for h in done[t]["history"]:
            if h["epoch"] < 0:          # the untrained start (eval_initial) has no training loss
                continue
            run_log.log_metrics(c, run_id, {f"{t}_val_score": h["val_score"], f"{t}_train_loss": h["train_loss"]},
                                step=int(h["epoch"]))
        c.log_artifact(run_id, str(Path(done[t]["output_dir"]) / "result.json"), f"results/{t}")
    c.log_artifact(run_id, str(bank_path), "bank")


def _register_source_bank(c, uri: str, run_id: str, model_name: str, alias: str, cfg: RunConfig,
                          bank: torch.Tensor) -> dict:
    """Register the run's bank as a new version of `model_name` with `alias` on it; the summary's
    model_name, version and model_uri."""
    names = list(cfg.tasks)
    mv = register_bank(uri, run_id, model_name, alias=alias,
                       tags={"backbone": cfg.backbone.name, "tasks": ",".join(names),
                             "source_len": str(bank.shape[1]), "dim": str(bank.shape[2]),
                             "config_hash": config_hash(cfg), SPEC_TAG: bank_spec(cfg)},
                       description=f"source prompts for {', '.join(names)} on {cfg.backbone.name}")
    c.set_tag(run_id, "crosspt.registered", f"{model_name}/{mv.version}")
    return {"model_name": model_name, "version": str(mv.version), "model_uri": f"models:/{model_name}@{alias}"}


def format_summary(summary: dict) -> str:
    lines = [f"{'source task':<14}{'best val':>10}{'test':>10}"]
    for t, m in summary["metrics"].items():
        lines.append(f"{t:<14}{m['best_val_score']:>10.4f}{m['test_score']:>10.4f}")
    lines.append(f"bank [{len(summary['tasks'])}, {summary['source_len']}, {summary['dim']}] -> {summary['bank_path']}")
    lines.append(f"MLflow: {summary['tracking_uri']}  experiment '{summary['experiment']}'  run {summary['run_id']}")
    if summary.get("model_uri"):
        lines.append(f"registered {summary['model_name']} version {summary['version']}: {summary['model_uri']}")
    lines.append(f"wall {summary['wall_s']:.1f}s")
    return "\n".join(lines)

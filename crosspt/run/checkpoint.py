"""Run checkpoints: safetensors files plus `meta.json`, written by rank 0, read back on resume.

A checkpoint folder holds

* `state.safetensors`      the current trainable tensors (prompts, router, heads): where training resumes
* `prompts.safetensors`    the best epoch's prompt artifact (`save_prompt_artifact`): what a search keeps
* `optimizer.safetensors`  the optimizer moments (tensors); its scalars and param groups in the metadata
* `meta.json`              the `TrainState` counters and history, the config and its hash
* `result.json`            only in the last epoch's checkpoint: the run's final result

What resume replays and what it retrains: a run resumed from the checkpoint of epoch N gets back its
trainable tensors, the optimizer state and the whole `TrainState` (best prompts, early-stopping counters,
the history with its epoch -1 row), so epochs up to N are neither retrained nor validated again: their
metrics come from the history. Training restarts at epoch N+1, so whatever the lost attempt trained after
N (a part of an epoch, or up to `train.checkpoint_every - 1` whole epochs) is trained again, on the same
batches (`multitask_batches` is seeded by seed and epoch), with the warm-up and temperature schedules
continuing from `global_step`; the torch RNG is seeded from `cfg.seed` again, not restored. A checkpoint
is accepted only by the config that wrote it (same `config_hash`).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from crosspt.config.schema import RunConfig
from crosspt.errors import ArtifactError
from crosspt.run.artifacts import load_tensors, save_prompt_artifact, save_tensors
from crosspt.run.model import CrossPTModel
from crosspt.run.state import TrainState

STATE_FILE = "state.safetensors"        # current trainable state (resume)
BEST_FILE = "prompts.safetensors"       # best epoch's prompts, the artifact a search keeps
OPTIM_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
RESULT_FILE = "result.json"
_COUNTERS = ("epoch", "global_step", "best_score", "best_epoch", "bad_epochs", "history")   # meta.json keys
_ARTIFACT_ONLY = ("composed.", "router_weights")   # what save_prompt_artifact adds to the learned tensors


def write_checkpoint(model: CrossPTModel, opt: torch.optim.Optimizer, state: TrainState, cfg: RunConfig,
                     config_hash: str, result: dict | None = None) -> Path:
    """A fresh temporary folder holding the checkpoint of `state.epoch` (the caller removes it once
    reported); `result`: the run's final result, for the last epoch's checkpoint."""
    d = Path(tempfile.mkdtemp(prefix="crosspt_ckpt_"))
    current = model.trainable_state()
    save_tensors(d / STATE_FILE, current, {"config_hash": config_hash, "epoch": state.epoch})
    _save_best_prompts(d / BEST_FILE, model, state, cfg, config_hash, current)
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    save_tensors(d / OPTIM_FILE, opt_tensors, opt_meta)
    counters = {k: getattr(state, k) for k in _COUNTERS}
    meta = {"config_hash": config_hash, **counters, "config": cfg.model_dump(mode="json")}
    (d / META_FILE).write_text(json.dumps(meta))
    if result is not None:
        (d / RESULT_FILE).write_text(json.dumps(result))
    return d


def _save_best_prompts(path: Path, model: CrossPTModel, state: TrainState, cfg: RunConfig, config_hash: str,
                       current: dict[str, torch.Tensor]) -> None:
    # the prompt artifact is written from a model (it composes every task's evaluation prompt), so the
    # best state goes into the model for the write and the current one comes back after it
    if state.best_state is not None:
        model.load_trainable_state(state.best_state)
    save_prompt_artifact(path, model, config_hash=config_hash, backbone=cfg.backbone.name,
                         extra={"epoch": state.best_epoch, "best_val_score": state.best_score})
    model.load_trainable_state(current)


def read_checkpoint(path: Path, model: CrossPTModel, opt: torch.optim.Optimizer, config_hash: str) -> TrainState:
    """Load checkpoint `path` into `model` and `opt`; returns the `TrainState` it was written with.
    Refuses (ArtifactError) a checkpoint written by another config."""
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("config_hash") != config_hash:
        raise ArtifactError(f"checkpoint {path} was written by config {meta.get('config_hash')}, "
                            f"this run is {config_hash}")
    current, _ = load_tensors(path / STATE_FILE)
    model.load_trainable_state(current)
    best, _ = load_tensors(path / BEST_FILE)
    opt_tensors, opt_meta = load_tensors(path / OPTIM_FILE)
    opt.load_state_dict(_unflatten_optimizer(opt_tensors, opt_meta))
    return TrainState(**{k: meta[k] for k in _COUNTERS},
                      best_state={k: v for k, v in best.items() if not k.startswith(_ARTIFACT_ONLY)})


def read_result(path: Path) -> dict | None:
    """The final result a checkpoint carries (only the checkpoint of a run's last epoch has one)."""
    f = path / RESULT_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """`opt.state_dict()` as safetensors can hold it: tensors keyed `"<param id>.<name>"`, the rest as
    JSON metadata (`scalars` keyed the same way, `param_groups`)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    """The inverse of `_flatten_optimizer`: an `opt.state_dict()` to load."""
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}

"""The per-worker CrossPT training loop, the same code in a Ray Train worker and in-process.

What the loop needs from its host is small (rank, world size, where to put a checkpoint, how to report
an epoch), so it takes a `Session`: `RaySession` inside a Ray Train worker, `LocalSession` when a
one-worker run skips the worker group. Validation and test metrics are computed over the WHOLE split:
each rank predicts its shard and the predictions are gathered before scoring.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from crosspt.run.artifacts import load_bank, load_tensors, save_prompt_artifact, save_tensors
from crosspt.config.schema import RunConfig, config_hash
from crosspt.tasks.data import eval_batches, make_splits, multitask_batches
from crosspt.tasks.metrics import compute_metrics, primary_metric
from crosspt.run.model import CrossPTModel, build_model, count_parameters
from crosspt.tasks.specs import register_task_file, resolve_tasks

STATE_FILE = "state.safetensors"        # current trainable state (resume)
BEST_FILE = "prompts.safetensors"       # best epoch's prompts, the artifact a search keeps
OPTIM_FILE = "optimizer.safetensors"
META_FILE = "meta.json"


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite: the trial is stopped at once."""


# ---- fault injection (a testing hook) ------------------------------------------------------------
FAULT_ENV = "CROSSPT_FAULT"


class InjectedFault(RuntimeError):
    """Raised by the `CROSSPT_FAULT` testing hook (`raise@...`)."""


def parse_faults(spec: str | None) -> list[dict]:
    """`CROSSPT_FAULT`: `KIND@epoch=N[,rank=R][,run=SUBSTR][,once=PATH]`, several joined by `;`.

    KIND: `raise` (InjectedFault at the start of epoch N), `nan` (the first loss of epoch N becomes NaN,
    so the real divergence check stops the run), `exit` (the process dies at the start of epoch N, like a
    killed worker). `rank` limits it to one Ray Train rank, `run` to runs whose config name contains
    SUBSTR (search trials are named `<space>-trialNNN`), `once` fires only while PATH does not exist and
    then creates it (a transient fault: a retry succeeds). For tests and drills only."""
    faults = []
    for part in (spec or "").split(";"):
        part = part.strip()
        if not part:
            continue
        kind, _, conds = part.partition("@")
        if kind not in ("raise", "nan", "exit"):
            raise ValueError(f"{FAULT_ENV}: unknown fault kind {kind!r} in {part!r} (raise, nan or exit)")
        f: dict[str, Any] = {"kind": kind, "epoch": 0}
        for cond in filter(None, (c.strip() for c in conds.split(","))):
            key, _, value = cond.partition("=")
            if key in ("epoch", "rank"):
                f[key] = int(value)
            elif key in ("run", "once"):
                f[key] = value
            else:
                raise ValueError(f"{FAULT_ENV}: unknown condition {key!r} in {part!r}")
        faults.append(f)
    return faults


def _fault(faults: list[dict], kind: str, cfg: RunConfig, session: "Session", epoch: int) -> bool:
    for f in faults:
        if f["kind"] != kind or f["epoch"] != epoch or f.get("rank", session.rank) != session.rank:
            continue
        if f.get("run") and f["run"] not in cfg.name:
            continue
        if f.get("once"):
            marker = Path(f["once"])
            if marker.exists():
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{cfg.name} epoch {epoch} rank {session.rank}\n")
        return True
    return False


def _inject_at_epoch_start(faults: list[dict], cfg: RunConfig, session: "Session", epoch: int) -> None:
    if _fault(faults, "raise", cfg, session, epoch):
        raise InjectedFault(f"injected fault ({FAULT_ENV}) at epoch {epoch} of {cfg.name}")
    if _fault(faults, "exit", cfg, session, epoch):
        os._exit(17)


# ---- sessions ---------------------------------------------------------------------------------------
class Session:
    rank = 0
    world_size = 1

    def device(self) -> torch.device:
        return torch.device("cpu")

    def latest_checkpoint(self) -> Path | None:
        return None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        raise NotImplementedError

    def wrap(self, model: CrossPTModel):
        return model


class LocalSession(Session):
    """One process, no worker group: checkpoints go to `output_dir/checkpoints/epoch_N`."""

    def __init__(self, output_dir: str | Path, use_gpu: bool = False,
                 on_report: Callable[[dict, Path | None], None] | None = None, keep: int = 2,
                 resume_from: str | Path | None = None):
        self.output_dir = Path(output_dir)
        self.use_gpu = use_gpu and torch.cuda.is_available()
        self.on_report = on_report
        self.keep = keep
        self.resume_from = Path(resume_from) if resume_from else None
        self.reports: list[dict] = []
        self.checkpoints: list[Path] = []

    def device(self):
        return torch.device("cuda") if self.use_gpu else torch.device("cpu")

    def latest_checkpoint(self):
        return self.resume_from

    def report(self, metrics, checkpoint_dir):
        kept = None
        if checkpoint_dir is not None:
            kept = self.output_dir / "checkpoints" / f"epoch_{metrics['epoch']:04d}"
            if kept.exists():
                shutil.rmtree(kept)
            shutil.copytree(checkpoint_dir, kept)
            self.checkpoints.append(kept)
            for old in self.checkpoints[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            self.checkpoints = self.checkpoints[-self.keep:]
        self.reports.append(dict(metrics))
        if self.on_report:
            self.on_report(metrics, kept)


class RaySession(Session):
    """Inside a Ray Train worker: rank/world from the train context, DDP via prepare_model."""

    def __init__(self, resume_from: str | None = None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self._resume_from = resume_from

    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def latest_checkpoint(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()      # set when Train restores this run after a failure
        if ckpt is not None:
            return Path(ckpt.to_directory())
        return Path(self._resume_from) if self._resume_from else None

    def report(self, metrics, checkpoint_dir):
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir and self.rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt,
                         checkpoint_dir_name=f"epoch_{metrics['epoch']:04d}" if ckpt else None)

    def wrap(self, model):
        if self.world_size == 1:
            return model
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)


# ---- helpers -------------------------------------------------------------------------------------
def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _gather(obj: Any, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _autocast(device: torch.device, dtype_cfg: str):
    if device.type == "cuda" and dtype_cfg in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: CrossPTModel, examples_by_task: dict, session: Session, batch_size: int,
             dtype_cfg: str = "auto") -> dict[str, dict[str, float]]:
    """Full-split metrics per task: every rank predicts its shard, predictions are gathered."""
    model.eval()
    device = session.device()
    results = {}
    for task in model.tasks:
        examples = examples_by_task[task.name]
        mine: list[tuple[str, float, float]] = []
        for batch_examples in eval_batches(examples, batch_size, shard=(session.rank, session.world_size)):
            batch = _to_device(model.backbone.collate(batch_examples, train=False), device)
            with _autocast(device, dtype_cfg):
                preds = model.predict(batch)
            mine += [(e.uid, float(p), float(e.label)) for e, p in zip(batch_examples, preds.float().cpu())]
        merged = {uid: (p, y) for part in _gather(mine, session.world_size) for uid, p, y in part}
        preds = [merged[u][0] for u in sorted(merged)]
        labels = [merged[u][1] for u in sorted(merged)]
        if not task.is_regression:
            preds = [int(p) for p in preds]
            labels = [int(y) for y in labels]
        results[task.name] = compute_metrics(task, preds, labels)
    model.train()
    return results


def score_of(metrics: dict[str, dict[str, float]], tasks) -> float:
    """Mean over tasks of each task's primary metric: the number that ranks epochs and trials."""
    return float(sum(metrics[t.name][primary_metric(t)] for t in tasks) / len(tasks))


def flat_metrics(prefix: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{prefix}_{task}_{k}": v for task, m in metrics.items() for k, v in m.items()}


def prepare_data(cfg: RunConfig):
    """Task specs and k-shot splits — deterministic from cfg.seed, identical on every worker."""
    for f in cfg.data.task_files:
        register_task_file(f)
    tasks = resolve_tasks(cfg.tasks)
    data_dir = cfg.data.data_dir or os.environ.get("CROSSPT_DATA_DIR") or None
    splits = {t.name: make_splits(t, data_dir, shots=cfg.data.shots, per=cfg.data.shots_per,
                                  val_shots=cfg.data.val_shots, seed=cfg.seed, max_test=cfg.data.max_test)
              for t in tasks}
    return tasks, splits


def load_source_bank(cfg: RunConfig, dim: int, tasks) -> torch.Tensor | None:
    """The source prompts this run composes from (selected from the bank by the configured rule)."""
    if cfg.prompt.n_sources == 0:
        return None
    if not cfg.prompt.source_bank:
        return None                      # a random (untrained) bank: ablations and tests
    from crosspt.run.artifacts import select_sources

    bank, meta = load_bank(cfg.prompt.source_bank, backbone=cfg.backbone.name, dim=dim,
                           source_len=cfg.prompt.source_len)
    chosen, _ = select_sources(bank, meta, cfg.prompt.n_sources, rule=cfg.prompt.source_selection,
                               target_tasks=[t.name for t in tasks])
    return chosen


# ---- the loop ------------------------------------------------------------------------------------
def run_loop(cfg: RunConfig, session: Session, model: CrossPTModel | None = None,
             fault: str | None = None, data: tuple | None = None) -> dict:
    """Train, validate each epoch, checkpoint, stop early; returns the final result dict.

    `fault`: a `CROSSPT_FAULT` spec (testing hook, see `parse_faults`); default: that env var.
    `data`: `(tasks, splits)` exactly as `prepare_data(cfg)` returns them, when the caller already drew
    them (the benchmark reuses one draw across methods); default: drawn here."""
    t0 = time.time()
    faults = parse_faults(fault if fault is not None else os.environ.get(FAULT_ENV))
    torch.manual_seed(cfg.seed)
    tasks, splits = data if data is not None else prepare_data(cfg)
    device = session.device()
    if model is None:
        from crosspt.backbones.loader import load_backbone

        b = cfg.backbone
        backbone = load_backbone(b.name, tasks, family=b.family, label_semantics=cfg.prompt.label_semantics,
                                 with_prefix=cfg.prompt.prefix, max_length=b.max_length,
                                 pair_encoding=b.pair_encoding)
        bank = load_source_bank(cfg, backbone.embed_dim, tasks)
        model = build_model(cfg, tasks, bank=bank, backbone=backbone)
    model.to(device)
    model.train()
    trainable, total = count_parameters(model)
    ddp = session.wrap(model)
    o = cfg.optim
    opt = torch.optim.AdamW(model.param_groups(o.prompt_lr, o.router_lr, o.head_lr, o.weight_decay))
    base_lrs = [g["lr"] for g in opt.param_groups]
    chash = config_hash(cfg)

    start_epoch, global_step, best, best_epoch, bad_epochs = 0, 0, -math.inf, -1, 0
    history: list[dict] = []
    best_state = None
    resume = session.latest_checkpoint()
    if resume is not None:
        meta = json.loads((resume / META_FILE).read_text())
        if meta.get("config_hash") != chash:
            from crosspt.errors import ArtifactError

            raise ArtifactError(f"checkpoint {resume} was written by config {meta.get('config_hash')}, "
                                f"this run is {chash}")
        state, _ = load_tensors(resume / STATE_FILE)
        model.load_trainable_state(state)
        best_state, _ = load_tensors(resume / BEST_FILE)
        best_state = {k: v for k, v in best_state.items() if not k.startswith(("composed.", "router_weights"))}
        opt_tensors, opt_meta = load_tensors(resume / OPTIM_FILE)
        opt.load_state_dict(_unflatten_optimizer(opt_tensors, opt_meta, opt))
        start_epoch, global_step = meta["epoch"] + 1, meta["global_step"]
        best, best_epoch, bad_epochs, history = meta["best_score"], meta["best_epoch"], meta["bad_epochs"], meta["history"]
        model.prompt.set_step(global_step)

    per_worker_bs = max(1, cfg.train.batch_size // session.world_size)
    train_by_task = {t: s["train"] for t, s in splits.items()}
    val_by_task = {t: s["val"] for t, s in splits.items()}
    test_by_task = {t: s["test"] for t, s in splits.items()}
    last_epoch = start_epoch - 1
    if resume is None and cfg.train.eval_initial:
        # the untrained prompt is a candidate too: a run never returns a state worse on validation
        # than where it started (few-shot training can hurt a strong zero-shot prior)
        initial = evaluate(model, val_by_task, session, cfg.train.eval_batch_size, cfg.backbone.dtype)
        best, best_state, best_epoch = score_of(initial, tasks), model.trainable_state(), -1
        history.append({"epoch": -1, "val_score": best, **flat_metrics("val", initial)})
    for epoch in range(start_epoch, cfg.train.epochs):
        te = time.time()
        losses = []
        if faults:
            _inject_at_epoch_start(faults, cfg, session, epoch)
        nan_now = bool(faults) and _fault(faults, "nan", cfg, session, epoch)
        for batch_examples in multitask_batches(train_by_task, per_worker_bs, seed=cfg.seed, epoch=epoch,
                                                shard=(session.rank, session.world_size)):
            batch = _to_device(model.backbone.collate(batch_examples, train=True), device)
            model.prompt.set_step(global_step)
            if o.warmup_steps:
                scale = min(1.0, (global_step + 1) / o.warmup_steps)
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * scale
            with _autocast(device, cfg.backbone.dtype):
                loss = ddp(batch)
            if nan_now:
                loss, nan_now = loss * float("nan"), False
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {float(loss)} at epoch {epoch}, step {global_step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], o.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            global_step += 1
        model.prompt.set_step(global_step)
        val = evaluate(model, val_by_task, session, cfg.train.eval_batch_size, cfg.backbone.dtype)
        score = score_of(val, tasks)
        if score > best:
            best, best_epoch, bad_epochs = score, epoch, 0
            best_state = model.trainable_state()
        else:
            bad_epochs += 1
        stop = (epoch == cfg.train.epochs - 1) or (cfg.train.patience is not None and bad_epochs >= cfg.train.patience)
        train_loss = sum(_gather(sum(losses) / max(1, len(losses)), session.world_size)) / session.world_size
        metrics = {"epoch": epoch, "val_score": score, "best_val_score": best, "best_epoch": best_epoch,
                   "train_loss": train_loss, "temperature": model.prompt.temperature,
                   "epoch_s": time.time() - te, "global_step": global_step, "final_epoch": stop,
                   "trainable_params": trainable, "total_params": total, **flat_metrics("val", val)}
        history.append({k: v for k, v in metrics.items() if not isinstance(v, bool)})
        result = None
        if stop:
            result = _final_result(model, best_state, test_by_task, val, session, cfg, tasks, history,
                                   best, best_epoch, trainable, total, t0, chash)
            metrics.update(flat_metrics("test", result["metrics_test"]))
            metrics["test_score"] = result["test_score"]
        ckpt_dir = _write_checkpoint(model, opt, best_state, cfg, chash, epoch, global_step, best, best_epoch,
                                     bad_epochs, history, session, result)
        session.report(metrics, ckpt_dir)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        last_epoch = epoch
        if stop:
            return result
    # resumed after the final epoch: nothing left to train, evaluate the best state
    return _final_result(model, best_state, test_by_task, None, session, cfg, tasks, history, best,
                         best_epoch, trainable, total, t0, chash) if last_epoch >= 0 or resume else {}


def _final_result(model, best_state, test_by_task, val, session, cfg, tasks, history, best, best_epoch,
                  trainable, total, t0, chash) -> dict:
    if best_state is not None:
        model.load_trainable_state(best_state)
    digests = _gather(state_digest(model), session.world_size)   # DDP must leave every rank identical
    test = evaluate(model, test_by_task, session, cfg.train.eval_batch_size, cfg.backbone.dtype)
    at_best = next((h for h in history if h["epoch"] == best_epoch), None)
    val_best = {t.name: {k[len(f"val_{t.name}_"):]: v for k, v in at_best.items() if k.startswith(f"val_{t.name}_")}
                for t in tasks} if at_best else (val or {})
    return {
        "metrics": {t.name: {"val": val_best.get(t.name, {}), "test": test[t.name]} for t in tasks},
        "metrics_test": test, "test_score": score_of(test, tasks), "best_val_score": best,
        "best_epoch": best_epoch, "epochs_run": sum(h["epoch"] >= 0 for h in history), "trainable_params": trainable,
        "total_params": total, "wall_s": time.time() - t0, "config_hash": chash, "seed": cfg.seed,
        "router_weights": model.prompt.task_weights().tolist(), "history": history,
        "world_size": session.world_size, "rank_state_digests": digests,
    }


def state_digest(model: CrossPTModel) -> str:
    """sha256 of every learned tensor (bit-exact comparison of ranks)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.trainable_state().items()):
        h.update(k.encode())
        h.update(v.float().numpy().tobytes())
    return h.hexdigest()[:16]


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
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


def _unflatten_optimizer(tensors: dict, meta: dict, opt) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_checkpoint(model, opt, best_state, cfg, chash, epoch, global_step, best, best_epoch, bad_epochs,
                      history, session, result) -> Path | None:
    if session.rank != 0 or (epoch + 1) % cfg.train.checkpoint_every and result is None:
        return None
    d = Path(tempfile.mkdtemp(prefix="crosspt_ckpt_"))
    save_tensors(d / STATE_FILE, model.trainable_state(), {"config_hash": chash, "epoch": epoch})
    current = model.trainable_state()
    if best_state is not None:
        model.load_trainable_state(best_state)
    save_prompt_artifact(d / BEST_FILE, model, config_hash=chash, backbone=cfg.backbone.name,
                         extra={"epoch": best_epoch, "best_val_score": best})
    model.load_trainable_state(current)
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    save_tensors(d / OPTIM_FILE, opt_tensors, opt_meta)
    meta = {"config_hash": chash, "epoch": epoch, "global_step": global_step, "best_score": best,
            "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": history,
            "config": cfg.model_dump(mode="json")}
    (d / META_FILE).write_text(json.dumps(meta))
    if result is not None:
        (d / "result.json").write_text(json.dumps(result))
    return d


def ray_worker_loop(loop_config: dict) -> None:
    """Entry point of each Ray Train worker (TorchTrainer's train_loop_per_worker)."""
    cfg = RunConfig.model_validate(loop_config["config"])
    session = RaySession(resume_from=loop_config.get("resume_from"))
    run_loop(cfg, session, fault=loop_config.get("fault"))

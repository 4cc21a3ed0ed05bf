"""The per-worker CrossPT training loop, the same code in a Ray Train worker and in-process.

`run_loop` in steps:

1. `_set_up`: the k-shot splits, the model, the optimizer: what stays fixed for the run (`_Run`);
2. `_start`: a fresh `TrainState` (the untrained prompt validated first, as epoch -1) or the one a
   checkpoint holds (`crosspt.run.checkpoint`: what resume replays and what it retrains);
3. `_run_epoch` per epoch: `_train_epoch`, validation, early-stopping bookkeeping, the epoch's metrics,
   on the last epoch `_final_result` (test metrics of the best state), `_checkpoint_and_report`.

What the loop needs from its host is small (rank, world size, where a checkpoint goes, how an epoch is
reported): a `Session` (`crosspt.run.session`). Validation and test metrics cover the WHOLE split
(`crosspt.run.evaluation`). Everything that changes from epoch to epoch is in the one `TrainState`. What
a run reads (`crosspt.run.inputs`), the frozen backbone a process keeps (`crosspt.run.backbone_cache`) and
the test-only drills (one `Drill` the loop calls at two points: `crosspt.run.faults`) live beside it.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Generator
from dataclasses import dataclass

import torch

from crosspt.backbones.base import trainable_and_total
from crosspt.config.schema import RunConfig, config_hash
from crosspt.run import backbone_cache, inputs
from crosspt.run.checkpoint import BEST_FILE, read_checkpoint, read_result, write_checkpoint
from crosspt.run.evaluation import evaluate, flat_metrics, score_of, to_device
from crosspt.run.faults import Drill, drill_for
from crosspt.run.model import CrossPTModel, build_model
from crosspt.run.precision import autocast
from crosspt.run.session import LocalSession, RaySession, Session
from crosspt.run.state import TrainState
from crosspt.tasks.data import multitask_batches
from crosspt.tasks.specs import TaskSpec

# the run layer's face: other layers, the benchmark and the tests import these from here
__all__ = ["BEST_FILE", "LocalSession", "RaySession", "Session", "TrainState", "TrainingDiverged", "evaluate",
           "epochs", "flat_metrics", "ray_worker_loop", "run_loop", "score_of", "state_digest"]


INITIAL_PREFIX = "initial."       # epoch 0's report carries the untrained evaluation under these keys


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite: the trial is stopped at once."""


# ---- the model -----------------------------------------------------------------------------------
def _build_model(cfg: RunConfig, tasks: list[TaskSpec], device: torch.device) -> CrossPTModel:
    backbone = backbone_cache.take(cfg, tasks, device)
    dim = backbone.embed_dim                     # the bank's width is the backbone's
    try:
        return build_model(cfg, tasks, bank=inputs.load_source_bank(cfg, dim, tasks), backbone=backbone,
                           own_sources=inputs.load_own_sources(cfg, dim, tasks))
    except BaseException:
        backbone_cache.release(backbone)
        raise


# ---- the run ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Run:
    """What stays fixed for the whole run, built once by `_set_up`."""

    cfg: RunConfig
    session: Session
    device: torch.device
    model: CrossPTModel
    ddp: torch.nn.Module               # `model`, wrapped for DDP when the world is larger than one
    opt: torch.optim.Optimizer
    base_lrs: list[float]              # each param group's configured lr (warm-up scales from these)
    tasks: list[TaskSpec]
    splits: dict                       # `inputs.prepare_data`'s `{task: {"train"|"val"|"test": [Example]}}`
    drill: Drill                       # the `CROSSPT_FAULT` testing hook (`crosspt.run.faults`)
    config_hash: str
    params: dict[str, int]             # trainable_params, total_params (reported every epoch)
    t0: float

    def split(self, name: str) -> dict:
        return {t: s[name] for t, s in self.splits.items()}


def run_loop(cfg: RunConfig, session: Session, model: CrossPTModel | None = None,
             splits: dict | None = None) -> dict:
    """Train, validate each epoch, checkpoint, stop early; returns the final result dict.

    `model`: a built model to train (default: built from cfg). `splits`: precomputed k-shot splits
    (`inputs.prepare_data`)."""
    steps = epochs(cfg, session, model, splits)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def epochs(cfg: RunConfig, session: Session, model: CrossPTModel | None = None,
           splits: dict | None = None) -> Generator[int, None, dict]:
    """`run_loop` one epoch at a time: each `next()` trains, validates and reports one epoch and yields its
    number; the generator returns the final result (on the last epoch, or when early stopping ends the
    run). Callers that run several loops side by side step them in lockstep (`crosspt.search.repeats`).

    Resume: a checkpoint of a run that has ended (its final epoch, or early stopping: the checkpoint that
    carries `result.json`) gives back that result without training or evaluating anything; any other
    checkpoint continues at the epoch after it (`crosspt.run.checkpoint` says what is replayed)."""
    run = _set_up(cfg, session, model, splits)
    try:
        state, resumed, ended = _start(run)
        if ended is not None:
            return ended
        for epoch in range(state.epoch + 1, cfg.train.epochs):
            result = _run_epoch(run, state, epoch)
            if result is not None:
                return result
            yield epoch
        # resumed after the final epoch: nothing left to train, evaluate the best state
        return _final_result(run, state, None) if resumed else {}
    finally:                 # ended, failed, or abandoned by its caller (a pruned trial): the backbone is free
        backbone_cache.release(run.model.backbone)


def _set_up(cfg: RunConfig, session: Session, model: CrossPTModel | None, splits: dict | None) -> _Run:
    t0 = time.time()
    # when the run's phases happened (`Session.clock`): what a trial pays besides training
    session.clock = {"loop_start": t0, "loop_start_cpu": time.process_time(), "eval_s": 0.0, "eval_cpu_s": 0.0}
    torch.manual_seed(cfg.seed)
    tasks, splits = inputs.prepare_data(cfg, splits=splits)
    device = session.device()
    if model is None:
        model = _build_model(cfg, tasks, device)
    try:
        model.to(device)
        model.train()
        trainable, total = trainable_and_total(model)
        ddp = session.wrap(model)
        o = cfg.optim
        opt = torch.optim.AdamW(model.param_groups(o.prompt_lr, o.router_lr, o.head_lr, o.weight_decay, o.source_lr))
        _plan_temperature(model, cfg, splits, session)
    except BaseException:
        backbone_cache.release(model.backbone)
        raise
    return _Run(cfg=cfg, session=session, device=device, model=model, ddp=ddp, opt=opt,
                base_lrs=[g["lr"] for g in opt.param_groups], tasks=tasks, splits=splits,
                drill=drill_for(cfg.name, session.rank),
                config_hash=config_hash(cfg), params={"trainable_params": trainable, "total_params": total}, t0=t0)


def _plan_temperature(model: CrossPTModel, cfg: RunConfig, splits: dict, session: Session) -> None:
    """Tell the prompt how many steps the run plans (epochs x this rank's batches per epoch, the same
    on every rank), so a progress schedule reaches its floor on the last step. The benchmark's prompt
    modules (crosspt.bench.harness) have no temperature and no `plan_steps`."""
    plan = getattr(model.prompt, "plan_steps", None)
    if plan is None:
        return
    per_worker_bs = max(1, cfg.train.batch_size // session.world_size)
    batches = multitask_batches({t: s["train"] for t, s in splits.items()}, per_worker_bs, seed=cfg.seed,
                                epoch=0, shard=(session.rank, session.world_size))
    plan(cfg.train.epochs * len(batches))


def _start(run: _Run) -> tuple[TrainState, bool, dict | None]:
    """(the state to train on from, whether it was resumed from a checkpoint, the final result when that
    checkpoint is of a run that has ended)."""
    checkpoint = run.session.latest_checkpoint()
    if checkpoint is not None:
        ended = read_result(checkpoint)
        state = read_checkpoint(checkpoint, run.model, run.opt, run.config_hash)
        run.model.prompt.set_step(state.global_step)
        patience = run.cfg.train.patience
        if ended is None and patience is not None and state.bad_epochs >= patience:
            ended = _final_result(run, state, None)     # stopped early before it wrote its result
        return state, True, ended
    state = TrainState()
    if run.cfg.train.eval_initial:
        # the untrained prompt is a candidate too: a run never returns a state worse on validation
        # than where it started (few-shot training can hurt a strong zero-shot prior)
        initial = _evaluate(run, "val")
        state.best_score, state.best_state = score_of(initial, run.tasks), run.model.trainable_state()
        state.history.append({"epoch": -1, "val_score": state.best_score, **flat_metrics("val", initial)})
    return state, False, None


def _evaluate(run: _Run, split: str, with_generation: bool = False) -> dict[str, dict[str, float]]:
    started, started_cpu = time.time(), time.process_time()
    try:
        return evaluate(run.model, run.split(split), run.session, run.cfg.train.eval_batch_size,
                        run.cfg.backbone.dtype, with_generation=with_generation)
    finally:
        run.session.clock["eval_s"] += time.time() - started
        run.session.clock["eval_cpu_s"] += time.process_time() - started_cpu


def _run_epoch(run: _Run, state: TrainState, epoch: int) -> dict | None:
    """Train, validate, checkpoint and report epoch `epoch`; the run's final result when it is the last."""
    started = time.time()
    loss = _train_epoch(run, state, epoch)
    val = _evaluate(run, "val")
    score = score_of(val, run.tasks)
    state.record(epoch, score, run.model.trainable_state)
    t = run.cfg.train
    stop = epoch == t.epochs - 1 or (t.patience is not None and state.bad_epochs >= t.patience)
    metrics = {"epoch": epoch, "val_score": score, "best_val_score": state.best_score,
               "best_epoch": state.best_epoch, "train_loss": _mean_over_ranks(run.session, loss),
               "temperature": run.model.prompt.temperature, "epoch_s": time.time() - started,
               "global_step": state.global_step, "final_epoch": stop, **run.params, **flat_metrics("val", val)}
    state.history.append({k: v for k, v in metrics.items() if not isinstance(v, bool)})
    if epoch == 0 and state.history[0]["epoch"] == -1:
        # the untrained evaluation, which can be the best epoch (-1): reported with epoch 0 under
        # `initial.` so that trackers log it at step -1 (`crosspt.registry.trial_logger.TrialLogger`) and no
        # best_val_score stands above every logged val_score
        metrics.update({f"{INITIAL_PREFIX}{k}": v for k, v in state.history[0].items() if k != "epoch"})
    result = _final_result(run, state, val) if stop else None
    if result is not None:
        metrics.update(flat_metrics("test", result["metrics_test"]))
        metrics["test_score"] = result["test_score"]
        if "metrics_assess" in result:
            metrics.update(flat_metrics(ASSESS, result["metrics_assess"]))
            metrics[ASSESS_SCORE] = result[ASSESS_SCORE]
    _checkpoint_and_report(run, state, metrics, result)
    return result


def _train_epoch(run: _Run, state: TrainState, epoch: int) -> float:
    """One pass over this rank's shard of the training batches; returns its mean loss.

    The steps never wait for the device: the loss and its finiteness stay there (`_LossTally`) and are read
    every `DIVERGENCE_CHECK_STEPS` steps and at the end of the epoch, so a diverged run stops at most that
    many steps late, with the first non-finite loss and its step in the message."""
    cfg, model, session = run.cfg, run.model, run.session
    run.drill.epoch_start(epoch)
    per_worker_bs = max(1, cfg.train.batch_size // session.world_size)
    tally = _LossTally(run.device)
    for batch_examples in multitask_batches(run.split("train"), per_worker_bs, seed=cfg.seed, epoch=epoch,
                                            shard=(session.rank, session.world_size)):
        # collate works on the host (token ids cached per example by the backbone): no device involved
        _train_step(run, state, model.backbone.collate(batch_examples, train=True), tally)
        if tally.steps % DIVERGENCE_CHECK_STEPS == 0:
            tally.check(epoch)
    mean = tally.finish(epoch)
    run.session.clock.update(last_step=time.time(), last_step_cpu=time.process_time())
    model.prompt.set_step(state.global_step)
    return mean


def _train_step(run: _Run, state: TrainState, batch: dict, tally: _LossTally) -> None:
    """One optimizer step on a collated batch (tensors `[B, ...]` on the host) without a host sync: the
    batch goes up through pinned memory without blocking, the temperature is a Python float (the prompt's
    host copy of the step), and the loss is added to `tally` on the device."""
    clock = run.session.clock
    if "first_step" not in clock:
        clock.update(first_step=time.time(), first_step_cpu=time.process_time())
    batch = to_device(batch, run.device)
    run.model.prompt.set_step(state.global_step)
    _warm_up(run, state.global_step)
    with autocast(run.device, run.cfg.backbone.dtype):
        loss = run.ddp(batch)
    loss = run.drill.loss(loss)                   # the `nan` drill poisons the step as a real divergence would
    tally.add(loss, state.global_step)
    _optimizer_step(run, loss)
    state.global_step += 1


DIVERGENCE_CHECK_STEPS = 16      # steps between the host's reads of the divergence flag


class _LossTally:
    """An epoch's training loss kept on the device: the sum (float64, so that the mean is the one summing
    the Python floats gave, to the bit), and the first non-finite loss with its step (-1: none yet).
    `check` and `finish` are its only host reads."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), device=device)
        self.steps = 0

    def add(self, loss: torch.Tensor, step: int) -> None:
        value = loss.detach().float()
        self.sum += value.double()
        first = ~torch.isfinite(value) & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, value, self.bad_loss)
        self.steps += 1

    def check(self, epoch: int) -> None:
        """TrainingDiverged naming the first non-finite loss of the epoch so far, if there was one."""
        self._raise_if_bad(epoch, int(self.bad_step))

    def finish(self, epoch: int) -> float:
        """The epoch's mean loss, after the last `check` (one host read for both)."""
        bad_step, total = torch.stack([self.bad_step.double(), self.sum]).tolist()
        self._raise_if_bad(epoch, int(bad_step))
        return total / max(1, self.steps)

    def _raise_if_bad(self, epoch: int, bad_step: int) -> None:
        if bad_step >= 0:
            raise TrainingDiverged(f"loss became {float(self.bad_loss)} at epoch {epoch}, step {bad_step}")


def _warm_up(run: _Run, step: int) -> None:
    """Linear learning-rate warm-up over the first `optim.warmup_steps` steps (none when 0)."""
    n = run.cfg.optim.warmup_steps
    if n:
        scale = min(1.0, (step + 1) / n)
        for g, lr in zip(run.opt.param_groups, run.base_lrs):
            g["lr"] = lr * scale


def _optimizer_step(run: _Run, loss: torch.Tensor) -> None:
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in run.opt.param_groups for p in g["params"]],
                                       run.cfg.optim.grad_clip)
    run.opt.step()


def _mean_over_ranks(session: Session, value: float) -> float:
    return sum(session.gather(value)) / session.world_size


def _final_result(run: _Run, state: TrainState, val: dict | None) -> dict:
    """The run's result: test metrics of the best state (loaded into the model), validation metrics of
    the best epoch (from the history; `val`, the last epoch's, when the best epoch has no row)."""
    model, tasks = run.model, run.tasks
    if state.best_state is not None:
        model.load_trainable_state(state.best_state)
    digests = run.session.gather(state_digest(model))    # DDP must leave every rank identical
    # generating backbones: the generation-based metrics beside the ranked ones (test split, best state), from
    # one pass where the backbone shares it (the decoder); opt-in for search trials (train.generated_metrics)
    test = _evaluate(run, "test", with_generation=model.generates and run.cfg.train.generated_metrics)
    assess = _assess(run)
    at_best = next((h for h in state.history if h["epoch"] == state.best_epoch), None)
    val_best = {t.name: {k[len(f"val_{t.name}_"):]: v for k, v in at_best.items() if k.startswith(f"val_{t.name}_")}
                for t in tasks} if at_best else (val or {})
    return {
        "metrics": {t.name: {"val": val_best.get(t.name, {}), "test": test[t.name],
                             **({ASSESS: assess[t.name]} if assess is not None else {})} for t in tasks},
        "metrics_test": test, "test_score": score_of(test, tasks), "best_val_score": state.best_score,
        **({"metrics_assess": assess, ASSESS_SCORE: score_of(assess, tasks)} if assess is not None else {}),
        "best_epoch": state.best_epoch, "epochs_run": state.epochs_run, **run.params,
        "wall_s": time.time() - run.t0, "config_hash": run.config_hash, "seed": run.cfg.seed,
        "router_weights": model.prompt.task_weights().tolist(), "history": state.history,
        "world_size": run.session.world_size, "rank_state_digests": digests,
    }


ASSESS, ASSESS_SCORE = "assess", "assess_score"     # the split, and its score's name (beside test_score)


def _assess(run: _Run) -> dict[str, dict[str, float]] | None:
    """The selected state (loaded by the caller) scored on the assessment rows (`data.assess_rows`), once, as
    the run ends; None when the run has none. Called only from `_final_result`, after the best epoch is
    chosen: the assessment never reaches early stopping, selection or a report before the last. Its seconds go
    to the session's clock (`assess_s`, also counted in `eval_s`)."""
    if not all(ASSESS in s for s in run.splits.values()):
        return None
    started = time.time()
    try:
        return _evaluate(run, ASSESS)
    finally:
        run.session.clock["assess_s"] = run.session.clock.get("assess_s", 0.0) + time.time() - started


def _checkpoint_and_report(run: _Run, state: TrainState, metrics: dict, result: dict | None) -> None:
    """Report the epoch to the session, with a checkpoint (rank 0 only) every `train.checkpoint_every`
    epochs and always on the last one (it carries the final result)."""
    due = result is not None or (state.epoch + 1) % run.cfg.train.checkpoint_every == 0
    ckpt_dir = None
    if run.session.rank == 0 and due:
        ckpt_dir = write_checkpoint(run.model, run.opt, state, run.cfg, run.config_hash, result)
    run.session.report(metrics, ckpt_dir)
    if ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)      # the session has copied what it keeps


def state_digest(model: CrossPTModel) -> str:
    """sha256 of every learned tensor (bit-exact comparison of ranks)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.trainable_state().items()):
        h.update(k.encode())
        h.update(v.float().numpy().tobytes())
    return h.hexdigest()[:16]


def ray_worker_loop(loop_config: dict) -> None:
    """Entry point of each Ray Train worker (TorchTrainer's train_loop_per_worker). `splits`: the k-shot
    splits the trial drew already (every rank trains on the same draw), else drawn here."""
    from crosspt.run.shipping import localise

    # a worker on another node than its trial reads the search's shipped data/bank copies (run/shipping.py)
    cfg = localise(RunConfig.model_validate(loop_config["config"]), loop_config.get("shipped"))
    session = RaySession(resume_from=loop_config.get("resume_from"))
    run_loop(cfg, session, splits=loop_config.get("splits"))

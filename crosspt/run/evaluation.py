"""Validation and test metrics over the WHOLE split: each rank predicts its shard, the predictions are
gathered before scoring, so every rank sees the same numbers."""
from __future__ import annotations

import torch

from crosspt.run.memory import lean_heap
from crosspt.run.model import CrossPTModel
from crosspt.run.precision import autocast
from crosspt.run.session import Session
from crosspt.tasks.data import eval_batches
from crosspt.tasks.metrics import compute_metrics, primary_metric


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors on `device` (other values as they are). To a GPU the tensors go
    through pinned host memory without blocking: the host queues the copy and the step's kernels behind it
    and moves on (a copy from pageable memory would wait for the device)."""
    if device.type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) and v.device.type == "cpu"
            else v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
@lean_heap()                # big no-grad batches: their freed buffers go back to the OS (run/memory.py)
def evaluate(model: CrossPTModel, examples_by_task: dict, session: Session, batch_size: int,
             dtype_cfg: str = "auto", generate: bool = False,
             with_generation: bool = False) -> dict[str, dict[str, float]]:
    """Full-split metrics per task: every rank predicts its shard, predictions are gathered. `generate`:
    predictions decoded greedily and parsed (seq2seq/decoder) instead of ranked over the label words.
    `with_generation` (a generating model): both, from one pass where the backbone can share it (the decoder
    runs each prompted input once for both), the generated metrics beside the ranked ones as `gen_<metric>`."""
    model.eval()
    device = session.device()
    ranked, generated = {}, {}
    for task in model.tasks:
        # shortest first: batches of like lengths carry little padding (every rank sorts alike, and the
        # predictions are matched to their examples by uid, so the order changes no metric)
        examples = model.backbone.by_length(examples_by_task[task.name])
        mine: list[tuple[str, float, float, float]] = []
        for batch_examples in eval_batches(examples, batch_size, shard=(session.rank, session.world_size)):
            batch = to_device(model.backbone.collate(batch_examples, train=False), device)
            with autocast(device, dtype_cfg):
                if with_generation:
                    preds, gen = model.predict_ranked_and_generated(batch)
                else:
                    preds = gen = model.predict(batch, generate=generate)   # gen: scored only with_generation
            mine += [(e.uid, float(p), float(g), float(e.label))
                     for e, p, g in zip(batch_examples, preds.float().cpu(), gen.float().cpu())]
        merged = {uid: (p, g, y) for part in session.gather(mine) for uid, p, g, y in part}
        order = sorted(merged)
        cast = float if task.is_regression else int
        labels = [cast(merged[u][2]) for u in order]
        ranked[task.name] = compute_metrics(task, [cast(merged[u][0]) for u in order], labels)
        if with_generation:
            generated[task.name] = compute_metrics(task, [cast(merged[u][1]) for u in order], labels)
    model.train()
    return with_generated(ranked, generated) if with_generation else ranked


def score_of(metrics: dict[str, dict[str, float]], tasks) -> float:
    """Mean over tasks of each task's primary metric: the number that ranks epochs and trials."""
    return float(sum(metrics[t.name][primary_metric(t)] for t in tasks) / len(tasks))


def flat_metrics(prefix: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """`{task: {name: value}}` -> `{f"{prefix}_{task}_{name}": value}` (the reported metric names)."""
    return {f"{prefix}_{task}_{k}": v for task, m in metrics.items() for k, v in m.items()}


def with_generated(ranked: dict[str, dict[str, float]], generated: dict[str, dict[str, float]]) -> dict:
    """Ranked metrics with the generation-based ones beside them as `gen_<metric>`: rank classification
    only asks which label word scores best, generation also asks whether the model writes it (what a
    user calling `generate` gets; the two diverge while the prompt is still weak)."""
    return {t: {**m, **{f"gen_{k}": v for k, v in generated.get(t, {}).items()}} for t, m in ranked.items()}

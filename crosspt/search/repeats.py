"""`budget.repeats` R: one configuration trained on R k-shot samples, the search sees their mean.

The repeats run side by side, one epoch of each in turn (`crosspt.run.loop.epochs` steps each loop an
epoch at a time), and the trial reports the mean over repeats after every epoch. Interleaved rather than
one repeat after the other because ASHA decides per epoch: sequential repeats would train all R repeats to
the end before the first report, and a trial ASHA then stopped would have wasted everything it ran. The
cost is memory: R models at once (R frozen backbones, since an encoder's scoring heads train with the
prompt and cannot be shared).

Repeat 0 (the trial's own seed, the configuration promoted later) supplies the checkpoint and prompts; a
restored trial runs its repeats again from the start (its checkpoint holds repeat 0 only).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from statistics import mean, pstdev

from crosspt.config.schema import RunConfig
from crosspt.config.space import SearchSpace
from crosspt.registry.models import repeat_metric
from crosspt.run.loop import INITIAL_PREFIX, LocalSession, Session, epochs

REPEAT_SEED_STRIDE = 1000         # repeat i trains with seed + 1000 i: its own k-shot sample, init, order


def repeat_configs(cfg: RunConfig, repeats: int) -> list[RunConfig]:
    return [cfg.model_copy(update={"seed": cfg.seed + REPEAT_SEED_STRIDE * i}) for i in range(repeats)]


def _averaged(metric: str) -> bool:
    """Scores are averaged over repeats; counters (epoch, params, steps) are the same in every repeat."""
    m = metric[len(INITIAL_PREFIX):] if metric.startswith(INITIAL_PREFIX) else metric
    return m.startswith(("val_", "test_", "assess_")) or m == "best_val_score"


def mean_row(rows: list[dict], epoch: int, final: bool, per_repeat: tuple[str, ...]) -> dict:
    """One epoch's report from each repeat's row at that epoch (`rows`, repeat 0 first; a repeat that
    stopped earlier counts with its last row): repeat 0's metrics with every score replaced by its mean,
    plus each repeat's value (`<m>_r<i>`) and the std (`<m>_std`) of the metrics in `per_repeat`."""
    row = dict(rows[0], epoch=epoch, final_epoch=final)
    for k, v in rows[0].items():
        values = [r.get(k) for r in rows]
        if _averaged(k) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            row[k] = mean(values)
            if k in per_repeat:
                row.update({repeat_metric(k, i): x for i, x in enumerate(values)}, **{f"{k}_std": pstdev(values)})
    return row


def run_repeats(cfg: RunConfig, space: SearchSpace, session: Session, splits: dict | list | None = None) -> None:
    """Train the R repeats of `cfg` epoch by epoch, reporting the mean to `session` after each epoch.
    `splits`: repeat 0's k-shot splits when drawn already, or a list of each repeat's (None: that repeat
    draws its own)."""
    splits = splits if isinstance(splits, list) else [splits]
    metrics = (space.objective.metric, "val_score", "best_val_score", "test_score", "assess_score")
    cfgs = repeat_configs(cfg, space.budget.repeats)
    with tempfile.TemporaryDirectory(prefix="crosspt_repeats_") as tmp:
        sessions = [LocalSession(Path(tmp) / f"r{i}", use_gpu=cfg.scaling.use_gpu, keep=1) for i in range(len(cfgs))]
        loops = [epochs(c, s, splits=splits[i] if i < len(splits) else None)
                 for i, (c, s) in enumerate(zip(cfgs, sessions))]
        running = set(range(len(loops)))
        epoch = 0
        while running:
            for i in sorted(running):
                try:
                    next(loops[i])
                except StopIteration:
                    running.discard(i)
            rows = [s.reports[min(epoch, len(s.reports) - 1)] for s in sessions]
            final = not running
            ckpt = sessions[0].checkpoints[-1] if final and sessions[0].checkpoints else None
            session.report(mean_row(rows, epoch, final, metrics), ckpt)
            epoch += 1

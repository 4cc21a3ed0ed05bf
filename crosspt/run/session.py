"""What the training loop needs from its host: rank, world size, device, where a checkpoint goes,
how an epoch is reported.

`RaySession` inside a Ray Train worker, `LocalSession` when a one-worker run skips the worker group;
the search's Tune trials bring their own (`crosspt.search.trainable.TuneSession`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from crosspt.run.model import CrossPTModel


class Session:
    rank = 0
    world_size = 1
    # filled by the loop for each run (`crosspt.run.loop`): "loop_start", "first_step", "last_step" (time.time()
    # of the loop's start, its first optimizer step and the end of its last one) and "eval_s" (seconds spent
    # evaluating), so a host can tell what a run paid besides training; each also as this process's CPU
    # seconds (`time.process_time()`, "<name>_cpu", "eval_cpu_s"): on a shared machine those do not move
    # with other processes' load
    clock: dict | None = None

    def device(self) -> torch.device:
        return torch.device("cpu")

    def latest_checkpoint(self) -> Path | None:
        return None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        raise NotImplementedError

    def wrap(self, model: CrossPTModel):
        return model

    def gather(self, obj: Any) -> list:
        """`obj` of every rank, in rank order (a collective: every rank must call it)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


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

"""The process's kept frozen backbone (`take`, `release`): what a run's model is built on."""
from __future__ import annotations

import threading

import torch

from crosspt.config.schema import RunConfig
from crosspt.run.precision import compute_dtype
from crosspt.tasks.specs import TaskSpec


class KeptBackbone:
    """The frozen backbone of this process's last run, handed to the next run that needs the same one.

    Why: a Tune actor runs one trial after another (`reuse_actors`), and every trial loading the same frozen
    weights again (read from disk, converted to the compute dtype, moved to the GPU) was most of a trial's
    start after its data. Only the frozen model and the tokenizer carry over: the trainable heads are reset
    to their initial values (`Backbone.head_parameters`), and a backbone is handed to one run at a time.
    Adapters whose heads start random (`Backbone.random_heads`) are always loaded afresh, so a run's
    numbers never depend on what ran before it in the process."""

    def __init__(self):
        self.key, self.backbone, self.heads, self.busy = None, None, None, False
        # `budget.repeats` runs take backbones from threads side by side: checking `busy` and setting it is
        # one step, or two runs would share (and both reset) one backbone
        self._lock = threading.Lock()

    @staticmethod
    def _key(cfg: RunConfig, tasks: list[TaskSpec], device: torch.device):
        p = cfg.prompt
        return (cfg.backbone.model_dump(mode="json"), p.label_semantics, p.prefix, p.placement, tuple(tasks), str(device),
                str(compute_dtype(device, cfg.backbone.dtype)))

    def take(self, cfg: RunConfig, tasks: list[TaskSpec], device: torch.device):
        from crosspt.backbones.loader import load_for_config

        key = self._key(cfg, tasks, device)
        with self._lock:
            if self.backbone is not None and not self.busy and self.key == key:
                self.busy = True
                with torch.no_grad():
                    for p, initial in zip(self.backbone.head_parameters(), self.heads):
                        p.copy_(initial)
                return self.backbone
        # the frozen weights are read from disk in the dtype the device computes in (run/precision.py)
        backbone = load_for_config(cfg, tasks, torch_dtype=compute_dtype(device, cfg.backbone.dtype))
        with self._lock:
            if not backbone.random_heads and not self.busy:
                self.key, self.backbone, self.busy = key, backbone, True
                self.heads = [p.detach().clone() for p in backbone.head_parameters()]
        return backbone

    def release(self, backbone) -> None:
        """The run that took `backbone` has ended: the next run may have it."""
        with self._lock:
            if backbone is self.backbone:
                self.busy = False


# the one per process: a Tune actor's trials run one after another in it
kept = KeptBackbone()


def take(cfg: RunConfig, tasks: list[TaskSpec], device: torch.device):
    """A backbone for this run: the kept one (heads reset) when it is free and the same, else loaded."""
    return kept.take(cfg, tasks, device)


def release(backbone) -> None:
    """The run that took `backbone` has ended."""
    kept.release(backbone)
"""`TrainState`: all that changes in a run from one epoch to the next."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    """The one mutable record of a run, kept by `crosspt.run.loop.run_loop`.

    * resume restores it from a checkpoint (`crosspt.run.checkpoint.read_checkpoint`);
    * every checkpoint holds it: the counters and `history` in `meta.json` (under these field names),
      `best_state` as the prompt artifact `prompts.safetensors`;
    * the final result reports from it: best score and epoch, epochs run, history.

    The current trainable tensors and the optimizer moments are not copied here: they live in the model
    and the optimizer, and a checkpoint saves them from there."""

    epoch: int = -1                    # the last finished epoch; -1: none yet
    global_step: int = 0               # optimizer steps so far (drives warm-up and the router temperature)
    best_score: float = -math.inf      # best validation score so far (`score_of`)
    best_epoch: int = -1               # its epoch; -1: the untrained start (`train.eval_initial`)
    bad_epochs: int = 0                # epochs since the best one, for early stopping (`train.patience`)
    history: list[dict] = field(default_factory=list)     # one row per validation, epoch -1 first
    best_state: dict[str, torch.Tensor] | None = None      # `trainable_state()` of the best epoch

    def record(self, epoch: int, score: float, trainable_state) -> None:
        """Epoch `epoch` ended with validation score `score`; `trainable_state()` is called only when it
        is a new best (a copy of every learned tensor)."""
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            self.best_state = trainable_state()
        else:
            self.bad_epochs += 1
        self.epoch = epoch

    @property
    def epochs_run(self) -> int:
        return sum(h["epoch"] >= 0 for h in self.history)

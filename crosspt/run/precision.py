"""The compute precision of a run's forward passes, one policy for training, evaluation and serving."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast(device: torch.device, dtype: str):
    """A context for forward passes under `backbone.dtype` (`"auto"`, `"float32"` or `"bfloat16"`):
    bf16 autocast on CUDA unless the config says float32; on CPU no autocast (the model runs in its own dtype)."""
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()

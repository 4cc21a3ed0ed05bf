"""The compute precision of a run's forward passes, one policy for training, evaluation and serving.

`backbone.dtype` "auto" (or "bfloat16") on a GPU with native bf16 (Ampere and later): the frozen weights
are loaded in bf16 and the forward passes run under bf16 autocast (which keeps softmax, norms and losses
in fp32); the prompts, heads and the optimizer state stay fp32. On a GPU without native bf16 (T4, V100)
and on CPU everything is fp32 (one warning line on such a GPU when bf16 was asked for or implied).
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch

_warned: set[str] = set()


def compute_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """The dtype the frozen weights are loaded in and the forward passes compute in on `device`, for the
    config's `backbone.dtype` (`"auto"`, `"float32"` or `"bfloat16"`)."""
    if device.type != "cuda" or dtype == "float32":
        return torch.float32
    # emulated bf16 (pre-Ampere) is slower than fp32: native support only
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    name = torch.cuda.get_device_name(device)
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"{name} has no native bf16: frozen weights and forward passes stay in float32", stacklevel=2)
    return torch.float32


def autocast(device: torch.device, dtype: str):
    """A context for forward passes under `backbone.dtype`: bf16 autocast where `compute_dtype` is bf16;
    otherwise none (the model runs in its own dtype)."""
    if compute_dtype(device, dtype) == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()

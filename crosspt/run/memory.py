"""Keeping a run's resident memory near what its tensors use (glibc's malloc; a no-op elsewhere).

Why: PyTorch's CPU tensors come from malloc. glibc serves a request above its mmap threshold with a fresh
mapping that goes back to the OS on free, but the threshold is dynamic: each freed mapping raises it to that
size (up to 32 MiB), after which an activation buffer of a few MiB comes from the heap instead, and a heap
only shrinks from its top. A trial's evaluation batches (`eval_batch_size` x (input + prompt) tokens, no
grad) free tens of MiB of such buffers per layer; measured on MiniLM (benchmarks/speed_memory.md) this kept about
110 MiB of freed memory resident after a training epoch and lifted the test evaluation's peak by about
60 MiB over what its live tensors need.

`lean_heap()` wraps an evaluation: on entry it hands the heap's free pages back (`malloc_trim`) and pins
the threshold at glibc's start value (128 KiB), so the evaluation's big buffers are mapped and unmapped;
on exit it trims again and pins the threshold at the dynamic ceiling, which is where glibc's own rule
settles during training anyway: the small-batch training steps keep reusing heap memory (a low threshold
there costs page faults on every step: measured +28% step time at 128 KiB, none at 4 MiB and above).
"""
from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from typing import Iterator

M_MMAP_THRESHOLD = -3                    # mallopt parameter number (malloc.h)
EVAL_MMAP_THRESHOLD = 128 * 1024         # glibc's initial threshold: every buffer above it is its own mapping
TRAIN_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's dynamic ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (has `mallopt` and `malloc_trim`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS; whether glibc did (False: nothing to do or not glibc)."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0))


def set_mmap_threshold(nbytes: int) -> bool:
    """Pin glibc's mmap threshold at `nbytes` (this also turns its dynamic rule off); False when not glibc."""
    return bool(_LIBC is not None and _LIBC.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


@contextmanager
def lean_heap() -> Iterator[None]:
    """An evaluation's scope: freed heap pages released on entry and exit, big buffers mapped while inside."""
    release_free_heap()
    set_mmap_threshold(EVAL_MMAP_THRESHOLD)
    try:
        yield
    finally:
        set_mmap_threshold(TRAIN_MMAP_THRESHOLD)
        release_free_heap()

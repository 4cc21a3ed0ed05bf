"""A run's evaluations hand their freed activation buffers back to the OS (crosspt.run.memory)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from crosspt.run import memory
from crosspt.run.evaluation import evaluate

needs_glibc = pytest.mark.skipif(memory._LIBC is None, reason="glibc's malloc only")

# In a fresh interpreter: free a 24 MiB buffer (glibc's dynamic rule then serves anything smaller from the
# heap), then allocate and free an 8 MiB one inside the context; print how much RSS the second one left.
_RETAINED = textwrap.dedent("""
    import contextlib, sys, torch
    from crosspt.run.memory import lean_heap
    def rss():
        line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    torch.ones(6 * 2**20).sum()
    before = rss()
    with (lean_heap() if sys.argv[1] == "lean" else contextlib.nullcontext()):
        x = torch.ones(2 * 2**20)
        del x
    print(rss() - before)
""")


def _retained_mib(ctx: str) -> float:
    out = subprocess.run([sys.executable, "-c", _RETAINED, ctx], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@needs_glibc
def test_lean_heap_returns_a_freed_buffer_that_the_default_policy_keeps():
    assert _retained_mib("default") > 6          # the measurement can tell: glibc's own rule keeps the 8 MiB
    assert _retained_mib("lean") < 2


class _NoTasks:
    tasks: list = []

    def eval(self):
        memory_log.append("eval")

    def train(self):
        memory_log.append("train")


class _Session:
    rank, world_size = 0, 1

    def device(self):
        import torch

        return torch.device("cpu")


memory_log: list = []


def test_evaluate_runs_under_lean_heap(monkeypatch):
    memory_log.clear()
    monkeypatch.setattr(memory, "set_mmap_threshold", lambda n: memory_log.append(n) or True)
    evaluate(_NoTasks(), {}, _Session(), 8)
    assert memory_log == [memory.EVAL_MMAP_THRESHOLD, "eval", "train", memory.TRAIN_MMAP_THRESHOLD]

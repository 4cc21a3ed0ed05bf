"""The `CROSSPT_FAULT` fault-injection hook: make a run fail on purpose, for tests and drills only.

A spec names a fault and when it fires; the training loop asks at two points of each epoch:
`inject_at_epoch_start` (before the first batch: `raise`, `exit`) and `poisons_first_loss` (the first
loss of the epoch becomes NaN, so the loop's real divergence check stops the run).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FAULT_ENV = "CROSSPT_FAULT"
FAULT_KINDS = ("raise", "nan", "exit")
_EXIT_CODE = 17                       # what a killed worker looks like to Ray Train / Tune


class InjectedFault(RuntimeError):
    """Raised by the `CROSSPT_FAULT` testing hook (`raise@...`)."""


def parse_faults(spec: str | None) -> list[dict]:
    """`CROSSPT_FAULT`: `KIND@epoch=N[,rank=R][,run=SUBSTR][,once=PATH]`, several joined by `;`.

    KIND: `raise` (InjectedFault at the start of epoch N), `nan` (the first loss of epoch N becomes NaN,
    so the real divergence check stops the run), `exit` (the process dies at the start of epoch N, like a
    killed worker). `rank` limits it to one Ray Train rank, `run` to runs whose config name contains
    SUBSTR (search trials are named `<space>-trialNNN`), `once` fires only while PATH does not exist and
    then creates it (a transient fault: a retry succeeds). For tests and drills only."""
    faults = []
    for part in (spec or "").split(";"):
        part = part.strip()
        if not part:
            continue
        kind, _, conds = part.partition("@")
        if kind not in FAULT_KINDS:
            raise ValueError(f"{FAULT_ENV}: unknown fault kind {kind!r} in {part!r} (raise, nan or exit)")
        f: dict[str, Any] = {"kind": kind, "epoch": 0}
        for cond in filter(None, (c.strip() for c in conds.split(","))):
            key, _, value = cond.partition("=")
            if key in ("epoch", "rank"):
                f[key] = int(value)
            elif key in ("run", "once"):
                f[key] = value
            else:
                raise ValueError(f"{FAULT_ENV}: unknown condition {key!r} in {part!r}")
        faults.append(f)
    return faults


def active_faults(spec: str | None = None) -> list[dict]:
    """The faults of `spec`, or of `$CROSSPT_FAULT` when `spec` is None (an empty spec: none)."""
    return parse_faults(spec if spec is not None else os.environ.get(FAULT_ENV))


def _fires(faults: list[dict], kind: str, *, run_name: str, rank: int, epoch: int) -> bool:
    for f in faults:
        if f["kind"] != kind or f["epoch"] != epoch or f.get("rank", rank) != rank:
            continue
        if f.get("run") and f["run"] not in run_name:
            continue
        if f.get("once"):
            marker = Path(f["once"])
            if marker.exists():
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{run_name} epoch {epoch} rank {rank}\n")
        return True
    return False


def inject_at_epoch_start(faults: list[dict], *, run_name: str, rank: int, epoch: int) -> None:
    """Injection point 1, before the epoch's first batch: `raise` raises, `exit` kills the process."""
    if not faults:
        return
    if _fires(faults, "raise", run_name=run_name, rank=rank, epoch=epoch):
        raise InjectedFault(f"injected fault ({FAULT_ENV}) at epoch {epoch} of {run_name}")
    if _fires(faults, "exit", run_name=run_name, rank=rank, epoch=epoch):
        os._exit(_EXIT_CODE)


def poisons_first_loss(faults: list[dict], *, run_name: str, rank: int, epoch: int) -> bool:
    """Injection point 2: whether the epoch's first loss is to become NaN (`nan`)."""
    return bool(faults) and _fires(faults, "nan", run_name=run_name, rank=rank, epoch=epoch)

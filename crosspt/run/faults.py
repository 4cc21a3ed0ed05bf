"""Test-only hooks, read here and nowhere else: make a run fail (`CROSSPT_FAULT`) or a search driver die
(`CROSSPT_DRIVER_KILL`) on purpose, for tests and drills only. Both are environment variables, so no
production signature carries them: the loop and the driver ask this module, and the Ray job forwards
`CROSSPT_FAULT` to every worker with the other forwarded variables (`crosspt.run.trainer.init_ray`).

A spec names a fault and when it fires. The training loop holds one `Drill` per run (`drill_for`) and
calls it at two points, knowing nothing of the faults: `epoch_start` (before the first batch: `raise`,
`exit`) and `loss`, which every step's loss passes through (`nan`: the first loss of the epoch becomes NaN,
so the loop's real divergence check stops the run).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

FAULT_ENV = "CROSSPT_FAULT"
KILL_ENV = "CROSSPT_DRIVER_KILL"       # the search driver SIGKILLs itself at one named point
KILL_POINTS = ("before_ray", "before_tuner", "reconcile")
FAULT_KINDS = ("raise", "nan", "exit")
_EXIT_CODE = 17                       # what a killed worker looks like to Ray Train / Tune


class InjectedFault(RuntimeError):
    """Raised by the `CROSSPT_FAULT` testing hook (`raise@...`)."""


def parse_faults(spec: str | None) -> list[dict]:
    """`CROSSPT_FAULT`: `KIND@epoch=N[,rank=R][,run=SUBSTR][,once=PATH]`, several joined by `;`.

    KIND: `raise` (InjectedFault at the start of epoch N), `nan` (the first loss of epoch N becomes NaN,
    so the real divergence check stops the run), `exit` (the process dies at the start of epoch N, like a
    killed worker). `rank` limits it to one Ray Train rank, `run` to runs whose config name contains
    SUBSTR (search trials are named `trialNNN`, NNN the Optuna trial number from 000), `once` fires only while PATH does not exist and
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


def check_drills() -> None:
    """ValueError naming a malformed `CROSSPT_FAULT` or `CROSSPT_DRIVER_KILL` (checked by the driver before
    anything starts, so a drill never fails half-way through a search)."""
    parse_faults(os.environ.get(FAULT_ENV))
    if os.environ.get(KILL_ENV, KILL_POINTS[0]) not in KILL_POINTS:
        raise ValueError(f"{KILL_ENV}={os.environ[KILL_ENV]!r}: use one of {', '.join(KILL_POINTS)}")


def kill_point(point: str) -> None:
    """Resume drills: the driver dies here as a crashed one would (no cleanup, no finally, no atexit)."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


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


class Drill:
    """The faults one run meets (`run_name` on `rank`), at the loop's two points. With no fault asked for,
    both points hand back at once, so a run without a drill trains exactly as one without this hook."""

    def __init__(self, faults: list[dict], run_name: str, rank: int):
        self.faults, self.run_name, self.rank = faults, run_name, rank
        self._poison = False               # the next loss becomes NaN (`nan`, armed by `epoch_start`)

    def epoch_start(self, epoch: int) -> None:
        """Before the epoch's first batch: `raise` raises, `exit` kills the process, `nan` arms `loss`."""
        if not self.faults:
            return
        where = {"run_name": self.run_name, "rank": self.rank, "epoch": epoch}
        if _fires(self.faults, "raise", **where):
            raise InjectedFault(f"injected fault ({FAULT_ENV}) at epoch {epoch} of {self.run_name}")
        if _fires(self.faults, "exit", **where):
            os._exit(_EXIT_CODE)
        self._poison = _fires(self.faults, "nan", **where)

    def loss(self, loss):
        """A training step's loss (a device tensor), NaN once after `epoch_start` armed `nan`. No host read."""
        if self._poison:
            self._poison = False
            return loss * float("nan")
        return loss


def drill_for(run_name: str, rank: int) -> Drill:
    """The drill `$CROSSPT_FAULT` asks of this run (one that does nothing when it is unset)."""
    return Drill(parse_faults(os.environ.get(FAULT_ENV)), run_name, rank)

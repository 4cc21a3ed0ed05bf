"""Few-shot benchmark: baselines and CrossPT on the same backbone, data, k-shot samples, seeds and budget.

Methods (one row each, crosspt.bench.methods; every trained method gets the same epochs / patience /
batch size and the same learning-rate grid over ITS OWN learning rate, picked by validation score):

    zero_shot     no training: the frozen backbone with an empty prompt (label semantics only)
    pt            vanilla prompt tuning, our module (n_sources=0, private prompt only)
    peft_pt       PEFT's PromptTuning as an outside reference for the PT row: PEFT's PromptEmbedding as
                  the prompt, placed where PEFT places it (encoder: before [CLS], position ids left to
                  the model, as PeftModelForFeatureExtraction does; seq2seq/decoder: prepended), scored
                  by our adapter
    spot          SPoT: the target prompt starts as a copy of the best source prompt (best by target
                  validation score of each source prompt used as-is) = what `prompt.init=source` does
                  with a 1-source bank; the source itself is not composed
    attempt       ATTEMPT-style: input-conditioned attention router over the sources + private, wavg
    mpt           MPT: PEFT's MultitaskPromptTuning, source stage on the other tasks (multi-task),
                  target stage initialised with AVERAGE_SOURCE_TASKS
    crosspt_cat   CrossPT, task router, concatenation of the weighted sources + private prompt
    crosspt_wavg  CrossPT, task router, weighted average

Source prompts are single-task PT prompts (the `pt` runs at `source_shots`, best lr by validation),
trained once per seed per task of the source pool; each target's bank leaves the target out
(`select_sources(..., exclude=[target])`).

Phases, one per `Stage`: (1) what needs only the target (PT on targets and source pool, zero-shot, PEFT
PT); (2) what composes from or picks among the sources, and MPT's source stage; (3) MPT's target stage.
Jobs (crosspt.bench.job) run sequentially, or on `parallel` Ray actors. Nothing here imports Ray or
MLflow at module import.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from crosspt.bench import job as J
from crosspt.bench.methods import Method, Stage, selected, spec_of
from crosspt.bench.report import notes
from crosspt.bench.settings import BenchSettings
from crosspt.bench.stats import select_best, summarize

Log = Callable[[str], None]


# ---- running many jobs ----------------------------------------------------------------------------
def execute(jobs: list[dict], parallel: int = 1, log: Log = print, cpus_per_job: float = 1.0) -> list[dict]:
    """Run jobs sequentially in this process, or on `parallel` Ray actors (each with its own split
    cache); records in job order."""
    if not jobs:
        return []
    t0 = time.time()
    if parallel <= 1:
        runner = J.JobRunner()
        done = []
        for i, j in enumerate(jobs):
            done.append(runner.run(j))
            log(_progress(i + 1, len(jobs), done[-1], time.time() - t0))
        return done
    return _execute_on_ray(jobs, parallel, log, cpus_per_job, t0)


def _execute_on_ray(jobs: list[dict], parallel: int, log: Log, cpus_per_job: float, t0: float) -> list[dict]:
    import ray

    init_ray_local()
    # actors rather than tasks: an actor is one long-lived process, so its JobRunner's split cache serves
    # every job it runs; no retries, a failed job fails the benchmark as in the sequential mode
    actor = ray.remote(num_cpus=cpus_per_job, max_restarts=0, max_task_retries=0)(J.JobRunner)
    idle = [actor.remote() for _ in range(min(parallel, len(jobs)))]
    done: list[dict | None] = [None] * len(jobs)
    pending: dict = {}
    queue = list(enumerate(jobs))
    while queue or pending:
        while queue and idle:
            i, j = queue.pop(0)
            a = idle.pop()
            pending[a.run.remote(j)] = (i, a)
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i, a = pending.pop(ref)
            idle.append(a)
            done[i] = ray.get(ref)
            log(_progress(sum(r is not None for r in done), len(jobs), done[i], time.time() - t0))
    for a in idle:
        ray.kill(a)
    return done  # type: ignore[return-value]


def _progress(i: int, n: int, r: dict, elapsed: float) -> str:
    """One finished job, and the phase's ETA: elapsed / done x remaining (jobs of a phase are alike)."""
    lr = f" lr={r['lr']:g}" if r.get("lr") is not None and r.get("kind") != "probe" and \
        (r.get("kind") or spec_of(r["method"]).trains) else ""
    val = f"val {r['val']:.4f}  " if r.get("val") == r.get("val") else ""          # NaN: not validated
    eta = elapsed / i * (n - i)
    return (f"  [{i:>3}/{n}] {r['method']:<13} {r['task']:<16} k={r['k']:<3} seed={r['seed']}{lr}: "
            f"{val}test {r['test']:.4f}  epochs {r['epochs_run']}  {r['wall_s']:.1f}s  "
            f"(phase {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)")


def init_ray_local() -> float:
    """Join $RAY_ADDRESS, else start a private local Ray on loopback only (never attach to someone
    else's); seconds taken."""
    from crosspt.run.trainer import init_ray

    t = time.time()
    if os.environ.get("RAY_ADDRESS"):
        init_ray(log_to_driver=False)
    else:
        init_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)   # a Ray of its own
    return time.time() - t


# ---- the grid ---------------------------------------------------------------------------------------
def leave_one_out_bank(bank: torch.Tensor, meta: dict, target: str) -> tuple[torch.Tensor, list[str]]:
    """Every source prompt of the bank except the target's own."""
    from crosspt.run.artifacts import select_sources

    n = sum(1 for t in meta["tasks"] if t != target)
    return select_sources(bank, meta, n, rule="order", exclude=[target])


def source_stage_task(target: str) -> str:
    """The `task` of a source-stage record: its runs train on the target's sources, not on the target."""
    return f"src-for-{target}"


class _Grid:
    """Job dicts of one benchmark: every job carries the same settings."""

    def __init__(self, s: BenchSettings):
        self.s = s
        self.settings = asdict(s)

    def job(self, method, task, k, seed, lr=None, **kw) -> dict:
        return {"method": method, "task": task, "k": k, "seed": seed, "lr": lr, "settings": self.settings, **kw}

    def lrs(self, method) -> list:
        """The lr grid of a method; an untrained one runs once, without an lr."""
        return list(self.s.lrs) if spec_of(method).trains else [None]

    def on_targets(self, method, **kw) -> list[dict]:
        s = self.s
        return [self.job(method, t, k, sd, lr, **kw)
                for t in s.tasks for k in s.shots for sd in s.seeds for lr in self.lrs(method)]


def _phase1_jobs(g: _Grid) -> list[dict]:
    """PT on the targets and, when a method needs sources, on the source pool at source_shots (a task in
    both at the same k runs once); then the other methods that need nothing but the target."""
    s = g.s
    keys = []
    if Method.PT in s.methods:
        keys += [(t, k, sd) for t in s.tasks for k in s.shots for sd in s.seeds]
    if s.needs_sources():
        keys += [(t, s.src_k(), sd) for t in dict.fromkeys(s.source_tasks) for sd in s.seeds]
    jobs = [g.job(Method.PT, t, k, sd, lr) for (t, k, sd) in dict.fromkeys(keys) for lr in s.lrs]
    for spec in selected(s.methods, Stage.ALONE):
        if spec.method is not Method.PT:
            jobs += g.on_targets(spec.method)
    return jobs


def _save_banks(s: BenchSettings, best: dict, out_dir: Path) -> dict[int, tuple[torch.Tensor, dict, str]]:
    """Per seed: the source pool's best PT prompts as a bank file -> {seed: (bank, meta, path)}."""
    from crosspt.run.artifacts import load_bank, save_bank

    pool, src_k, banks = list(dict.fromkeys(s.source_tasks)), s.src_k(), {}
    for sd in s.seeds:
        rows = [best[(Method.PT, t, src_k, sd)] for t in pool]
        path = out_dir / "banks" / f"bank_seed{sd}.safetensors"
        save_bank(path, torch.stack([r["prompt"] for r in rows]), backbone=s.backbone, tasks=pool,
                  metrics={r["task"]: {"val": r["val"], "lr": r["lr"]} for r in rows},
                  extra={"seed": sd, "shots": src_k})
        bank, meta = load_bank(path, backbone=s.backbone, source_len=s.prompt_len)
        banks[sd] = (bank, meta, str(path))
    return banks


def _phase2_jobs(g: _Grid, banks: dict) -> list[dict]:
    """Per target and seed, with the leave-one-out bank: the methods that use the sources, and the
    source stage of each method that has one (multi-task over the same source tasks, at source_shots
    like the bank's prompts)."""
    s, jobs = g.s, []
    with_sources = selected(s.methods, Stage.SOURCES)
    staged = [spec.source_stage for spec in selected(s.methods, Stage.SOURCE_STAGE)]
    for t in s.tasks:
        for sd in s.seeds:
            src, names = leave_one_out_bank(banks[sd][0], banks[sd][1], t) if banks else (None, [])
            assert t not in names
            for k in s.shots:
                for spec in with_sources:
                    jobs += [g.job(spec.method, t, k, sd, lr, bank=src, bank_tasks=names) for lr in s.lrs]
            for m in staged:
                jobs += [g.job(m, t, s.src_k(), sd, lr, tasks=names, bank=src, bank_tasks=names, target=t)
                         for lr in s.lrs]          # bank: MPT's shared prompt starts from these sources
    return jobs


def _phase3_jobs(g: _Grid, source_records: list[dict]) -> list[dict]:
    """MPT's target stage on every target, k and lr, from its best source stage (by mean source val)."""
    s, jobs = g.s, []
    for spec in selected(s.methods, Stage.SOURCE_STAGE):
        best = select_best(r for r in source_records if r["method"] == spec.source_stage)
        for t in s.tasks:
            for sd in s.seeds:
                st = best[(spec.source_stage, source_stage_task(t), s.src_k(), sd)]
                jobs += [g.job(spec.method, t, k, sd, lr, mpt_state=st["mpt_state"], bank_tasks=st["sources"])
                         for k in s.shots for lr in s.lrs]
    return jobs


def _run_phase(n: int, what: str | None, jobs: list[dict], walls: dict, parallel: int, cpus_per_job: float,
               log: Log) -> list[dict]:
    """Run phase `n`'s jobs, announced with `what` unless it is None; its wall time goes in `walls`."""
    if what is not None:
        log(f"phase {n}: {len(jobs)} jobs ({what})")
    t = time.time()
    records = execute(jobs, parallel, log, cpus_per_job)
    walls[f"phase{n}"] = time.time() - t
    return records


def run_benchmark(s: BenchSettings, out_dir: str | Path, *, parallel: int = 1, cpus_per_job: float = 1.0,
                  log: Log = print) -> dict:
    """All phases; returns the summary (settings, every run, the selected runs, the table)."""
    s.check()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, walls, g = time.time(), {}, _Grid(s)
    n_pool = len(set(s.source_tasks)) if s.needs_sources() else 0
    records = _run_phase(1, f"PT incl. {n_pool} source tasks at k={s.src_k()}, zero-shot, PEFT PT",
                         _phase1_jobs(g), walls, parallel, cpus_per_job, log)
    banks = _save_banks(s, select_best(records), out_dir) if s.needs_sources() else {}
    jobs = _phase2_jobs(g, banks)
    recs2 = _run_phase(2, "SPoT, ATTEMPT-style, CrossPT cat/wavg, MPT source stage", jobs, walls, parallel,
                       cpus_per_job, log)
    for j, r in zip(jobs, recs2):
        if "target" in j:
            r["target"], r["task"] = j["target"], source_stage_task(j["target"])
    jobs = _phase3_jobs(g, recs2)
    recs3 = _run_phase(3, "MPT target stage" if jobs else None, jobs, walls, parallel, cpus_per_job, log)
    return _summary(s, records + recs2 + recs3, banks, walls, time.time() - t0)


def _summary(s: BenchSettings, records: list[dict], banks: dict, walls: dict, wall_s: float) -> dict:
    """Settings, every run (without tensors), the run selected by validation per cell, the table."""
    selected_runs = select_best(r for r in records if r["method"] in s.methods)
    table = summarize(list(selected_runs.values()), list(s.methods), list(s.tasks), list(s.shots))
    return {
        "settings": asdict(s), "source_shots": s.src_k(), "wall_s": wall_s, "phase_wall_s": walls,
        "banks": {str(sd): b[2] for sd, b in banks.items()},
        "runs": [{k: v for k, v in r.items() if k not in ("prompt", "mpt_state", "sample_ids")} for r in records],
        "selected": [{k: v for k, v in r.items() if k not in ("prompt", "mpt_state", "metrics")}
                     for r in selected_runs.values()],
        "table": table,
        # one trained and one untrained method's sample uids: the evidence, in the results, that every
        # method saw the same k-shot samples (tests check it for all of them)
        "sample_ids": {f"{r['method']}|{r['task']}|k{r['k']}|s{r['seed']}": r.get("sample_ids")
                       for r in records if r["method"] in (Method.PT, Method.ZERO_SHOT)},
        "notes": notes(s),
    }

"""One benchmark job: a method on a task (or task set), k, seed and learning rate -> a plain result record.

Jobs are plain dicts (`method`, `task` or `tasks`, `k`, `seed`, `lr`, `settings`, and what the method
needs from earlier phases: `bank` + `bank_tasks`, `mpt_state`), so they travel to Ray workers as-is.
"""
from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import torch

from crosspt.bench.methods import Method, build_bench_model, load_backbone_for, run_config, spec_of
from crosspt.bench.settings import BenchSettings


class SplitCache:
    """`prepare_data(cfg)` memoised on what determines the splits: the k-shot samples are a pure function
    of the tasks, seed and data section (k, data dir, max_test), the same for every method. Reading and
    sampling SST-2's 67k rows costs more than a few-shot run, so a process that runs many jobs holds one
    of these and hands each job's draw to the run loop (`run_loop(..., splits=...)`)."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._splits: dict[str, tuple] = {}

    def get(self, cfg) -> tuple[list, dict]:
        """`(tasks, splits)` as `prepare_data(cfg)` returns them."""
        from crosspt.run.inputs import prepare_data

        key = json.dumps([cfg.tasks, cfg.seed, cfg.data.model_dump(mode="json")], sort_keys=True)
        if key not in self._splits:
            if len(self._splits) >= self.max_entries:
                self._splits.clear()
            self._splits[key] = prepare_data(cfg)
        return self._splits[key]


def choose_spot_source(job: dict, s: BenchSettings, splits: SplitCache) -> tuple[torch.Tensor, str, dict]:
    """SPoT's source choice: each source prompt, used as the target's prompt untrained, scored on the
    target's validation split; the best one wins (ties: bank order) -> (prompt, its task, all scores)."""
    from crosspt.run.loop import LocalSession, evaluate, score_of
    from crosspt.run.model import build_model

    cfg = run_config(s, Method.PT, [job["task"]], job["k"], job["seed"], job["lr"])
    tasks, data = splits.get(cfg)
    model = build_model(cfg, tasks, backbone=load_backbone_for(cfg, tasks))
    val = {t: sp["val"] for t, sp in data.items()}
    scores = {}
    for name, src in zip(job["bank_tasks"], job["bank"]):
        with torch.no_grad():
            model.prompt.private.prompts.copy_(src.unsqueeze(0).expand_as(model.prompt.private.prompts))
        scores[name] = score_of(evaluate(model, val, LocalSession(tempfile.gettempdir()), s.eval_batch_size), tasks)
    best = max(job["bank_tasks"], key=lambda n: scores[n])          # max keeps the first of ties
    return job["bank"][job["bank_tasks"].index(best)], best, scores


def _evaluate_only(model, data: tuple, s: BenchSettings) -> dict:
    """The untrained model's result, in run_loop's result layout (zero-shot)."""
    from crosspt.run.loop import LocalSession, evaluate, score_of

    tasks, splits = data
    with tempfile.TemporaryDirectory(prefix="crosspt_bench_", ignore_cleanup_errors=True) as d:
        sess = LocalSession(d)
        val = evaluate(model, {t: sp["val"] for t, sp in splits.items()}, sess, s.eval_batch_size)
        test = evaluate(model, {t: sp["test"] for t, sp in splits.items()}, sess, s.eval_batch_size)
    return {"metrics": {t.name: {"val": val[t.name], "test": test[t.name]} for t in tasks},
            "best_val_score": score_of(val, tasks), "test_score": score_of(test, tasks),
            "epochs_run": 0, "best_epoch": -1, "trainable_params": 0, "history": []}


def _train(model, cfg, data: tuple) -> dict:
    from crosspt.run.loop import LocalSession, run_loop

    with tempfile.TemporaryDirectory(prefix="crosspt_bench_", ignore_cleanup_errors=True) as d:
        return run_loop(cfg, LocalSession(d, keep=1), model=model, splits=data[1])


def _record(job: dict, res: dict, splits: dict, wall_s: float) -> dict:
    """The plain result record of a job (what the harness selects and tabulates)."""
    return {"method": job["method"], "task": "+".join(job.get("tasks") or [job["task"]]), "k": job["k"],
            "seed": job["seed"], "lr": job.get("lr"), "val": float(res["best_val_score"]),
            "test": float(res["test_score"]), "metrics": res["metrics"], "epochs_run": res["epochs_run"],
            "best_epoch": res["best_epoch"], "trainable_params": res.get("trainable_params", 0), "wall_s": wall_s,
            "epoch_s": [h["epoch_s"] for h in res.get("history", []) if "epoch_s" in h],
            "n_train": {t: len(sp["train"]) for t, sp in splits.items()},
            "n_val": {t: len(sp["val"]) for t, sp in splits.items()},
            "n_test": {t: len(sp["test"]) for t, sp in splits.items()},
            "sample_ids": {t: sorted(e.uid for e in sp["train"]) for t, sp in splits.items()}}


def execute_job(job: dict, splits: SplitCache | None = None) -> dict:
    """Run one benchmark job; returns a plain result record. `splits`: the process's split cache."""
    s = BenchSettings(**job["settings"])
    splits = splits or SplitCache()
    if s.threads:
        torch.set_num_threads(int(s.threads))
    t0 = time.time()
    spec = spec_of(job["method"])
    extra: dict[str, Any] = {}
    if spec.picks_source:
        src, name, scores = choose_spot_source(job, s, splits)
        job = {**job, "source": src}
        extra.update({"spot_source": name, "spot_source_val": scores})
    elif job.get("bank_tasks"):
        extra["sources"] = list(job["bank_tasks"])
    cfg = run_config(s, job["method"], job.get("tasks") or [job["task"]], job["k"], job["seed"],
                     job.get("lr") or s.lrs[0], n_sources=len(job.get("bank_tasks") or []))
    data = splits.get(cfg)
    model = build_bench_model(job, cfg, data[0])
    res = _train(model, cfg, data) if spec.trains else _evaluate_only(model, data, s)
    rec = {**_record(job, res, data[1], time.time() - t0), **extra}
    if spec.keep:
        rec.update(spec.keep(model))
    return rec


class JobRunner:
    """Runs jobs one after the other in this process, sharing one split cache among them (the harness
    makes one per process: here, or one per Ray actor)."""

    def __init__(self):
        self.splits = SplitCache()

    def run(self, job: dict) -> dict:
        if job.get("kind"):                   # a standard-benchmark job (crosspt.bench.standard)
            from crosspt.bench.standard import RUNNERS

            return RUNNERS[job["kind"]](job, self.splits)
        return execute_job(job, self.splits)

"""The standard benchmark's stages, run one after the other (crosspt.bench.standard has the jobs)."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from crosspt.bench.harness import execute, leave_one_out_bank
from crosspt.bench.standard import SINGLE, Arm, StandardSettings, cell_job, probe_job, zero_shot_job

Log = Callable[[str], None]
STAGES = ("sources", "probe", "lr_grid", "reuse")


def _cost(job: dict) -> float:
    """A rough relative cost, to start the longest jobs first (a shorter tail on `parallel` workers)."""
    tokens = job.get("prompt_len") or (1 + len(job.get("bank_tasks") or []))
    return len(job["tasks"]) * len(job.get("lrs") or [1]) * job["k"] * (8 + tokens)


def _stage(name: str, jobs: list[dict], walls: dict, parallel: int, cpus: float, log: Log) -> list[dict]:
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    log(f"stage {STAGES.index(name) + 1}/{len(STAGES)} {name}: {len(jobs)} jobs")
    t = time.time()
    done = execute([jobs[i] for i in order], parallel, log, cpus)
    walls[name] = time.time() - t
    log(f"stage {name} done in {walls[name] / 60:.1f} min")
    out: list[dict] = [{}] * len(jobs)
    for i, r in zip(order, done):
        out[i] = r
    return out


def _save_bank(st: StandardSettings, recs: list[dict], out_dir: Path) -> tuple[torch.Tensor, dict, str]:
    from crosspt.run.artifacts import load_bank, save_bank

    b = st.bench
    pool = [r for r in recs if r["method"] == Arm.SOURCE]
    path = out_dir / "banks" / "bank.safetensors"
    save_bank(path, torch.stack([r["prompt"] for r in pool]), backbone=b.backbone, tasks=[r["task"] for r in pool],
              metrics={r["task"]: {"val": r["val"], "test": r["test"], "lr": r["lr"]} for r in pool},
              extra={"seed": st.source_seed, "rows": st.source_rows, "epochs": st.source_epochs})
    bank, meta = load_bank(path, backbone=b.backbone, source_len=b.prompt_len)
    return bank, meta, str(path)


def _lr_grid_jobs(st: StandardSettings, banks: dict, multi_bank: tuple) -> list[dict]:
    b, jobs = st.bench, []
    for t in b.tasks:
        src, names = banks[t]
        for sd in b.seeds:
            for arm in SINGLE:
                kw = {"bank": src, "bank_tasks": names} if arm in (Arm.CAT, Arm.WAVG) else {}
                if arm is Arm.PT_LONG:
                    kw = {"prompt_len": (len(names) + 1) * b.prompt_len}
                jobs.append(cell_job(st, arm, [t], st.lr_shots, sd, b.lrs, **kw))
    if st.lr_shots in st.multi_shots:
        jobs += _multi_jobs(st, st.lr_shots, multi_bank, lambda arm, sd: b.lrs)
    return jobs


def _multi_jobs(st: StandardSettings, k: int, multi_bank: tuple, lrs_of) -> list[dict]:
    src, names = multi_bank
    jobs = []
    for sd in st.bench.seeds:
        jobs.append(cell_job(st, Arm.PT_MULTI, list(st.bench.tasks), k, sd, lrs_of(Arm.PT_MULTI, sd)))
        jobs.append(cell_job(st, Arm.CAT_MULTI, list(st.bench.tasks), k, sd, lrs_of(Arm.CAT_MULTI, sd),
                             bank=src, bank_tasks=names))
    return jobs


def _reuse_jobs(st: StandardSettings, banks: dict, multi_bank: tuple, grid: list[dict]) -> list[dict]:
    """The other k with the lr picked at lr_shots, and the transfer matrix with PT's picked lr."""
    b = st.bench
    pick = {(r["method"], r["task"], r["seed"]): r["lr"] for r in grid}
    jobs = []
    for k in (k for k in b.shots if k != st.lr_shots):
        for t in b.tasks:
            src, names = banks[t]
            for sd in b.seeds:
                for arm in SINGLE:
                    kw = {"bank": src, "bank_tasks": names} if arm in (Arm.CAT, Arm.WAVG) else {}
                    if arm is Arm.PT_LONG:
                        kw = {"prompt_len": (len(names) + 1) * b.prompt_len}
                    jobs.append(cell_job(st, arm, [t], k, sd, [pick[(str(arm), t, sd)]], **kw))
        if k in st.multi_shots:
            task = "+".join(b.tasks)
            jobs += _multi_jobs(st, k, multi_bank, lambda arm, sd: [pick[(str(arm), task, sd)]])
    for t in b.tasks:
        src, names = banks[t]
        for sd in st.transfer_seeds:
            for name, prompt in zip(names, src):
                jobs.append(cell_job(st, Arm.SPOT, [t], st.lr_shots, sd, [pick[(str(Arm.PT), t, sd)]],
                                     source=prompt, source_name=name))
    return jobs


def _plain(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "prompt"}


def run_standard(st: StandardSettings, out_dir: str | Path, *, parallel: int = 1, cpus_per_job: float = 1.0,
                 log: Log = print) -> dict:
    """Every stage; returns the summary (settings, every record, bank, stage walls)."""
    st.check()
    b = st.bench
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, walls = time.time(), {}
    pool = list(dict.fromkeys(b.source_tasks))
    jobs = [cell_job(st, Arm.SOURCE, [t], st.source_rows, st.source_seed, [st.source_lr]) for t in pool]
    jobs += [zero_shot_job(st, t) for t in dict.fromkeys(list(b.tasks) + pool)]
    first = _stage("sources", jobs, walls, parallel, cpus_per_job, log)
    bank, meta, bank_path = _save_bank(st, first, out_dir)
    banks = {t: leave_one_out_bank(bank, meta, t) for t in b.tasks}
    rest = [t for t in pool if t not in b.tasks]
    multi_bank = (bank[[meta["tasks"].index(t) for t in rest]], rest) if rest else (None, [])
    probes = _stage("probe", [probe_job(st, t, *banks[t]) for t in b.tasks], walls, parallel, cpus_per_job, log)
    grid = _stage("lr_grid", _lr_grid_jobs(st, banks, multi_bank), walls, parallel, cpus_per_job, log)
    reuse = _stage("reuse", _reuse_jobs(st, banks, multi_bank, grid), walls, parallel, cpus_per_job, log)
    return {"settings": asdict(b), "standard": {k: v for k, v in asdict(st).items() if k != "bench"},
            "wall_s": time.time() - t0, "stage_wall_s": walls, "parallel": parallel,
            "bank": {"path": bank_path, "tasks": meta["tasks"], "metrics": meta.get("metrics", {})},
            "banks": {t: names for t, (_, names) in banks.items()}, "multi_bank": multi_bank[1],
            "records": [_plain(r) for r in first + probes + grid + reuse]}


def settings_of(summary: dict) -> StandardSettings:
    """The StandardSettings a finished run's summary was made with."""
    from crosspt.bench.settings import BenchSettings

    return StandardSettings(bench=BenchSettings(**summary["settings"]), **summary["standard"])


def trace_router(summary: dict, arm: Arm = Arm.CAT, *, seeds: list[int] | None = None, log: Log = print) -> list[dict]:
    """Re-run a finished run's `arm` cells at lr_shots (every target, `seeds`) with the lr each picked,
    recording the router's weights per epoch; each record says whether it reproduced the original cell's
    validation and test scores (the runs are seeded: it must)."""
    from crosspt.bench.job import JobRunner
    from crosspt.run.artifacts import load_bank

    st = settings_of(summary)
    b = st.bench
    bank, meta = load_bank(summary["bank"]["path"], backbone=b.backbone, source_len=b.prompt_len)
    runner, out = JobRunner(), []
    orig = {(r["task"], r["seed"]): r for r in summary["records"]
            if r.get("kind") == "cell" and r["method"] == arm and r["k"] == st.lr_shots}
    for t in b.tasks:
        src, names = leave_one_out_bank(bank, meta, t)
        for sd in seeds if seeds is not None else b.seeds:
            o = orig[(t, sd)]
            r = runner.run(cell_job(st, arm, [t], st.lr_shots, sd, [o["lr"]], bank=src, bank_tasks=names))
            r["reproduced"] = r["val"] == o["val"] and r["test"] == o["test"]
            log(f"  router trace {arm} {t} seed {sd} lr {o['lr']:g}: test {r['test']:.4f} "
                f"(original {o['test']:.4f}, reproduced {r['reproduced']})")
            out.append({k: v for k, v in r.items() if k in ("task", "seed", "lr", "val", "test", "router_trace",
                                                            "bank_tasks", "reproduced", "best_epoch")})
    return out


# what the diagnosis varies, one thing at a time, against the run's own cells (same seeds, same picked lr):
# name -> (the arms it applies to, run-config overrides, job extras read by build_arm)
ABLATIONS = {
    # the encoder's per-task scoring heads kept at their initial values
    "heads frozen": ((Arm.PT, Arm.CAT), {"optim": {"head_lr": 1e-8}}, {}),
    # [PAD]-embedding prompts (the encoder family's default init) instead of sampled vocabulary rows
    "neutral init": ((Arm.PT,), {"prompt": {"init": "neutral"}}, {}),
    # every source token rescaled to the mean norm of the backbone's word embeddings (direction kept)
    "sources at vocabulary norm": ((Arm.CAT,), {}, {"bank_norm": "vocab"}),
}


def ablate(summary: dict, *, arms=(Arm.PT, Arm.CAT), seeds: list[int] | None = None, parallel: int = 1,
           log: Log = print) -> list[dict]:
    """Re-run a finished run's `arms` cells at lr_shots (every target, `seeds`, the lr each picked) once per
    ABLATIONS entry; each record carries the original cell's test score beside its own."""
    from crosspt.run.artifacts import load_bank

    st = settings_of(summary)
    b = st.bench
    bank, meta = load_bank(summary["bank"]["path"], backbone=b.backbone, source_len=b.prompt_len)
    orig = {(r["method"], r["task"], r["seed"]): r for r in summary["records"]
            if r.get("kind") == "cell" and r["k"] == st.lr_shots and len(r["tasks"]) == 1}
    jobs = []
    for name, (applies, variant, extras) in ABLATIONS.items():
        for arm in (a for a in arms if a in applies):
            for t in b.tasks:
                src, names = leave_one_out_bank(bank, meta, t)
                kw = {"bank": src, "bank_tasks": names} if arm in (Arm.CAT, Arm.WAVG) else {}
                for sd in seeds if seeds is not None else b.seeds:
                    o = orig[(str(arm), t, sd)]
                    jobs.append(cell_job(st, arm, [t], st.lr_shots, sd, [o["lr"]], variant=variant,
                                         variant_name=name, **extras, **kw))
    done = execute(jobs, parallel, log)
    out = []
    for r in done:
        o = orig[(r["method"], r["task"], r["seed"])]
        out.append({**{k: r[k] for k in ("method", "task", "seed", "lr", "val", "test", "best_epoch",
                                          "variant_name")}, "original_test": o["test"], "original_val": o["val"]})
    return out

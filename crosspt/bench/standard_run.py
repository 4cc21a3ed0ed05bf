"""The standard benchmark's stages, run one after the other (crosspt.bench.standard has the jobs)."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from crosspt.bench.harness import execute, leave_one_out_bank
from crosspt.bench.standard import Arm, StandardSettings, cell_job, probe_job, zero_shot_job

Log = Callable[[str], None]
STAGES = ("sources", "probe", "lr_grid", "reuse")


def _cost(job: dict) -> float:
    """A rough relative cost, to start the longest jobs first (a shorter tail on `parallel` workers)."""
    tokens = job.get("prompt_len") or (1 + len(job.get("bank_tasks") or []))
    return len(job["tasks"]) * len(job.get("lrs") or [1]) * job["k"] * (8 + tokens)


def cell_key(r: dict) -> str:
    """What determines a single-lr cell's record (the runs are seeded and deterministic)."""
    return json.dumps([r["method"], r["task"], r["k"], r["seed"], list(r.get("lrs") or [r.get("lr")]),
                       r.get("source_name", r.get("source")), r.get("variant_name")])


def _stage(name: str, jobs: list[dict], walls: dict, parallel: int, cpus: float, log: Log,
           known: dict | None = None) -> list[dict]:
    """Run a stage's jobs, longest first; a single-lr cell found in `known` (cell_key -> record of an
    earlier run of the same settings) is taken from there instead of being run again."""
    known = known or {}
    reused = {i: known[cell_key(j)] for i, j in enumerate(jobs)
              if j.get("kind") == "cell" and len(j["lrs"]) == 1 and cell_key(j) in known}
    todo = sorted((i for i in range(len(jobs)) if i not in reused), key=lambda i: -_cost(jobs[i]))
    log(f"stage {STAGES.index(name) + 1}/{len(STAGES)} {name}: {len(todo)} jobs"
        + (f" ({len(reused)} more reused from the earlier run)" if reused else ""))
    t = time.time()
    done = execute([jobs[i] for i in todo], parallel, log, cpus)
    walls[name] = time.time() - t
    log(f"stage {name} done in {walls[name] / 60:.1f} min")
    out: list[dict] = [{}] * len(jobs)
    for i, r in zip(todo, done):
        out[i] = r
    for i, r in reused.items():
        out[i] = {**r, "reused": True}
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
    b = st.bench
    jobs = _single_jobs(st, st.lr_shots, banks, lambda arm, t, sd, variant: b.lrs)
    if st.lr_shots in st.multi_shots:
        jobs += _multi_jobs(st, st.lr_shots, multi_bank, lambda arm, sd: b.lrs)
    return jobs


def _single_jobs(st: StandardSettings, k: int, banks: dict, lrs_of) -> list[dict]:
    """Every single-task arm (and rule variant, `StandardSettings.variants`) on every target and seed at
    `k`, with the lr grid `lrs_of(arm, target, seed, variant name)`: CrossPT composes the target's
    leave-one-out bank, PT long has its composed length."""
    b, jobs = st.bench, []
    for t in b.tasks:
        src, names = banks[t]
        for sd in b.seeds:
            for arm in st.single_arms():
                kw = {"bank": src, "bank_tasks": names} if arm in (Arm.CAT, Arm.WAVG) else {}
                if arm is Arm.PT_LONG:
                    kw = {"prompt_len": (len(names) + 1) * b.prompt_len}
                for name, over in st.variants(arm):
                    extra = {"variant": over, "variant_name": name} if name else {}
                    jobs.append(cell_job(st, arm, [t], k, sd, lrs_of(arm, t, sd, name), **kw, **extra))
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
    pick = {(r["method"], r["task"], r["seed"], r.get("variant_name")): r["lr"] for r in grid}
    jobs = []
    for k in (k for k in b.shots if k != st.lr_shots):
        jobs += _single_jobs(st, k, banks, lambda arm, t, sd, variant: [pick[(str(arm), t, sd, variant)]])
        if k in st.multi_shots:
            task = "+".join(b.tasks)
            jobs += _multi_jobs(st, k, multi_bank, lambda arm, sd: [pick[(str(arm), task, sd, None)]])
    for t in b.tasks:
        src, names = banks[t]
        for sd in st.transfer_seeds:
            for name, prompt in zip(names, src):
                jobs.append(cell_job(st, Arm.SPOT, [t], st.lr_shots, sd, [pick[(str(Arm.PT), t, sd, None)]],
                                     source=prompt, source_name=name))
    return jobs


def _plain(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "prompt"}


def _reusable(st: StandardSettings, earlier: dict | None) -> tuple[dict, dict]:
    """From an earlier run of the same settings: its sources + probe records and stage walls (untouched by
    what changed since, they are taken as they are), and its single-lr cells by cell_key."""
    if earlier is None:
        return {}, {}
    from crosspt.errors import ConfigError

    # through settings_of: keys added to StandardSettings since the earlier run read as their defaults
    if earlier["settings"] != asdict(st.bench) or asdict(settings_of(earlier)) != asdict(st):
        raise ConfigError("--reuse: the earlier run was made with other settings; rerun it whole")
    recs = earlier["records"]
    first = [r for r in recs if r.get("kind") in ("zero_shot", "probe") or r["method"] == Arm.SOURCE]
    cells = {cell_key(r): r for r in recs if r.get("kind") == "cell" and len(r.get("trials", [])) == 1}
    return {"records": first, "walls": earlier["stage_wall_s"], "bank": earlier["bank"]["path"]}, cells


def run_standard(st: StandardSettings, out_dir: str | Path, *, parallel: int = 1, cpus_per_job: float = 1.0,
                 log: Log = print, reuse: dict | None = None) -> dict:
    """Every stage; returns the summary (settings, every record, bank, stage walls). `reuse`: an earlier
    run's summary whose sources, probe and single-lr cells are taken instead of run again (the runs are
    deterministic; its lr-grid cells are always run)."""
    st.check()
    b = st.bench
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, walls = time.time(), {}
    pool = list(dict.fromkeys(b.source_tasks))
    early, known = _reusable(st, reuse)
    if early:
        first = [r for r in early["records"] if r.get("kind") != "probe"]
        walls.update({k: early["walls"][k] for k in ("sources", "probe")})
        log(f"stages sources and probe reused from the earlier run (walls {walls})")
    else:
        jobs = [cell_job(st, Arm.SOURCE, [t], st.source_rows, st.source_seed, [st.source_lr]) for t in pool]
        jobs += [zero_shot_job(st, t) for t in dict.fromkeys(list(b.tasks) + pool)]
        first = _stage("sources", jobs, walls, parallel, cpus_per_job, log)
    if early:                            # the earlier run's bank file, as it is
        from crosspt.run.artifacts import load_bank

        bank_path = out_dir / "banks" / "bank.safetensors"
        bank_path.parent.mkdir(parents=True, exist_ok=True)
        if Path(early["bank"]).resolve() != bank_path.resolve():
            shutil.copy(early["bank"], bank_path)
        bank, meta = load_bank(bank_path, backbone=b.backbone, source_len=b.prompt_len)
        bank_path = str(bank_path)
    else:
        bank, meta, bank_path = _save_bank(st, first, out_dir)
    banks = {t: leave_one_out_bank(bank, meta, t) for t in b.tasks}
    rest = [t for t in pool if t not in b.tasks]
    multi_bank = (bank[[meta["tasks"].index(t) for t in rest]], rest) if rest else (None, [])
    probes = [r for r in early["records"] if r.get("kind") == "probe"] if early else \
        _stage("probe", [probe_job(st, t, *banks[t]) for t in b.tasks], walls, parallel, cpus_per_job, log) \
        if st.probe else []
    grid = _stage("lr_grid", _lr_grid_jobs(st, banks, multi_bank), walls, parallel, cpus_per_job, log)
    again = _stage("reuse", _reuse_jobs(st, banks, multi_bank, grid), walls, parallel, cpus_per_job, log, known)
    from crosspt.config.schema import load_config

    return {"settings": asdict(b), "standard": {k: v for k, v in asdict(st).items() if k != "bench"},
            "router_rule": load_config(None, {}).prompt.normalization,      # the default the CrossPT cells ran
            "wall_s": time.time() - t0 + (sum(early["walls"][k] for k in ("sources", "probe")) if early else 0.0),
            "stage_wall_s": walls, "parallel": parallel, "reused_stages": ["sources", "probe"] if early else [],
            "bank": {"path": bank_path, "tasks": meta["tasks"], "metrics": meta.get("metrics", {})},
            "banks": {t: names for t, (_, names) in banks.items()}, "multi_bank": multi_bank[1],
            "records": [_plain(r) for r in first + probes + grid + again]}


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


# the planted-source probe (issue 21): a target whose own task is in the source pool composes the WHOLE pool,
# its own pre-trained prompt included, with no private prompt, so that only the router can find it; the
# router lr and the epochs are raised from the protocol's (0.01, 5 with patience) so that its logits can move
PLANTED = {"router_lr": 0.1, "epochs": 10, "lr": 0.03}


def planted_variant(rule: str, router_lr: float, epochs: int) -> dict:
    """The run-config overrides of a planted-source cell under router rule `rule`."""
    return {"prompt": {"normalization": rule, "private_len": 0}, "optim": {"router_lr": router_lr},
            "train": {"epochs": epochs, "patience": None, "checkpoint_every": epochs}}


def planted(summary: dict, *, seeds: list[int], rules: tuple[str, ...] = ("dirichlet", "noisy_topk"),
            arms: tuple[Arm, ...] = (Arm.CAT, Arm.WAVG), router_lr: float = PLANTED["router_lr"],
            epochs: int = PLANTED["epochs"], lr: float = PLANTED["lr"], targets: list[str] | None = None,
            parallel: int = 1, log: Log = print) -> list[dict]:
    """The planted-source probe over a finished run's bank: for every target whose own task is in the
    bank, CrossPT `arms` on the whole bank (no private prompt) under each of `rules`, k = lr_shots, `seeds`,
    prompt lr `lr` (only the scoring heads train besides the router). Each record keeps the router's
    evaluation weights per epoch (`router_trace`), the index of the target's own source and its test."""
    from crosspt.run.artifacts import load_bank

    st = settings_of(summary)
    b = st.bench
    bank, meta = load_bank(summary["bank"]["path"], backbone=b.backbone, source_len=b.prompt_len)
    names = list(meta["tasks"])
    chosen = [t for t in b.tasks if t in names and (targets is None or t in targets)]
    jobs = [cell_job(st, arm, [t], st.lr_shots, sd, [lr], bank=bank, bank_tasks=names,
                     variant=planted_variant(rule, router_lr, epochs), variant_name=f"planted {rule}")
            for t in chosen for arm in arms for rule in rules for sd in seeds]
    log(f"planted-source probe: {len(jobs)} cells (targets {chosen}, bank {names})")
    out = []
    for r in execute(jobs, parallel, log):
        out.append({**{k: r[k] for k in ("method", "task", "seed", "lr", "val", "test", "best_epoch", "router_weights",
                                         "router_trace", "bank_tasks", "wall_s")},
                    "rule": r["variant_name"].split(" ", 1)[1], "own": names.index(r["task"]),
                    "router_lr": router_lr, "epochs": epochs})
    return out

"""The decoder benchmark (`jobs/benchmark_fewshot.py --decoder`, benchmarks/decoder.md): zero-shot, PT and CrossPT
(cat, wavg) on a decoder LM (default: the offline SmolLM2-135M-Instruct), with ranked AND generated test scores,
the wall of every run, and the train-step time against a plain Hugging Face forward/backward of the same batch.

It is the standard benchmark's machinery (crosspt.bench.standard) with a smaller plan, sized for CPUs:
    sources   single-task PT of each source-pool task on `source_rows` rows (one bank, seed `source_seed`); the
              zero-shot score of every target
    lr_grid   every arm on every target at seed `lr_seed`, at each lr of the grid; the lr is picked by the
              cell's validation score (test is read once, for the picked model only)
    reuse     the other seeds at the lr their (arm, target) picked at `lr_seed`: the grid is searched once per
              cell, not once per seed (the budget: see `estimate`)
then `step_timing` on the first training batch of each target.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from crosspt.bench.settings import BenchSettings
from crosspt.bench.standard import LABELS, Arm, StandardSettings, cell_job, zero_shot_job

Log = Callable[[str], None]
ARMS = (Arm.PT, Arm.CAT, Arm.WAVG)


@dataclass
class DecoderSettings:
    bench: BenchSettings
    source_rows: int = 200
    source_val: int = 64
    source_epochs: int = 2
    source_lr: float = 0.3
    source_batch: int = 16
    source_seed: int = 0
    lr_seed: int = 0                                   # the seed whose cells search the lr grid
    timing_repeats: int = 5
    arms: list[str] = field(default_factory=lambda: [str(a) for a in ARMS])

    def standard(self) -> StandardSettings:
        """The standard benchmark's settings these jobs are made of (no multi-task, no transfer matrix)."""
        return StandardSettings(bench=self.bench, source_rows=self.source_rows, source_val=self.source_val,
                                source_epochs=self.source_epochs, source_lr=self.source_lr,
                                source_batch=self.source_batch, source_seed=self.source_seed,
                                lr_shots=self.bench.shots[0], multi_shots=[], transfer_seeds=[])

    def check(self) -> None:
        from crosspt.errors import ConfigError

        b = self.bench
        b.check()
        if self.lr_seed not in b.seeds:
            raise ConfigError(f"lr_seed {self.lr_seed} is not one of the seeds {b.seeds}")
        if [t for t in b.source_tasks if t in b.tasks]:
            raise ConfigError(f"the source pool {b.source_tasks} must not hold a target ({b.tasks})")
        bad = [a for a in self.arms if a not in {str(x) for x in ARMS}]
        if bad:
            raise ConfigError(f"unknown decoder-benchmark arm(s) {bad}; choose from {', '.join(map(str, ARMS))}")


def _cells(ds: DecoderSettings, st: StandardSettings, target: str, bank, names, seeds, lrs_of) -> list[dict]:
    jobs = []
    for k in ds.bench.shots:
        for sd in seeds:
            for arm in map(Arm, ds.arms):
                kw = {"bank": bank, "bank_tasks": names} if arm in (Arm.CAT, Arm.WAVG) else {}
                jobs.append(cell_job(st, arm, [target], k, sd, lrs_of(arm, k), **kw))
    return jobs


def run_decoder(ds: DecoderSettings, out_dir: str | Path, *, parallel: int = 1, cpus_per_job: float = 1.0,
                log: Log = print, partial: Callable[[dict], None] | None = None) -> dict:
    """Every stage and the step timing; returns the summary (settings, every record, bank, walls, timing).
    Targets run one after the other (lr grid, then the other seeds); `partial(summary so far)` is called after
    each target, so a long run leaves a usable table behind as it goes."""
    from crosspt.bench.standard_run import _save_bank, _stage

    ds.check()
    st, b = ds.standard(), ds.bench
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, walls = time.time(), {}

    def stage(name: str, jobs: list[dict]) -> list[dict]:
        w: dict[str, float] = {}
        out = _stage(name, jobs, w, parallel, cpus_per_job, log)
        walls[name] = walls.get(name, 0.0) + w[name]
        return out

    jobs = [cell_job(st, Arm.SOURCE, [t], ds.source_rows, ds.source_seed, [ds.source_lr]) for t in b.source_tasks]
    jobs += [zero_shot_job(st, t) for t in b.tasks]
    records = stage("sources", jobs)
    bank, meta, bank_path = _save_bank(st, records, out_dir)
    names = list(meta["tasks"])                        # no target is in the pool: every target composes all of it
    rest = [sd for sd in b.seeds if sd != ds.lr_seed]

    def summary(timing: dict) -> dict:
        return {"settings": asdict(b), "decoder": {k: v for k, v in asdict(ds).items() if k != "bench"},
                "wall_s": time.time() - t0, "stage_wall_s": dict(walls), "parallel": parallel,
                "bank": {"path": bank_path, "tasks": names, "metrics": meta.get("metrics", {})},
                "records": [{k: v for k, v in r.items() if k != "prompt"} for r in records], "timing": timing}

    for target in b.tasks:
        grid = stage("lr_grid", _cells(ds, st, target, bank, names, [ds.lr_seed], lambda arm, k: list(b.lrs)))
        pick = {(r["method"], r["k"]): r["lr"] for r in grid}
        records += grid + stage("reuse", _cells(ds, st, target, bank, names, rest,
                                                lambda arm, k: [pick[(str(arm), k)]]))
        if partial:
            partial(summary({}))
    t = time.time()
    timing = {task: step_timing(b, task, b.shots[0], ds.lr_seed, ds.timing_repeats, log) for task in b.tasks}
    walls["timing"] = time.time() - t
    return summary(timing)


# ---- train-step and scoring time --------------------------------------------------------------------------
def _seconds(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of `fn()`: on a shared machine the CPU time of this process is the steadier one."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def step_timing(s: BenchSettings, task: str, k: int, seed: int, repeats: int = 5, log: Log = print) -> dict:
    """Median seconds of one training step of a PT model on the target's first training batch, against a plain
    Hugging Face forward/backward of the same rows (the prompt as `inputs_embeds` in front of the input and the
    label, `labels=` with -100 elsewhere, the model's own loss over the full vocabulary at every position, the
    gradient to the prompt); and of scoring `eval_batch_size` test rows ranked + generated in one pass against
    the two passes apart. Interleaved, after one warm-up of each."""
    from crosspt.bench.job import SplitCache
    from crosspt.bench.methods import Method, load_backbone_for, run_config
    from crosspt.run.model import build_model

    if s.threads:
        torch.set_num_threads(int(s.threads))
    cfg = run_config(s, Method.PT, [task], k, seed, s.lrs[0])
    tasks, splits = SplitCache().get(cfg)
    backbone = load_backbone_for(cfg, tasks)
    model = build_model(cfg, tasks, backbone=backbone)
    batch = backbone.collate(splits[task]["train"][:s.batch_size], train=True)
    test = backbone.collate(splits[task]["test"][:s.eval_batch_size], train=False)
    prompt = model.prompt.private.prompts            # [1, L, d]: PT's one prompt (a Parameter)
    B, L = batch["input_ids"].shape[0], prompt.shape[1]
    emb = backbone.word_embeddings()

    def ours():
        model(batch).backward()
        model.zero_grad(set_to_none=True)

    def plain():
        x = torch.cat([prompt.expand(B, -1, -1), emb(batch["input_ids"]), emb(batch["target_ids"])], dim=1)
        m = torch.cat([torch.ones(B, L, dtype=torch.long), batch["attention_mask"], batch["target_mask"]], dim=1)
        ignore = torch.full((B, L + batch["input_ids"].shape[1]), -100, dtype=torch.long)
        labels = torch.cat([ignore, batch["target_ids"].masked_fill(batch["target_mask"] == 0, -100)], dim=1)
        backbone.model(inputs_embeds=x, attention_mask=m, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    def one_pass():
        model.predict_ranked_and_generated(test)

    def two_passes():
        model.predict(test)
        model.predict(test, generate=True)

    fns = {"step_ours": ours, "step_plain_hf": plain, "score_one_pass": one_pass, "score_two_passes": two_passes}
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = _seconds(fn)
            wall[name].append(w)
            cpu[name].append(c)
    res = {name: statistics.median(v) for name, v in wall.items()}
    res.update({f"{name}_cpu": statistics.median(v) for name, v in cpu.items()})
    res.update({"step_ratio": res["step_ours"] / res["step_plain_hf"],
                "score_ratio": res["score_one_pass"] / res["score_two_passes"],
                "step_ratio_cpu": res["step_ours_cpu"] / res["step_plain_hf_cpu"],
                "score_ratio_cpu": res["score_one_pass_cpu"] / res["score_two_passes_cpu"], "batch_rows": B,
                "prompt_len": L, "input_len": int(batch["input_ids"].shape[1]),
                "test_rows": int(test["labels"].numel()),
                "repeats": repeats, "threads": torch.get_num_threads(), "runs_wall_s": wall, "runs_cpu_s": cpu})
    log(f"  timing {task}: step {res['step_ours']:.2f}s vs plain HF {res['step_plain_hf']:.2f}s "
        f"(x{res['step_ratio']:.2f}; CPU x{res['step_ratio_cpu']:.2f}); {res['test_rows']} test rows ranked+generated "
        f"in one pass {res['score_one_pass']:.2f}s vs two {res['score_two_passes']:.2f}s (x{res['score_ratio']:.2f}; "
        f"CPU x{res['score_ratio_cpu']:.2f})")
    return res


# ---- the report ---------------------------------------------------------------------------------------------
def _ms(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{scale * values[0]:.1f}"
    return f"{scale * statistics.fmean(values):.1f} ± {scale * statistics.stdev(values):.1f}"


def _metric(r: dict, task: str, name: str) -> float | None:
    return (r.get("test_metrics") or {}).get(task, {}).get(name)


def _defaults_note(b: dict) -> str:
    """What the run left to the backbone's own defaults (absent from summaries written before `prompt_init`)."""
    if "prompt_init" not in b:
        return ""
    return (f" Prompt init `{b['prompt_init']}` (auto: the backbone's default, text for a decoder: the task's "
            f"instruction); `backbone.template` auto (a tokenizer with a chat template: chat); validation rows, "
            f"where the benchmark sets none: the backbone preset's `data.val_shots`. Best epoch -1 = the untrained "
            f"prompt won on validation.")


def _paired_lines(b: dict, dd: dict, cells: list[dict], zero: dict) -> list[str]:
    """Paired differences (x100) with 95% t intervals over the seeds both arms ran (`standard_report.paired`):
    each trained arm against zero-shot (one deterministic score, the same for every seed), CrossPT against PT,
    and wavg against cat; ranked and generated. Empty below two seeds."""
    from crosspt.bench.standard_report import paired
    from crosspt.tasks.metrics import primary_metric

    if len(b["seeds"]) < 2:
        return []
    arms = [Arm(a) for a in dd["arms"]]
    pairs = [(a, Arm.ZERO_SHOT) for a in arms] + [(a, Arm.PT) for a in arms if a != Arm.PT and Arm.PT in arms]
    pairs += [(Arm.WAVG, Arm.CAT)] if Arm.WAVG in arms and Arm.CAT in arms else []
    out = ["", "## Paired differences", "",
           "Points x100, mean over seeds of (row - column arm) on the same test rows, 95% CI = mean ± "
           "t(0.975, n-1)·sd/√n over the n seeds; zero-shot is one score, paired with every seed.", "",
           "| task | difference | ranked [95% CI] | generated [95% CI] | seeds |", "| --- | --- | --- | --- | --- |"]
    def scores(arm: Arm, t: str, key: str) -> dict[int, float]:
        if arm == Arm.ZERO_SHOT:
            v = _metric(zero[t], t, key) if t in zero else None
            return {} if v is None else {sd: v for sd in b["seeds"]}
        return {r["seed"]: v for r in cells if r["method"] == arm and r["task"] == t
                for v in [_metric(r, t, key)] if v is not None}

    for t in b["tasks"]:
        m = primary_metric(t)
        for a, c in pairs:
            ds = [paired(scores(a, t, key), scores(c, t, key)) for key in (m, "gen_" + m)]
            cis = ["-" if d is None else f"{100 * d['mean']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
                   for d in ds]
            n = "/".join("-" if d is None else str(d["n"]) for d in ds)
            out.append(f"| {t} | {LABELS[a]} − {LABELS[c]} | {cis[0]} | {cis[1]} | {n} |")
    return out


def render(summary: dict) -> str:
    """benchmarks/decoder.md from a finished run's summary."""
    from crosspt.tasks.metrics import primary_metric

    b, dd = summary["settings"], summary["decoder"]
    recs = summary["records"]
    cells = [r for r in recs if r.get("kind") == "cell" and r["method"] != Arm.SOURCE]
    zero = {r["task"]: r for r in recs if r.get("kind") == "zero_shot"}
    lines = [f"# Decoder benchmark: {b['backbone']}",
             "",
             f"Targets {', '.join(b['tasks'])}; k={', '.join(map(str, b['shots']))} per class; seeds "
             f"{', '.join(map(str, b['seeds']))}; test = dev capped at {b['max_test']} rows; "
             f"{b['epochs']} epochs (patience {b['patience']}), batch {b['batch_size']}, prompt {b['prompt_len']} "
             f"tokens (CrossPT: {len(summary['bank']['tasks'])} source(s) of {b['prompt_len']} + a private prompt of "
             f"{b['prompt_len']}), max_length {b['max_length']}, {b['threads'] or 'default'} torch thread(s) a job. "
             f"lr grid {b['lrs']} searched on validation at seed {dd['lr_seed']}; the other seeds reuse the pick of "
             f"their (method, target). Source bank: single-task PT of {', '.join(summary['bank']['tasks'])} on "
             f"{dd['source_rows']} train rows each ({dd['source_epochs']} epochs, lr {dd['source_lr']}). Ranked = "
             f"argmax of the candidates' summed log-likelihood; generated = greedy decoding, parsed "
             f"(`Backbone.parse_generated`). Mean ± sd over seeds, x100." + _defaults_note(b),
             "",
             "| method | task | ranked test | generated test | lr picked | wall per run (s) | epochs run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in b["tasks"]:
        m = primary_metric(t)
        z = zero.get(t)
        if z:
            lines.append(f"| {LABELS[Arm.ZERO_SHOT]} | {t} | {_ms([z['test']])} | "
                         f"{_ms([v for v in [_metric(z, t, 'gen_' + m)] if v is not None])} | - | "
                         f"{z['wall_s']:.0f} (test only) | 0 |")
        for arm in dd["arms"]:
            rs = sorted((r for r in cells if r["method"] == arm and r["task"] == t), key=lambda r: r["seed"])
            if not rs:
                continue
            gen = [v for v in (_metric(r, t, "gen_" + m) for r in rs) if v is not None]
            walls = [tr["wall_s"] for r in rs for tr in r["trials"] if "wall_s" in tr]
            lrs = ", ".join(format(r["lr"], "g") for r in rs)
            epochs = ", ".join(str(r["epochs_run"]) for r in rs)
            lines.append(f"| {LABELS[Arm(arm)]} | {t} | {_ms([r['test'] for r in rs])} | {_ms(gen)} | {lrs} | "
                         f"{statistics.fmean(walls):.0f} | {epochs} |")
    lines += _paired_lines(b, dd, cells, zero)
    lines += ["", "## Every run", "",
              "| method | task | seed | lr | val | best epoch | wall (s) | epoch times (s) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in cells + [r for r in recs if r.get("kind") == "cell" and r["method"] == Arm.SOURCE]:
        for tr in r["trials"]:
            ep = ", ".join(f"{e:.0f}" for e in tr.get("epoch_s", []))
            lines.append(f"| {LABELS[Arm(r['method'])]} | {r['task']} | {r['seed']} | {tr['lr']:g} | "
                         f"{100 * tr['val']:.1f} | {tr.get('best_epoch', '-')} | "
                         f"{tr.get('wall_s', float('nan')):.0f} | {ep} |")
    if summary.get("timing"):                  # a run stopped before its timing stage has none
        lines += ["", "## Train step and scoring time", "",
                  "Median of interleaved repeats in one process, the same rows for both columns; wall seconds, and in "
                  "brackets this process's CPU seconds (steadier on a shared machine).", "",
                  "| task | rows x (prompt + input) tokens | train step | plain HF fwd/bwd | ratio | "
                  "test rows | ranked+generated, one pass | the two apart | ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for t, tm in summary["timing"].items():
            def ws(key: str) -> str:
                return f"{tm[key]:.2f} ({tm.get(key + '_cpu', float('nan')):.2f})"
            lines.append(f"| {t} | {tm['batch_rows']} x ({tm['prompt_len']} + {tm['input_len']}) | "
                         f"{ws('step_ours')} | {ws('step_plain_hf')} | {ws('step_ratio')} | {tm['test_rows']} | "
                         f"{ws('score_one_pass')} | {ws('score_two_passes')} | {ws('score_ratio')} |")
    walls = summary["stage_wall_s"]
    lines += ["", f"Wall {summary['wall_s'] / 60:.1f} min in all: " +
              ", ".join(f"{k} {v / 60:.1f} min" for k, v in walls.items()) + f" (parallel {summary['parallel']})."]
    return "\n".join(lines) + "\n"

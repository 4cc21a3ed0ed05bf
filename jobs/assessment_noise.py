"""How noisy a trial's validation score is next to its assessment score (`data.assess_rows`), measured.

One fixed configuration (the `smoke` space's base: MiniLM, 8 private prompt tokens, vocab init, prompt lr
0.03), one task at a time, k=16 per class, trained with `--seeds` seeds (each its own k-shot sample, init and
batch order), as a search trial runs it (in process, `crosspt.run.loop.run_loop`). Per seed: the objective
(`best_val_score`, the best epoch's score on the 32 k-shot validation rows), the selected state's
`assess_score` on the fixed assessment rows, and its `test_score`. Reported per task:

- the SD of each across seeds (what a design factor's effect is measured against);
- each one's binomial sampling SD, sqrt(p (1 - p) / n) at the mean score p and the split's row count n (the
  part of that SD that more rows would remove), and the remainder sqrt(SD^2 - sampling^2) (seed/training
  spread, plus for validation the optimism of a max over epochs);
- the mean gap validation - assessment (that optimism) and their correlation across seeds;
- cost: the assessment pass's seconds per trial (`assess_s`), and the wall of a 2-task trial (sst2 + rte,
  the smoke base) with assessment at `auto` and off.

    python jobs/assessment_noise.py --seeds 8 --epochs 4 --tasks rte sst2 --out benchmarks/assessment_noise.json

Bounded: seeds x tasks short runs (about 20-60 s each on a loaded 2-CPU machine) plus 2 x 2 cost runs.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosspt.config.schema import load_config  # noqa: E402
from crosspt.run import inputs, loop  # noqa: E402

BASE = {"backbone.name": "minilm", "backbone.max_length": 64, "data.shots": 16, "data.max_test": 300,
        "prompt.n_sources": 0, "prompt.private_len": 8, "prompt.init": "vocab", "optim.prompt_lr": 0.03,
        "train.batch_size": 8, "train.eval_batch_size": 64, "train.patience": 3}


def one_run(tasks: list[str], seed: int, epochs: int, assess, data_dir: str) -> dict:
    cfg = load_config(None, {**BASE, "tasks": tasks, "seed": seed, "train.epochs": epochs,
                             "data.assess_rows": assess, "data.data_dir": data_dir})
    _, splits = inputs.prepare_data(cfg)
    with tempfile.TemporaryDirectory(prefix="crosspt_noise_") as tmp:
        session = loop.LocalSession(Path(tmp))
        t0, c0 = time.time(), time.process_time()
        res = loop.run_loop(cfg, session, splits=splits)
        wall, cpu = time.time() - t0, time.process_time() - c0
    rows = {part: sum(len(s[part]) for s in splits.values()) for part in next(iter(splits.values()))}
    return {"seed": seed, "val": res["best_val_score"], "assess": res.get("assess_score"), "test": res["test_score"],
            "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"], "wall_s": wall, "cpu_s": cpu,
            "assess_s": session.clock.get("assess_s"), "eval_s": session.clock["eval_s"], "rows": rows}


def binomial_sd(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key, rows_key in (("val", "val"), ("assess", "assess"), ("test", "test")):
        xs = [r[key] for r in runs]
        n = runs[0]["rows"][rows_key]
        sd, mean = statistics.stdev(xs), statistics.fmean(xs)
        samp = binomial_sd(mean, n)
        out[key] = {"mean": mean, "sd_across_seeds": sd, "rows": n, "sampling_sd": samp,
                    "rest_sd": math.sqrt(max(sd ** 2 - samp ** 2, 0.0))}
    val, assess = [r["val"] for r in runs], [r["assess"] for r in runs]
    out["val_minus_assess"] = statistics.fmean(v - a for v, a in zip(val, assess))
    out["corr_val_assess"] = statistics.correlation(val, assess) if len(set(val)) > 1 else None
    out["assess_s_mean"] = statistics.fmean(r["assess_s"] for r in runs)
    out["wall_s_mean"] = statistics.fmean(r["wall_s"] for r in runs)
    return out


def render(doc: dict) -> str:
    a = doc["args"]
    lines = [f"# Validation vs assessment noise per trial (`jobs/assessment_noise.py`)", "",
             f"Generated {doc['when']}. MiniLM, one task per run, k={BASE['data.shots']} per class (validation: "
             f"{BASE['data.shots']} per class), {a['seeds']} seeds, {a['epochs']} epochs (patience "
             f"{BASE['train.patience']}), the smoke space's base config (8 private tokens, vocab init, prompt lr "
             f"{BASE['optim.prompt_lr']}), `data.assess_rows: auto`. Command: `{doc['command']}`.", "",
             "**The machine was shared**: 2 CPU cores used by other jobs and test runs at the same time, so every "
             "wall-clock second below is a loaded timing (an upper bound for this machine), not a speed result.", "",
             "Scores in points (accuracy x 100). `sampling SD`: binomial sqrt(p(1-p)/n) at the mean score and the "
             "split's rows; `rest`: sqrt(SD^2 - sampling^2), the seed/training spread (for validation also the "
             "optimism of the best epoch, a max over epochs).", "",
             "| task | score | rows | mean | SD across seeds | sampling SD | rest |", "|---|---|---:|---:|---:|---:|---:|"]
    for task, s in doc["tasks"].items():
        for key, label in (("val", "best_val_score (validation)"), ("assess", "assess_score"), ("test", "test_score")):
            x = s[key]
            lines.append(f"| {task} | {label} | {x['rows']} | {100 * x['mean']:.1f} | {100 * x['sd_across_seeds']:.1f} "
                         f"| {100 * x['sampling_sd']:.1f} | {100 * x['rest_sd']:.1f} |")
    lines += ["", "| task | validation - assessment (mean) | corr(val, assess) across seeds | assess_s per trial | wall per trial |",
              "|---|---:|---:|---:|---:|"]
    for task, s in doc["tasks"].items():
        corr = f"{s['corr_val_assess']:.2f}" if s["corr_val_assess"] is not None else "n/a"
        lines.append(f"| {task} | {100 * s['val_minus_assess']:+.1f} | {corr} | {s['assess_s_mean']:.1f} s | "
                     f"{s['wall_s_mean']:.1f} s |")
    lines += ["", "Per seed (points):", "", "| task | seed | val | assess | test | best epoch |", "|---|---:|---:|---:|---:|---:|"]
    for task, runs in doc["runs"].items():
        for r in runs:
            lines.append(f"| {task} | {r['seed']} | {100 * r['val']:.1f} | {100 * r['assess']:.1f} | "
                         f"{100 * r['test']:.1f} | {r['best_epoch']} |")
    c = doc.get("cost")
    if c:
        lines += ["", f"## Cost per trial: {'+'.join(c['tasks'])}, {a['epochs']} epochs, seeds {c['seeds']} (loaded machine)", "",
                  "| assess_rows | assessment rows | wall per trial (s) | CPU per trial (s) | assess_s (s) |",
                  "|---|---:|---:|---:|---:|"]
        for mode, runs in c["runs"].items():
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
            cpus = ", ".join(f"{r['cpu_s']:.1f}" for r in runs)
            assess = ", ".join(f"{r['assess_s']:.1f}" if r["assess_s"] is not None else "-" for r in runs)
            lines.append(f"| {mode} | {runs[0]['rows'].get('assess', 0)} | {walls} | {cpus} | {assess} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["rte"])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--cost-seeds", type=int, default=2, help="seeds of the 2-task cost runs (0: none)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="benchmarks/assessment_noise.json")
    ap.add_argument("--merge", action="store_true",
                    help="add this run's tasks and cost to the JSON at --out instead of starting it afresh")
    a = ap.parse_args()
    from crosspt.tasks.data import resolve_data_dir

    data_dir = resolve_data_dir(a.data_dir)
    out = Path(a.out)
    command = "python " + " ".join(sys.argv)
    if a.merge and out.is_file():
        doc = json.loads(out.read_text())
        doc["command"] += f"; then {command}"
    else:
        doc = {"args": vars(a), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": command, "base": BASE, "runs": {}, "tasks": {}}
    for task in a.tasks:
        runs = []
        for seed in range(a.seeds):
            runs.append(one_run([task], seed, a.epochs, "auto", data_dir))
            print(task, runs[-1], flush=True)
        doc["runs"][task], doc["tasks"][task] = runs, summarise(runs)
        out.write_text(json.dumps(doc, indent=1))            # what is done so far survives a stop
    if a.cost_seeds:
        pair = ["sst2", "rte"]
        cost = {"tasks": pair, "seeds": list(range(a.cost_seeds)), "runs": {"auto": [], "0": []}}
        for seed in range(a.cost_seeds):
            for mode in ("auto", 0):               # alternated, so load drifts hit both alike
                cost["runs"][str(mode)].append(one_run(pair, seed, a.epochs, mode, data_dir))
                print("cost", mode, cost["runs"][str(mode)][-1], flush=True)
        doc["cost"] = cost
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()

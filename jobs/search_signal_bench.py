"""TPE on a conditional space: Optuna's default TPE (what crosspt uses; in Optuna 5 multivariate, ungrouped),
`multivariate=True, group=True` (`search.tpe_group`) and the fully independent TPE (`multivariate=False`).

A synthetic objective over a space shaped like the paper's (`n_sources`, `top_k` when n_sources > 1, the
routing factors only where they act, a prompt lr), sampled through crosspt's own define-by-run walk
(`OptunaDefineByRun`, the liveness table included) and crosspt's sampler (`make_sampler`). The objective
is deterministic with a known optimum of 1.0, plus N(0, noise) per trial, so "trials to reach 0.97 of the
noiseless optimum" is measurable. Seeds 0-4 and, as a check, 5-9.

    python jobs/search_signal_bench.py --trials 60 --out benchmarks/search_signal.md
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import optuna

from crosspt.config.space import OptunaDefineByRun, SearchSpace
from crosspt.search.optuna_glue import make_sampler

SPACE = {
    "name": "synthetic",
    "base": {"tasks": ["sst2"], "backbone": {"name": "minilm"}, "prompt": {"private_len": 8, "source_bank": "random"}},
    "space": {
        "prompt.n_sources": {"type": "int", "low": 0, "high": 6},
        "prompt.top_k": {"type": "int", "low": 1, "high": "prompt.n_sources", "when": {"prompt.n_sources": ">1"}},
        "prompt.composition": {"type": "choice", "values": ["cat", "wavg"]},
        "prompt.temperature.start": {"type": "loguniform", "low": 0.5, "high": 10.0},
        "prompt.router_bias": {"type": "uniform", "low": 0.0, "high": 3.0},
        "optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 1.0},
        "optim.router_lr": {"type": "loguniform", "low": 1e-3, "high": 0.3},
    },
    "search": {"algorithm": "optuna", "seed": 0, "n_startup_trials": 8},
}


def objective_value(p: dict) -> float:
    """1.0 at n_sources=4, top_k=2, wavg, tau0 ~ 2, bias ~ 1, prompt_lr ~ 0.1, router_lr ~ 0.02; the
    routing factors only matter with sources (they are not sampled without them)."""
    n = p["prompt.n_sources"]
    v = 1.0 - 0.06 * abs(math.log(p["optim.prompt_lr"] / 0.1))
    v -= 0.05 * abs(n - 4)
    if n > 1:
        v -= 0.06 * abs(p["prompt.top_k"] - 2)
    if n > 0:
        v -= 0.04 * (p.get("prompt.composition") != "wavg")
        v -= 0.03 * abs(math.log(p["prompt.temperature.start"] / 2.0))
        v -= 0.02 * abs(p["prompt.router_bias"] - 1.0)
        v -= 0.03 * abs(math.log(p["optim.router_lr"] / 0.02))
    return v


def interacting_value(p: dict) -> float:
    """The same optimum, with the interactions a real search has: the best prompt lr depends on the
    composition (cat composes longer prompts), the best top_k on n_sources, the best tau0 on top_k."""
    n = p["prompt.n_sources"]
    comp = p.get("prompt.composition", "cat")
    lr_best = 0.1 if (n == 0 or comp == "wavg") else 0.01
    v = 1.0 - 0.08 * abs(math.log(p["optim.prompt_lr"] / lr_best)) - 0.05 * abs(n - 4)
    if n > 1:
        v -= 0.08 * abs(p["prompt.top_k"] - max(1, n // 2))
    if n > 0:
        k = p.get("prompt.top_k", 1)
        v -= 0.04 * (comp != "wavg")
        v -= 0.04 * abs(math.log(p["prompt.temperature.start"] / (0.5 * k + 1.0)))
        v -= 0.02 * abs(p["prompt.router_bias"] - 1.0)
        v -= 0.03 * abs(math.log(p["optim.router_lr"] / 0.02))
    return v


OBJECTIVES = {"separable": objective_value, "interacting": interacting_value}


def run(sampler, space: SearchSpace, trials: int, noise: float, seed: int, value=objective_value) -> list[float]:
    rng = np.random.default_rng(seed + 10_000)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    walk = OptunaDefineByRun(space, family="encoder")
    true = []
    for _ in range(trials):
        t = study.ask()
        walk(t)
        v = value(t.params)
        true.append(v)
        study.tell(t, v + rng.normal(0, noise))
    return true


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--noise", type=float, default=0.01)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seeds", type=int, default=10)
    a = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    variants = {
        "default (multivariate)": lambda sp: make_sampler(sp),
        "grouped (tpe_group)": lambda sp: make_sampler(sp.model_copy(update={"search": sp.search.model_copy(
            update={"tpe_group": True})})),
        "independent": lambda sp: optuna.samplers.TPESampler(seed=sp.search.seed, n_startup_trials=8,
                                                             multivariate=False),
    }
    ref = "default (multivariate)"
    lines = ["# TPE on a conditional space: Optuna's default vs grouped vs independent", "",
             f"`python jobs/search_signal_bench.py --trials {a.trials} --noise {a.noise} --target {a.target} "
             f"--seeds {a.seeds}`: synthetic objectives (optimum 1.0, N(0, {a.noise}) noise per trial) over a "
             f"CrossPT-shaped space (7 factors, `top_k` conditional on `n_sources`, the routing factors sampled "
             f"only where they act), through crosspt's define-by-run walk and `make_sampler`. `separable`: each "
             f"factor's best value is fixed; `interacting`: the best prompt lr depends on the composition, the "
             f"best top_k on n_sources, the best tau0 on top_k. Trials to reach {a.target} of the noiseless "
             f"optimum (runs that never reach it count as {a.trials + 1}), and the mean best true value after "
             f"20/40/{a.trials} trials. `default` is Optuna 5's TPESampler default (multivariate for one "
             f"objective, ungrouped), which crosspt used before and uses now. Every seed run is in the table; "
             f"paired differences by seed (same seed, same noise draws) with scipy's Wilcoxon signed-rank test.", ""]
    half = a.seeds // 2
    for obj, value in OBJECTIVES.items():
        rows = []
        for seed in range(a.seeds):
            space = SearchSpace.model_validate({**SPACE, "search": {**SPACE["search"], "seed": seed}})
            for name, make in variants.items():
                true = run(make(space), space, a.trials, a.noise, seed, value)
                best = np.maximum.accumulate(true)
                hit = next((i + 1 for i, b in enumerate(best) if b >= a.target), None)
                rows.append({"seed": seed, "tpe": name, "trials_to_target": hit, "best_at_20": best[19],
                             "best_at_40": best[39], "best_final": best[-1]})
                print(f"{obj} seed {seed} {name:<24} trials to {a.target}: {hit}  best@20 {best[19]:.4f}  "
                      f"best@40 {best[39]:.4f}  best@{a.trials} {best[-1]:.4f}", flush=True)
        lines += [f"## {obj}", "",
                  f"| seeds | TPE | trials to {a.target}: median (per seed) | not reached | best@20 | best@40 | "
                  f"best@{a.trials} |", "|---|---|---|---:|---:|---:|---:|"]
        for label, seeds in ((f"0-{half - 1} (tuned on)", range(half)), (f"{half}-{a.seeds - 1} (check)",
                                                                          range(half, a.seeds))):
            for name in variants:
                rs = [r for r in rows if r["tpe"] == name and r["seed"] in seeds]
                hits = [r["trials_to_target"] for r in rs]
                med = statistics.median([h if h is not None else a.trials + 1 for h in hits])
                lines.append(f"| {label} | {name} | {med:g} ({', '.join(str(h) if h else '-' for h in hits)}) | "
                             f"{sum(h is None for h in hits)} | {statistics.mean(r['best_at_20'] for r in rs):.4f} | "
                             f"{statistics.mean(r['best_at_40'] for r in rs):.4f} | "
                             f"{statistics.mean(r['best_final'] for r in rs):.4f} |")
        from scipy.stats import wilcoxon

        by = {(r["seed"], r["tpe"]): r for r in rows}
        lines.append("")
        for name in (n for n in variants if n != ref):
            for key, label in (("best_final", f"best@{a.trials}"), ("best_at_40", "best@40")):
                d = [by[(sd, name)][key] - by[(sd, ref)][key] for sd in range(a.seeds)]
                p = wilcoxon(d).pvalue if any(d) else 1.0
                lines.append(f"- {name} - default, {label}: mean {statistics.mean(d):+.4f}, better on "
                             f"{sum(x > 0 for x in d)} of {a.seeds} seeds, Wilcoxon p = {p:.3f}")
            hits = [(by[(sd, name)]["trials_to_target"] or a.trials + 1, by[(sd, ref)]["trials_to_target"]
                     or a.trials + 1) for sd in range(a.seeds)]
            lines.append(f"- {name} vs default, trials to {a.target}: fewer on {sum(g < i for g, i in hits)} seeds, "
                         f"more on {sum(g > i for g, i in hits)}, equal on {sum(g == i for g, i in hits)}")
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

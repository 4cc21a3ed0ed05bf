"""The router before/after table (issue "The router as the method means it") on the offline MiniLM.

    python jobs/router_table.py --data-dir ../shared/data --epochs 4 --out benchmarks/router.json

1. A source bank: one prompt-tuning run per source task (`--sources`, never a target), its private prompt
   kept (what `crosspt pretrain-sources` does, without Ray or MLflow, in this process);
2. every cell (`CELLS`) x seed: sst2 + rte + mrpc jointly, `--shots` per class, `data.max_test`, in-process
   `run_loop` on one shared frozen backbone and one k-shot sample per seed;
3. for one run, the router over training (temperature, mean training weight of the task's top candidate,
   its evaluation weight, per step) -> `--plot`.
Prints a Markdown table and writes every cell to `--out` (JSON).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crosspt.backbones.loader import load_for_config  # noqa: E402
from crosspt.config.schema import load_config  # noqa: E402
from crosspt.method import composition as C  # noqa: E402
from crosspt.run.artifacts import save_bank  # noqa: E402
from crosspt.run.inputs import load_source_bank, prepare_data  # noqa: E402
from crosspt.run.loop import LocalSession, run_loop  # noqa: E402
from crosspt.run.model import build_model  # noqa: E402
from crosspt.tasks.metrics import primary_metric  # noqa: E402

TARGETS = ["sst2", "rte", "mrpc"]
OLD = {"prompt.normalization": "gate_softmax", "prompt.temperature.schedule": "step"}     # main before the fix
NEW = {"prompt.normalization": "noisy_topk", "prompt.temperature.schedule": "exp"}       # the new defaults
CROSSPT = {"prompt.router": "task", "prompt.top_k": 2}
# (cell name, overrides): CrossPT cat/wavg under the old and new normalisation; ATTEMPT as it was (the
# gated attention router through the old normalisation, what `router: attention` meant) and as published
CELLS = [
    ("crosspt cat / old norm", {**CROSSPT, "prompt.composition": "cat", **OLD}),
    ("crosspt cat / new norm", {**CROSSPT, "prompt.composition": "cat", **NEW}),
    ("crosspt wavg / old norm", {**CROSSPT, "prompt.composition": "wavg", **OLD}),
    ("crosspt wavg / new norm", {**CROSSPT, "prompt.composition": "wavg", **NEW}),
    ("attempt old (attention_gated)", {"prompt.router": "attention_gated", "prompt.composition": "wavg", **OLD}),
    ("attempt faithful (attention)", {"prompt.router": "attention", "prompt.composition": "wavg"}),
]


def base(args, **over) -> dict:
    return {"tasks": TARGETS, "backbone.name": "minilm", "data.data_dir": args.data_dir, "data.shots": args.shots,
            "data.max_test": args.max_test, "backbone.max_length": args.max_length, "prompt.n_sources": 2, "prompt.source_len": args.length,
            "prompt.private_len": args.length, "optim.router_lr": args.router_lr, "train.epochs": args.epochs,
            "train.batch_size": 8, "train.patience": None, "train.checkpoint_every": args.epochs, **over}


def pretrain_bank(args, backbone_for, workdir: Path) -> Path:
    """One prompt-tuning run per source task (seed 0); the bank holds their private prompts."""
    prompts = []
    for task in args.sources:
        cfg = load_config(None, {**base(args), "tasks": [task], "prompt.n_sources": 0, "data.shots": args.source_shots,
                                 "data.max_test": 64, "train.epochs": args.source_epochs})
        tasks, splits = prepare_data(cfg)
        model = build_model(cfg, tasks, backbone=backbone_for(cfg, tasks))
        result = run_loop(cfg, LocalSession(workdir / f"src_{task}"), model=model, splits=splits)
        print(f"source {task}: test {result['test_score']:.4f}", flush=True)
        prompts.append(model.prompt.private.prompts.detach()[0].clone())
    return save_bank(workdir / "bank.safetensors", torch.stack(prompts), backbone="minilm", tasks=list(args.sources))


class RouterTrace:
    """Forward hook on the prompt module: per training step, the temperature, the mean training weight of
    each example's top candidate (argmax of its task's evaluation weights) and that evaluation weight."""

    def __init__(self, prompt):
        self.prompt, self.rows = prompt, []
        prompt.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        if not module.training:
            return
        ids, weights = inputs[0], output[2].detach()
        s = module.spec
        evalw = C.eval_weights(module.router.logits.detach(), s.top_k, s.normalization)[ids]      # [B, n_cand]
        top = evalw.argmax(-1, keepdim=True)
        self.rows.append({"step": int(module.step), "temperature": module.temperature,
                          "train_top": float(weights.gather(1, top).mean()),
                          "eval_top": float(evalw.gather(1, top).mean())})


def run_cell(args, over: dict, seed: int, bank: Path, backbone_for, splits_for, workdir: Path, trace: bool):
    cfg = load_config(None, {**base(args), **over, "seed": seed, "prompt.source_bank": str(bank)})
    tasks, splits = splits_for(cfg)
    backbone = backbone_for(cfg, tasks)
    model = build_model(cfg, tasks, backbone=backbone, bank=load_source_bank(cfg, backbone.embed_dim, tasks))
    tracer = RouterTrace(model.prompt) if trace else None
    t0 = time.time()
    result = run_loop(cfg, LocalSession(workdir / f"run_{seed}_{abs(hash(str(over)))}"), model=model, splits=splits)
    per_task = {t: result["metrics"][t]["test"] for t in TARGETS}
    return {"seed": seed, "test_score": result["test_score"], "per_task": per_task, "best_epoch": result["best_epoch"],
            "wall_s": round(time.time() - t0, 1), "router_weights": result["router_weights"]}, tracer


def plot(traces: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_w) = plt.subplots(1, 2, figsize=(9, 3.2))
    for (name, rows), color in zip(traces.items(), ("tab:red", "tab:blue")):
        steps = [r["step"] for r in rows]
        ax_t.plot(steps, [r["temperature"] for r in rows], color=color, label=name)
        ax_w.plot(steps, [r["train_top"] for r in rows], color=color, alpha=0.6, label=f"{name}: training")
        ax_w.plot(steps, [r["eval_top"] for r in rows], color=color, ls="--", label=f"{name}: evaluation")
    ax_t.set(xlabel="step", ylabel="temperature", yscale="log", title="temperature")
    ax_w.set(xlabel="step", ylabel="weight", ylim=(0, 1.02), title="weight of the top candidate")
    ax_t.legend(fontsize=7)
    ax_w.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--max-test", type=int, default=500)
    p.add_argument("--max-length", type=int, default=64, help="backbone.max_length (tokens)")
    p.add_argument("--length", type=int, default=8, help="source and private prompt length")
    p.add_argument("--router-lr", type=float, default=0.1)
    p.add_argument("--sources", nargs="+", default=["qnli", "cola"])
    p.add_argument("--source-shots", type=int, default=64)
    p.add_argument("--source-epochs", type=int, default=3)
    p.add_argument("--out", default="benchmarks/router.json")
    p.add_argument("--plot", default="benchmarks/router_weights.png")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    backbones, splits = {}, {}

    def backbone_for(cfg, tasks):               # one frozen MiniLM per task list, shared by every run
        key = tuple(t.name for t in tasks)
        if key not in backbones:
            backbones[key] = load_for_config(cfg, tasks)
        return backbones[key]

    def splits_for(cfg):                        # one k-shot sample per seed, shared by every cell
        if cfg.seed not in splits:
            splits[cfg.seed] = prepare_data(cfg)
        return splits[cfg.seed]

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bank = pretrain_bank(args, backbone_for, work)
        cells, traces = {name: [] for name, _ in CELLS}, {}
        for seed in args.seeds:                 # seeds outside: a cut-short table has every cell
            for name, over in CELLS:
                trace = seed == args.seeds[0] and name.startswith("crosspt cat")
                row, tracer = run_cell(args, over, seed, bank, backbone_for, splits_for, work, trace)
                cells[name].append(row)
                if tracer is not None:
                    traces[name] = tracer.rows
                print(f"{name} seed {seed}: test {row['test_score']:.4f} ({row['wall_s']} s)", flush=True)
                write(args, cells, traces, t0)         # after every run: a cut-short table keeps what ran
    plot(traces, Path(args.plot))
    print(table(cells))
    return 0


def write(args, cells: dict, traces: dict, t0: float) -> None:
    overrides = dict(CELLS)
    out = {"args": vars(args), "cells": {n: {"overrides": overrides[n], "runs": runs} for n, runs in cells.items()},
           "traces": traces, "wall_s": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1))


def table(cells: dict[str, list[dict]]) -> str:
    lines = ["| cell | " + " | ".join(f"{t} ({primary_metric(t)})" for t in TARGETS)
             + " | test score (mean ± sd) | per seed | best epoch per seed |", "|---" * (len(TARGETS) + 4) + "|"]
    for name, runs in cells.items():
        per_task = [statistics.mean(r["per_task"][t][primary_metric(t)] for r in runs) for t in TARGETS]
        scores = [r["test_score"] for r in runs]
        sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in per_task)
                     + f" | {statistics.mean(scores):.4f} ± {sd:.4f} | " + ", ".join(f"{s:.4f}" for s in scores)
                     + " | " + ", ".join(str(r["best_epoch"]) for r in runs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

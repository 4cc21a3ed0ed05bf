"""A trained run's prompt against no prompt at all, row by row on one task's whole dev split
(benchmarks/decoder.md, "The README command"): ranked and generated accuracy of each, the paired difference with
a 95% BCa bootstrap interval over rows (scipy) and McNemar's exact test (statsmodels).

    python -m benchmarks.prompt_vs_zero_shot --run-dir RUN_OUTPUT_DIR --task sst2

RUN_OUTPUT_DIR is a `crosspt train --output-dir`: its config.yaml and the checkpoint of its best epoch
(`result.json`'s best_epoch; `--epoch` to name another)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from scipy.stats import bootstrap
from statsmodels.stats.contingency_tables import mcnemar

from crosspt.bench.prompts import EmptyPrompt
from crosspt.config.schema import load_config
from crosspt.run.model import CrossPTModel, build_model
from crosspt.tasks.data import load_split, resolve_data_dir
from crosspt.tasks.specs import get_task


def predictions(model: CrossPTModel, rows, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(ranked, generated) predictions of `model` on `rows`, one pass a batch."""
    ranked, generated = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            r, g = model.predict_ranked_and_generated(model.backbone.collate(rows[i:i + batch_size], train=False))
            ranked += r.tolist()
            generated += g.tolist()
    return np.array(ranked), np.array(generated)


def paired(trained: np.ndarray, zero: np.ndarray, labels: np.ndarray) -> dict:
    a, b = (trained == labels).astype(float), (zero == labels).astype(float)
    ci = bootstrap((a - b,), np.mean, confidence_level=0.95, n_resamples=10000, random_state=0,
                   method="BCa").confidence_interval
    table = [[int((a * b).sum()), int((a * (1 - b)).sum())], [int(((1 - a) * b).sum()), int(((1 - a) * (1 - b)).sum())]]
    return {"trained": a.mean(), "zero_shot": b.mean(), "diff": (a - b).mean(), "lo": ci.low, "hi": ci.high,
            "mcnemar_p": mcnemar(table, exact=True).pvalue, "table": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--task", required=True)
    ap.add_argument("--epoch", type=int, help="the checkpoint to read (default: the run's best epoch)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(str(a.run_dir / "config.yaml"), {})
    ckpts = sorted((a.run_dir / "checkpoints").glob("epoch_*"))
    epoch = a.epoch if a.epoch is not None else json.loads((ckpts[-1] / "result.json").read_text())["best_epoch"]
    task = get_task(a.task)
    model = build_model(cfg, [task]).eval()
    state = load_file(str(a.run_dir / "checkpoints" / f"epoch_{epoch:04d}" / "prompts.safetensors"))
    model.load_trainable_state({k: state[k] for k in model.trainable_state()})
    zero = CrossPTModel(EmptyPrompt(1, model.backbone.embed_dim), model.backbone).eval()
    rows = load_split(task, "dev", resolve_data_dir(cfg.data.data_dir))
    labels = np.array([ex.label for ex in rows])
    trained, none = predictions(model, rows), predictions(zero, rows)
    print(f"{a.task}: {len(rows)} dev rows, the prompt of epoch {epoch} against no prompt")
    for i, name in enumerate(("ranked", "generated")):
        print(name, json.dumps(paired(trained[i], none[i], labels)))


if __name__ == "__main__":
    main()

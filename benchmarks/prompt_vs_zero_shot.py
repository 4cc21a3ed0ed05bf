"""A trained run's prompt against no prompt at all, row by row on one task's whole dev split
(benchmarks/decoder.md, "The README command"): ranked and generated accuracy of each, the paired difference with
a 95% BCa bootstrap interval over rows (scipy) and McNemar's exact test (statsmodels).

    python -m benchmarks.prompt_vs_zero_shot --run-dir RUN_OUTPUT_DIR --task sst2

RUN_OUTPUT_DIR is a `crosspt train --output-dir`: its config.yaml and the best epoch's prompts, which its last
checkpoint holds (`prompts.safetensors`; `--epoch N`: the trainable state that epoch N's checkpoint holds)."""
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
from crosspt.run.checkpoint import BEST_FILE, RESULT_FILE, STATE_FILE
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


def prompts_to_read(run_dir: Path, epoch: int | None = None) -> tuple[int, Path]:
    """(epoch, safetensors file) of a run's trained prompts: by default its best epoch's, which its LAST
    checkpoint holds (every checkpoint's `prompts.safetensors` is the best so far; the best epoch's own folder
    may be gone, since a run keeps its last two checkpoints, and epoch -1 never has one); else the trainable
    state that epoch `epoch`'s checkpoint holds."""
    if epoch is not None:
        return epoch, run_dir / "checkpoints" / f"epoch_{epoch:04d}" / STATE_FILE
    last = sorted((run_dir / "checkpoints").glob("epoch_*"))[-1]
    return json.loads((last / RESULT_FILE).read_text())["best_epoch"], last / BEST_FILE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--task", required=True)
    ap.add_argument("--epoch", type=int, help="the checkpoint to read (default: the run's best epoch)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(str(a.run_dir / "config.yaml"), {})
    epoch, path = prompts_to_read(a.run_dir, a.epoch)
    task = get_task(a.task)
    model = build_model(cfg, [task]).eval()
    state = load_file(str(path))
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

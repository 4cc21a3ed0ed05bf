"""Zero-shot and untrained-prompt scores of a decoder on dev rows, per template (benchmarks/decoder.md).

    python jobs/decoder_zero_shot.py --backbone smollm2 --tasks sst2,rte --rows 500 --templates plain,chat

For each task and template: ranked and generated accuracy of the frozen model with no soft prompt
(zero-shot), and with the untrained soft prompt a run would start from (`--init`, default the family's
`auto`; `--prompt-len` tokens), i.e. the step -1 evaluation. `--rows` dev rows per task (`select_test_examples`,
seed 0; all when the split is smaller). Prints one Markdown row per (task, template) with the wall.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crosspt.bench.prompts import EmptyPrompt  # noqa: E402
from crosspt.backbones.loader import load_for_config  # noqa: E402
from crosspt.config.schema import load_config  # noqa: E402
from crosspt.run.model import CrossPTModel, build_model, resolve_init  # noqa: E402
from crosspt.tasks.data import load_split, resolve_data_dir, select_test_examples  # noqa: E402
from crosspt.tasks.metrics import compute_metrics, primary_metric  # noqa: E402
from crosspt.tasks.specs import get_task  # noqa: E402


def scores(model: CrossPTModel, task, rows, batch_size: int) -> tuple[float, float]:
    """(ranked, generated) primary metric of `model` on `rows` (one pass each batch)."""
    ranked, generated = [], []
    for i in range(0, len(rows), batch_size):
        batch = model.backbone.collate(rows[i:i + batch_size], train=False)
        r, g = model.predict_ranked_and_generated(batch)
        ranked += r.tolist()
        generated += g.tolist()
    labels = [ex.label for ex in rows]
    metric = primary_metric(task)
    return (compute_metrics(task, ranked, labels)[metric], compute_metrics(task, generated, labels)[metric])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--tasks", default="sst2,rte")
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--templates", default="plain,chat")
    ap.add_argument("--init", default="auto")
    ap.add_argument("--init-templates", default="chat",
                    help="templates whose untrained prompt is scored too (the others: zero-shot only)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print("| task | template | rows | zero-shot ranked | zero-shot generated | init | untrained prompt ranked "
          "| untrained prompt generated | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in a.tasks.split(","):
        task = get_task(name)
        rows = select_test_examples(load_split(task, "dev", resolve_data_dir()), task.name, a.rows)
        for template in a.templates.split(","):
            t0 = time.time()
            cfg = load_config(None, [f"backbone.name={a.backbone}", f"backbone.template={template}",
                                     f"tasks=[{task.name}]", f"prompt.init={a.init}",
                                     f"prompt.private_len={a.prompt_len}"])
            bb = load_for_config(cfg, [task])
            zero = scores(CrossPTModel(EmptyPrompt(1, bb.embed_dim), bb), task, bb.by_length(rows), a.batch_size)
            init, start = "-", (float("nan"), float("nan"))
            if bb.template in a.init_templates.split(","):
                init = f"{resolve_init(cfg, bb)} ({a.prompt_len})"
                start = scores(build_model(cfg, [task], backbone=bb), task, bb.by_length(rows), a.batch_size)
            print(f"| {task.name} | {bb.template} | {len(rows)} | {100 * zero[0]:.1f} | {100 * zero[1]:.1f} | "
                  f"{init} | {100 * start[0]:.1f} | {100 * start[1]:.1f} | {time.time() - t0:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()

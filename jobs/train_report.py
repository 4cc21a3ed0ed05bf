"""Issue-3 numbers: `crosspt train` per task and seed on the offline MiniLM, next to the untrained baseline.

    python jobs/train_report.py --tasks sst2,rte,qnli,stsb --seeds 0,1,2 --data-dir ../shared/data

For each task: the majority-class rate and the untrained (empty prompt) score of the same backbone on the
same test rows, then one training run per seed (test metric, best epoch, wall time). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crosspt.config.schema import load_config, parse_value  # noqa: E402
from crosspt.tasks.specs import get_task  # noqa: E402
from crosspt.tasks.metrics import compute_metrics, primary_metric  # noqa: E402
from crosspt.run.trainer import train  # noqa: E402
from crosspt.run.inputs import prepare_data  # noqa: E402


def untrained(cfg, task_name: str) -> tuple[dict, float]:
    """Empty prompt, no training: label scoring / bi-encoder cosine of the frozen backbone alone."""
    from crosspt.backbones.loader import load_for_config

    tasks, splits = prepare_data(cfg)
    bb = load_for_config(cfg, tasks)
    test = splits[task_name]["test"]
    preds = []
    with torch.no_grad():
        for i in range(0, len(test), 64):
            batch = bb.collate(test[i:i + 64], train=False)
            empty = torch.zeros(len(test[i:i + 64]), 0, bb.embed_dim)
            preds += bb.predict(empty, torch.zeros(len(test[i:i + 64]), 0, dtype=torch.long), batch).tolist()
    task = tasks[0]
    labels = [e.label for e in test]
    majority = Counter(labels).most_common(1)[0][1] / len(labels) if not task.is_regression else float("nan")
    return compute_metrics(task, preds, labels), majority


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="sst2,rte,qnli,stsb")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--max-test", type=int, default=None, help="cap the dev split (seeded subset)")
    p.add_argument("--out", default="benchmarks/train_report.json")
    args = p.parse_args()
    rows, raw = [], {}
    for task in args.tasks.split(","):
        over = {"tasks": [task], "data.data_dir": str(Path(args.data_dir).resolve()), "scaling.in_process": True,
                "data.max_test": args.max_test}
        sets = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.overrides)}
        cfg0 = load_config(None, {**over, "seed": 0, **sets})
        base, majority = untrained(cfg0, task)
        key = primary_metric(get_task(task))
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = load_config(None, {**over, "seed": seed, **sets})
            t0 = time.time()
            r = train(cfg, output_dir=f"/tmp/crosspt_train_report/{task}-{seed}")
            test = r["metrics"][task]["test"]
            runs.append({"seed": seed, "test": test, "best_epoch": r["best_epoch"], "wall_s": time.time() - t0})
            print(f"{task} seed {seed}: {json.dumps(test)} best_epoch {r['best_epoch']} wall {time.time() - t0:.0f}s",
                  flush=True)
        vals = [x["test"][key] if key in x["test"] else x["test"].get("spearman") for x in runs]
        raw[task] = {"untrained": base, "majority": majority, "runs": runs, "metric": key}
        rows.append((task, key, majority, base, vals, statistics.mean(x["wall_s"] for x in runs)))
    print("\n| task | metric | majority | untrained | per seed | mean ± std | wall/run |")
    print("|---|---|---|---|---|---|---|")
    for task, key, maj, base, vals, wall in rows:
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        bval = base.get(key)
        extra = f" (spearman {base['spearman']:.4f})" if "spearman" in base else ""
        print(f"| {task} | {key} | {maj:.4f} | {bval:.4f}{extra} | {', '.join(f'{v:.4f}' for v in vals)} | "
              f"{statistics.mean(vals):.4f} ± {sd:.4f} | {wall:.0f}s |")
    for task in raw:
        if "spearman" in raw[task]["untrained"]:
            sp = [r["test"]["spearman"] for r in raw[task]["runs"]]
            print(f"{task} spearman: untrained {raw[task]['untrained']['spearman']:.4f}, trained "
                  f"{statistics.mean(sp):.4f} ({', '.join(f'{v:.4f}' for v in sp)})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()

"""What people read from a benchmark: markdown tables, the verdict, notes on the protocol, the bar
chart, and the MLflow experiment (a parent run and one child per selected run)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from crosspt.bench.methods import CROSSPT_METHODS, LABELS, Method, spec_of

if TYPE_CHECKING:
    from crosspt.bench.settings import BenchSettings


def _label(m: str) -> str:
    return LABELS.get(m, m)


def _fmt(c: dict | None, scale: float = 100.0) -> str:
    if not c:
        return "n/a"
    return f"{c['mean'] * scale:.1f} ± {c['std'] * scale:.1f}"


def format_table(table: dict, na: dict[str, str] | None = None) -> str:
    """Markdown: one row per (task, method), one column per k, then an average row per method."""
    na = na or {}
    shots = table["shots"]
    head = "| task | method | " + " | ".join(f"k={k}" for k in shots) + " |"
    lines = [head, "|" + "---|" * (2 + len(shots))]
    for t in table["tasks"]:
        for m in table["methods"]:
            vals = [_fmt(table["cells"].get(f"{m}|{t}|{k}")) for k in shots]
            if m in na and all(v == "n/a" for v in vals):
                vals = [f"n/a: {na[m]}"] * len(shots)
            lines.append(f"| {t} | {_label(m)} | " + " | ".join(vals) + " |")
    for m in table["methods"]:
        vals = [_fmt(table["avg"].get(f"{m}|{k}")) for k in shots]
        lines.append(f"| **avg** | {_label(m)} | " + " | ".join(f"**{v}**" for v in vals) + " |")
    return "\n".join(lines)


def format_compact(table: dict) -> str:
    """Markdown: methods x tasks (+ avg), one block per k (means only)."""
    out = []
    for k in table["shots"]:
        out.append(f"k={k} | " + " | ".join(table["tasks"]) + " | avg")
        out.append("---|" * (len(table["tasks"]) + 2))
        for m in table["methods"]:
            row = [table["cells"].get(f"{m}|{t}|{k}") for t in table["tasks"]]
            a = table["avg"].get(f"{m}|{k}")
            cells = " | ".join(f"{c['mean'] * 100:.1f}" if c else "n/a" for c in row)
            out.append(f"{_label(m)} | {cells} | " + (f"{a['mean'] * 100:.1f}" if a else "n/a"))
        out.append("")
    return "\n".join(out)


def notes(s: BenchSettings) -> list[str]:
    """The protocol in sentences: what is the same for every method, and what each method does."""
    from crosspt.tasks.metrics import primary_metric

    cap = f"capped at {s.max_test} examples (seeded subset, the same for every seed and method)" \
        if s.max_test else "uncapped"
    return [
        f"backbone {s.backbone} (frozen), max_length {s.max_length}; prompt length {s.prompt_len} for every "
        f"prompt (PT / PEFT virtual tokens / each source / private); CrossPT cat composes "
        f"(n_sources+1)x{s.prompt_len} tokens, wavg and ATTEMPT-style {s.prompt_len}",
        f"test = official GLUE dev split, {cap}; train/val = k-shot samples per class from the train split "
        f"(val disjoint, also k per class; stsb: 2k examples), identical uids for every method at the same seed",
        "score = primary metric x100: " + ", ".join(f"{t}={primary_metric(t)}" for t in s.tasks)
        + " (combined = mean of f1/acc or pearson/spearman)",
        f"budget per run: {s.epochs} epochs, batch {s.batch_size}, early stopping patience {s.patience} on val; "
        f"learning-rate grid {s.lrs} over each method's own prompt lr (PEFT: all its prompt parameters; "
        f"encoder heads share it), picked per (method, task, k, seed) by best validation score; router lr "
        f"fixed at {s.router_lr}",
        "zero-shot: no training, empty prompt, label sentences of the task (encoder) / label words",
        f"sources: one single-task PT prompt per task of {s.source_tasks} per seed at k={s.src_k()} (best lr by val); "
        f"each target's bank leaves the target out",
        "SPoT: the source whose prompt scores best on the target's validation split untrained initialises the "
        "target prompt (prompt.init=source with that 1-source bank), then PT",
        "ATTEMPT-style: attention router (input-conditioned) over the leave-one-out sources + private, wavg",
        "MPT: PEFT MultitaskPromptTuning, source stage (RANDOM init, multi-task over the leave-one-out sources, "
        f"k={s.src_k()}, best lr by mean source val), target stage AVERAGE_SOURCE_TASKS; PEFT's "
        "MultitaskPromptEmbedding is called with the task ids (PEFT's FEATURE_EXTRACTION forward would not "
        "pass them to get_prompt) and on the encoder its prompt goes before [CLS] as that forward puts it",
        "PEFT PT (encoder): PEFT's PromptEmbedding (SAMPLE_VOCAB init) placed as PeftModelForFeatureExtraction "
        "places it, virtual tokens before [CLS] with position ids left to the model, mean-pooled over the real "
        "tokens and scored like our encoder family (our PT puts its prompt after the input with mask-derived "
        "position ids)",
        "mean ± std over seeds (sample std, ddof=1); avg row: mean over tasks per seed, then mean ± std over seeds",
    ]


def verdict(table: dict) -> list[str]:
    """Plain statements: does CrossPT beat PT (ours) on the average, per k?"""
    out = []
    for k in table["shots"]:
        pt = table["avg"].get(f"{Method.PT}|{k}")
        for m in CROSSPT_METHODS:
            c = table["avg"].get(f"{m}|{k}")
            if not (pt and c):
                continue
            d = (c["mean"] - pt["mean"]) * 100
            beats = "beats" if d > 0 else "does NOT beat"
            within = " (within one std over seeds)" if abs(d) <= max(c["std"], pt["std"]) * 100 else ""
            out.append(f"k={k}: {_label(m)} {beats} PT (ours) on the average: {c['mean'] * 100:.1f} vs "
                       f"{pt['mean'] * 100:.1f} ({d:+.1f} points){within}")
        at_k = [(key.split("|")[0], a) for key, a in table["avg"].items() if key.endswith(f"|{k}")]
        if at_k:
            m, a = max(at_k, key=lambda x: x[1]["mean"])
            out.append(f"k={k}: best average: {_label(m)} {a['mean'] * 100:.1f}")
    return out


def _lr_pick_lines(selected: list[dict]) -> list[str]:
    """How many cells each method's selection by validation gave to each lr."""
    picks: dict[str, Counter] = {}
    for r in selected:
        picks.setdefault(r["method"], Counter())[str(r["lr"])] += 1
    return [f"- {_label(m)}: " + ", ".join(f"lr {lr}: {n}" for lr, n in sorted(v.items())) for m, v in picks.items()]


def _estimate_lines(est: dict) -> list[str]:
    return ["", f"Full-mode estimate (6 tasks, k=16/32, 3 seeds, 3 lrs, 20 epochs, max_length 128, max_test 1000): "
            f"{est['jobs']} jobs, about {est['est_s_sequential'] / 3600:.1f} h sequential on this machine "
            f"(/ N with --parallel N on N free cores; test-size x{est['test_ratio']:.1f}, "
            f"epoch-cost x{est['epoch_ratio']:.1f} vs this run)"]


def render_report(summary: dict, name: str) -> str:
    s = summary["settings"]
    table = summary["table"]
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in summary["phase_wall_s"].items())
    lines = [f"# Few-shot benchmark `{name}`", "",
             f"tasks {s['tasks']}, k={s['shots']}, seeds {s['seeds']}, methods {s['methods']}; "
             f"wall {summary['wall_s']:.0f}s ({phases}), {len(summary['runs'])} runs", "",
             "Test score (x100), mean ± std over seeds, lr picked per cell by validation:", "",
             format_table(table), "", "Compact (means):", "", "```", format_compact(table).rstrip(), "```", "",
             "Verdict:", ""]
    lines += [f"- {v}" for v in verdict(table)]
    lines += ["", "Chosen learning rates (cells per lr):", ""] + _lr_pick_lines(summary["selected"])
    picked = [r for r in summary["selected"] if spec_of(r["method"]).picks_source]
    if picked:
        lines += ["", "SPoT source picked: " + ", ".join(f"{r['task']}/k{r['k']}/s{r['seed']}<-{r['spot_source']}"
                                                         for r in picked)]
    if summary.get("banks"):
        lines += ["", f"Source banks (single-task PT prompts, k={summary['source_shots']}): "
                  + ", ".join(summary["banks"].values())]
    if summary.get("full_estimate"):
        lines += _estimate_lines(summary["full_estimate"])
    lines += ["", "Notes:", ""] + [f"- {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"


def bar_chart(table: dict, path: str | Path, title: str = "few-shot benchmark: average test score") -> Path:
    """A PNG: per method, one bar per k of its average test score (x100) with the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, shots = table["methods"], table["shots"]
    width = 0.8 / max(1, len(shots))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods), 3.8))
    for i, k in enumerate(shots):
        cs = [table["avg"].get(f"{m}|{k}") for m in methods]
        xs = [j + (i - (len(shots) - 1) / 2) * width for j in range(len(methods))]
        ax.bar(xs, [c["mean"] * 100 if c else 0 for c in cs], width, yerr=[c["std"] * 100 if c else 0 for c in cs],
               capsize=3, label=f"k={k}")
        for x, c in zip(xs, cs):
            if c:
                ax.text(x, c["mean"] * 100 + 0.5, f"{c['mean'] * 100:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(methods)), [_label(m) for m in methods], rotation=25, ha="right", fontsize=8)
    lows = [c["mean"] * 100 - c["std"] * 100 for c in table["avg"].values()]
    if lows:
        ax.set_ylim(bottom=max(0.0, min(lows) - 10))
    ax.set_ylabel("avg test score (x100)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _table_metrics(summary: dict) -> dict[str, float]:
    """The parent run's metrics: every average (mean and std) and every cell mean, and the wall time."""
    metrics = {}
    for key, c in summary["table"]["avg"].items():
        m, k = key.split("|")
        metrics[f"avg_{m}_k{k}"] = c["mean"]
        metrics[f"avg_{m}_k{k}_std"] = c["std"]
    for key, c in summary["table"]["cells"].items():
        m, t, k = key.split("|")
        metrics[f"{m}_{t}_k{k}"] = c["mean"]
    metrics["wall_s"] = summary["wall_s"]
    return metrics


def _log_selected_run(c, exp_id: str, parent_id: str, r: dict, targets: list[str]) -> None:
    """One child run of the parent: a selected (method, task, k, seed) with its lr and scores."""
    from crosspt.registry import run_log

    ch = c.create_run(exp_id, run_name=f"{r['method']}-{r['task']}-k{r['k']}-s{r['seed']}",
                      tags={"mlflow.parentRunId": parent_id, "crosspt.method": r["method"],
                            "crosspt.role": "target" if r["task"] in targets else "source"})
    run_log.log_params(c, ch.info.run_id, {
        "method": r["method"], "task": r["task"], "k": r["k"], "seed": r["seed"], "lr": r["lr"],
        **({"spot_source": r["spot_source"]} if "spot_source" in r else {})})
    run_log.log_metrics(c, ch.info.run_id, {
        "val_score": r["val"], "test_score": r["test"], "epochs_run": r["epochs_run"], "best_epoch": r["best_epoch"],
        "wall_s": r["wall_s"], "trainable_params": r["trainable_params"]})
    c.set_terminated(ch.info.run_id, "FINISHED")


def start_benchmark_run(summary: dict, *, tracking_uri: str | None, experiment: str, kind: str, default_name: str):
    """A benchmark's parent run, its settings logged as `bench.*` params -> (client, uri, experiment id,
    run id). Shared by the few-shot and the standard benchmark."""
    from crosspt.registry import experiments, run_log, store

    uri = store.resolve_tracking_uri(tracking_uri)
    store.check_reachable(uri)
    exp_id = experiments.ensure_experiment(uri, experiment)
    c = store.client(uri)
    run = c.create_run(exp_id, run_name=summary.get("name", default_name), tags={"crosspt.benchmark": kind})
    pid = run.info.run_id
    run_log.log_params(c, pid, {f"bench.{k}": (",".join(map(str, v)) if isinstance(v, list) else v)
                                for k, v in summary["settings"].items()})
    return c, uri, exp_id, pid


def log_to_mlflow(summary: dict, text: str, files: dict[str, Path], *, tracking_uri: str | None,
                  experiment: str) -> dict:
    """One experiment: a parent run (params, average metrics, table, JSON, bar chart) and one child run
    per selected (method, task, k, seed)."""
    from crosspt.registry import run_log

    c, uri, exp_id, pid = start_benchmark_run(summary, tracking_uri=tracking_uri, experiment=experiment,
                                              kind="fewshot", default_name="benchmark")
    s = summary["settings"]
    run_log.log_metrics(c, pid, _table_metrics(summary))
    c.log_text(pid, text, "table.md")
    for path in files.values():
        c.log_artifact(pid, str(path))
    for r in summary["selected"]:
        _log_selected_run(c, exp_id, pid, r, s["tasks"])
    c.set_terminated(pid, "FINISHED")
    return {"tracking_uri": uri, "experiment": experiment, "experiment_id": exp_id, "run_id": pid}

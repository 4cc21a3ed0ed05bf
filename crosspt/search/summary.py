"""The end of a search: every trial's outcome, the best one, the parent run's record and the printed summary."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from crosspt.config.space import SearchSpace
from crosspt.registry import best_run, experiments, run_log, ui_view


_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?([A-Z]\w*(?:Error|Exception|Diverged|Fault|NotRetried|Exit)\b.*)$")


def error_line(err: Any) -> str:
    """The line of a (Ray-wrapped) trial error that names the exception: `TrainingDiverged: loss ...`."""
    text = str(err or "").strip()
    if not text:
        return ""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for line in reversed(lines):
        m = _ERROR_LINE.match(line)
        if m and not m.group(1).startswith(("RayTaskError", "TuneError", "RayActorError(")):
            return m.group(1)[:300]
    return lines[-1][:300]


def _trial_id_of(path: str | None, trials: list) -> str:
    name = Path(path or "").name
    return next((t.trial_id for t in trials if t.trial_id and f"_{t.trial_id}_" in f"_{name}_"), "")


def summarize(results, space: SearchSpace, trials: list | None = None) -> dict:
    """Every trial (name, status, params, metrics). The best one is not picked here: `log_parent` takes it from
    the one best-run rule (`registry.best_run`), on the trials' child runs."""
    obj = space.objective
    names = {t.trial_id: str(t) for t in trials or [] if t.trial_id}
    rows = []
    for r in results:
        m = r.metrics or {}
        tid = m.get("trial_id") or _trial_id_of(getattr(r, "path", None), trials or [])
        rows.append({
            "trial_id": tid,
            "trial": names.get(tid) or tid,
            "status": "ERROR" if r.error else ("FINISHED" if m.get("final_epoch") else "STOPPED"),
            "epochs": m.get("training_iteration", 0),
            obj.metric: m.get(obj.metric),
            "test_score": m.get("test_score"),
            "params": {k: v for k, v in (r.config or {}).items()},
            "error": error_line(r.error) if r.error else "",
        })
    return {"trials": rows, "best": None, "num_trials": len(rows),
            "num_failed": sum(x["status"] == "ERROR" for x in rows),
            "num_stopped": sum(x["status"] == "STOPPED" for x in rows)}


NOTE_TAG = "mlflow.note.content"         # the run's description in the MLflow UI (markdown)


def parent_note(space: SearchSpace, summary: dict | None = None) -> str:
    """The parent run's description: what was searched, on what budget, and (once known) the best trial."""
    def factor(key: str, p) -> str:
        rng = f"{p.values}" if p.type == "choice" else f"[{p.low}, {p.high}]"
        return f"- `{key}`: {p.type} {rng}" + (f" when {p.when}" if p.when else "")

    b, s = space.budget, space.search
    lines = [f"**Search `{space.name}`**" + (f" — {space.description}" if space.description else ""), "",
             "Space:", *[factor(k, p) for k, p in space.space.items()], "",
             f"Budget: {b.num_samples} trials, {space.base_config().train.epochs} epochs at most"
             + (f", {b.time_budget_s:g}s" if b.time_budget_s else "")
             + f"; searcher {s.algorithm} (seed {s.seed}), scheduler {space.scheduler.type}; "
               f"objective {space.objective.mode} `{space.objective.metric}`"]
    if summary is not None:
        best, m = summary.get("best"), space.objective.metric
        lines += ["", f"Result: {summary['num_trials']} trials, {summary['num_stopped']} stopped early, "
                      f"{summary['num_failed']} failed"]
        lines += [f"Best trial (finished trials only): `{best.get('trial', best['trial_id'])}` {m} = {best[m]:.4f}"
                  + (f", child run `{summary['best_run_id']}`" if summary.get("best_run_id") else "")
                  + f"; {json.dumps(best['params'], default=str)}"] if best else ["No trial finished."]
    return "\n".join(lines)


def log_parent(c, parent_run_id: str, summary: dict, space: SearchSpace) -> None:
    """The parent run's record of the finished search: trials.csv and its table, counts, the best trial's
    score, params and run id, the description."""
    trials, metric_key = summary["trials"], space.objective.metric
    # the one rule (best_run.best_finished_child, which `promote` and the report use too) picks the best
    run = best_run.best_finished_child(c, summary["experiment_id"], metric_key, space.objective.mode, parent_run_id)
    tid = run.data.tags.get(experiments.TRIAL_TAG) if run is not None else None
    summary["best"] = best = next((t for t in trials if t["trial_id"] == tid), None) if tid else None
    keys = sorted({k for t in trials for k in t["params"]})
    columns = ["trial", "trial_id", "status", "epochs", "objective", "test_score", *keys, "error"]
    rows = [[t.get("trial", t["trial_id"]), t["trial_id"], t["status"], t["epochs"], t.get(metric_key),
             t["test_score"], *[t["params"].get(k, "") for k in keys], t["error"]] for t in trials]
    buf = io.StringIO()
    csv.writer(buf).writerows([columns, *rows])
    c.log_text(parent_run_id, buf.getvalue(), "trials.csv")          # for spreadsheets and scripts
    # the same rows as an MLflow table: the UI's artifact view shows it as a sortable table
    c.log_table(parent_run_id, {col: [str(r[i]) if r[i] is not None else "" for r in rows]
                                for i, col in enumerate(columns)}, "trials.json")
    run_log.log_metrics(c, parent_run_id, {"num_trials": summary["num_trials"], "num_failed": summary["num_failed"],
                                           "num_stopped": summary["num_stopped"], "wall_s": summary["wall_s"]})
    if best:
        # named as on the child runs: the parent's `best_val_score` is the best trial's `best_val_score`
        # (the objective), its `test_score` that trial's test score; the trial is the `best.trial` param
        tested = {"test_score": best["test_score"]} if best["test_score"] is not None else {}
        run_log.log_metrics(c, parent_run_id, {metric_key: best[metric_key], **tested})
        run_log.log_params(c, parent_run_id, {"best.trial": best.get("trial", best["trial_id"]),
                                              **{f"best.{k}": v for k, v in best["params"].items()}})
        c.set_tag(parent_run_id, "crosspt.best_run_id", run.info.run_id)
        summary["best_run_id"] = run.info.run_id
    c.set_tag(parent_run_id, NOTE_TAG, parent_note(space, summary))
    # no importance plot here: the report (search.report.store) draws the one importance method on the parent
    # run and on the Optuna study; Optuna's default fANOVA over completed trials disagreed with it


def format_summary(summary: dict, objective: str) -> str:
    lines = [f"{'trial':<10}{'status':<10}{'epochs':>7}{objective:>16}{'test':>10}  params"]
    for t in sorted(summary["trials"], key=lambda t: t.get("trial", t["trial_id"])):
        v = t.get(objective)
        test = t.get("test_score")
        params = ", ".join(f"{k.split('.')[-1]}={_short(v_)}" for k, v_ in t["params"].items())
        lines.append(f"{t.get('trial', t['trial_id'][-8:]):<10}{t['status']:<10}{t['epochs']:>7}"
                     f"{(f'{v:.4f}' if isinstance(v, float) else str(v)):>16}"
                     f"{(f'{test:.4f}' if isinstance(test, float) else '-'):>10}  {params}")
    b = summary.get("best")
    lines.append(f"{summary['num_trials']} trials ({summary['num_stopped']} stopped early by ASHA, "
                 f"{summary['num_failed']} failed) in {summary['wall_s']:.1f}s")
    if b:
        lines.append(f"best: trial {b.get('trial', b['trial_id'])} {objective}={b.get(objective):.4f}"
                     + (f" test_score={b['test_score']:.4f}" if b.get("test_score") is not None else ""))
        lines.append("best config: " + json.dumps(b["params"], default=str))
    lines.append(f"MLflow: {summary['tracking_uri']}  experiment '{summary['experiment']}'  "
                 f"parent run {summary['parent_run_id']}"
                 + (f"  best child run {summary['best_run_id']}" if summary.get("best_run_id") else ""))
    lines.append(f"MLflow UI: {runs_page(summary)}")
    lines.append(f"Ray results: {summary['storage']}")
    return "\n".join(lines)


def runs_page(summary: dict) -> str:
    """Where the search's runs table is in the MLflow UI. MLflow 3.17's UI has a global GenAI / Model
    training switch (GenAI by default) that wins over the experiment's `mlflow.experimentKind` tag, so the
    link names the workflow, and the search's saved view (its factors and scores as columns,
    `ui_view.save_search_view`); for a sqlite store, behind `mlflow ui --backend-store-uri URI`."""
    uri = summary["tracking_uri"]
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    view = f"&viewStateShareKey={ui_view.view_key(summary['search'])}" if summary.get("search") else ""
    return f"{base}/#/experiments/{summary['experiment_id']}/runs?workflowType=machine_learning{view}"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)

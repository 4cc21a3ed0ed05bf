"""The report's MLflow side: read one search's rows from its parent and child runs, write the report
back to the parent run (files under `report/`, tables, the importance plot), and hand the same
importances to the search's Optuna study for optuna-dashboard."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from crosspt.registry.models import repeat_metric, repeat_of
from crosspt.search.design import PHASE_TAG, STRATUM_TAG
from crosspt.search.params import INACTIVE
from crosspt.search.report.build import Report, build_report
from crosspt.search.report.render import tables, write_report
from crosspt.search.report.rows import Factor, TrialRow

ASSESS_METRIC = "assess_score"                      # a trial's score on the fixed held-out assessment rows
REPORT_DIR = "report"                               # artifact folder on the parent run
IMPORTANCE_PLOT = "plots/param_importances.png"     # the parent run's importance plot (canonical method)
STUDY_ATTR = "crosspt.importance"                   # Optuna study user attr holding the same numbers
STATE_OF_STATUS = {"FINISHED": "FINISHED", "FAILED": "FAILED", "RUNNING": "RUNNING", "SCHEDULED": "RUNNING"}


def _row_of(run, factors: list[Factor], metric: str) -> TrialRow:
    """A child run as a row: factor values from the trial's sampled values (typed), `INACTIVE` for a
    factor it did not sample."""
    tags, m = run.data.tags, run.data.metrics
    try:
        sampled = json.loads(tags.get("crosspt.sampled", "{}"))
    except json.JSONDecodeError:         # cut at 5000 chars: fall back to the flat (string) params
        sampled = {}
    params = {f.key: sampled.get(f.key, _param_value(run.data.params.get(f.key, INACTIVE))) for f in factors}
    state = "PRUNED" if tags.get("pruned") == "true" else STATE_OF_STATUS.get(run.info.status, "FAILED")
    reps = [m[repeat_metric(metric, i)] for i in range(len(m)) if repeat_metric(metric, i) in m]
    test_reps = [m[repeat_metric("test_score", i)] for i in range(len(m)) if repeat_metric("test_score", i) in m]
    end = run.info.end_time
    return TrialRow(tags.get("crosspt.trial_id", run.info.run_id), state, params, m.get(metric), reps,
                    m.get("test_score"), test_reps, int(m["trainable_params"]) if "trainable_params" in m else None,
                    (end - run.info.start_time) / 1000 if end and run.info.start_time else None,
                    {k: v for k, v in m.items() if k.startswith(("val_", "test_", "assess_")) and repeat_of(k) is None
                     and k not in ("val_score", "test_score", ASSESS_METRIC)},
                    run.info.run_id, assess=m.get(ASSESS_METRIC), phase=tags.get(PHASE_TAG, ""),
                    strata={k[len(STRATUM_TAG):]: v for k, v in tags.items() if k.startswith(STRATUM_TAG)})


def _param_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text) if text != INACTIVE else INACTIVE
    except yaml.YAMLError:
        return text


def _factors(space_tree: dict) -> list[Factor]:
    return [Factor(k, p.get("type") != "choice", p.get("type") == "loguniform" or bool(p.get("log")))
            for k, p in (space_tree.get("space") or {}).items()]


def common_rung(c, rows: list[TrialRow], metric: str) -> int | None:
    """The last epoch every finished and pruned trial reached, with each one's `metric` there set as its
    `rung` value (from the child runs' per-epoch history). None when no trial was pruned: the finished
    trials are all of them then."""
    comparable = [r for r in rows if r.state in ("FINISHED", "PRUNED") and r.run_id]
    if not any(r.state == "PRUNED" for r in comparable):
        return None
    history = {r.run_id: {h.step: h.value for h in c.get_metric_history(r.run_id, metric)} for r in comparable}
    reached = [max(h) for h in history.values() if h]
    if len(reached) < len(comparable):          # a trial without a score at any epoch cannot be compared
        comparable = [r for r in comparable if history[r.run_id]]
    if not reached:
        return None
    step = min(reached)
    for r in comparable:
        r.rung = history[r.run_id].get(step)
    return step


@dataclass
class SearchRows:
    title: str
    parent_run_id: str
    metric: str
    mode: str
    factors: list[Factor]
    rows: list[TrialRow]
    best_trial_id: str | None
    running: bool
    algorithm: str | None = None
    rung_epoch: int | None = None


def find_parent(c, experiment: str | None = None, parent_run_id: str | None = None):
    """The search's parent run: `parent_run_id`, or the latest search in `experiment`."""
    from mlflow.exceptions import MlflowException

    from crosspt.errors import ConfigError
    from crosspt.registry import experiments

    if parent_run_id:
        try:
            run = c.get_run(parent_run_id)
        except MlflowException:
            raise ConfigError(f"no MLflow run '{parent_run_id}'") from None
        if experiments.SEARCH_TAG not in run.data.tags:
            raise ConfigError(f"run '{parent_run_id}' is not a search's parent run "
                              f"(no {experiments.SEARCH_TAG} tag)")
        return run
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment '{experiment}'")
    latest = experiments.latest_search(c, exp.experiment_id)
    if latest is None:
        raise ConfigError(f"experiment '{experiment}' has no search run")
    return latest


SPACE_FILE = "search_space.yaml"                    # the search's space, logged on its parent run


def _space_tree(c, parent) -> dict:
    """The search's space as its parent run logged it. An older parent without the file: the keys it
    logged, as choices. A file that is there but cannot be read is an error: read as choices, every numeric
    factor would silently fall to too few trials per level."""
    import yaml
    from mlflow.exceptions import MlflowException

    from crosspt.errors import ArtifactError

    pid = parent.info.run_id
    if SPACE_FILE not in {a.path for a in c.list_artifacts(pid)}:
        return {"space": {k: {"type": "choice"} for k in parent.data.params.get("space.keys", "").split(",") if k}}
    try:
        tree = yaml.safe_load(Path(c.download_artifacts(pid, SPACE_FILE)).read_text()) or {}
    # the download (the store's or the file system's error) or the YAML
    except (MlflowException, OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ArtifactError(f"{SPACE_FILE} of parent run {pid} cannot be read "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); the report needs it to "
                            f"tell numeric factors from choices") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("space", {}), dict):
        raise ArtifactError(f"{SPACE_FILE} of parent run {pid} is not a search space (no 'space' mapping)")
    return tree


def load_search(uri: str, experiment: str | None = None, parent_run_id: str | None = None) -> SearchRows:
    """One search's rows from MLflow: its parent run, factors (the logged space), searcher, objective,
    children, and each finished or pruned child's objective at the common rung."""
    from crosspt.registry import best_run, experiments, store

    c = store.client(uri)
    parent = find_parent(c, experiment, parent_run_id)
    pid, eid = parent.info.run_id, parent.info.experiment_id
    space_tree = _space_tree(c, parent)
    metric = parent.data.params.get("objective.metric", "best_val_score")
    mode = parent.data.params.get("objective.mode", "max")
    algorithm = parent.data.params.get("search.algorithm") or (space_tree.get("search") or {}).get("algorithm")
    factors = _factors(space_tree)
    rows = [_row_of(r, factors, metric) for r in experiments.child_runs(uri, eid, pid)]
    rung = common_rung(c, rows, metric)
    best = best_run.best_finished_child(c, eid, metric, mode, parent_run_id=pid)
    return SearchRows(parent.data.tags.get(experiments.SEARCH_TAG, pid), pid, metric, mode, factors, rows,
                      best.data.tags.get(experiments.TRIAL_TAG) if best else None, parent.info.status == "RUNNING",
                      algorithm, rung)


def _log_table(c, run_id: str, table: dict[str, list], path: str, logged: set[str]) -> None:
    """`log_table`, except that a table an earlier report logged is replaced: `log_table` appends to an
    existing file, so a second `crosspt report` (of a running search, say) would stack both reports' rows."""
    if path not in logged:
        c.log_table(run_id, table, path)
        return
    from crosspt.registry._mlflow_compat import replace_table

    replace_table(c, run_id, table, path)


def log_importance_plot(c, parent_run_id: str, rep: Report) -> None:
    """The parent run's importance plot (`IMPORTANCE_PLOT`), drawn from the report's numbers: the one
    importance method (stats.py), replacing Optuna's default (fANOVA over whatever trials completed)."""
    from crosspt.search.report.plots import _plt, importance_figure

    if not rep.enough or not any(r.importance is not None for r in rep.shown):
        return
    fig = importance_figure(rep.shown, f"{rep.title}: importance ({rep.metric})")
    c.log_figure(parent_run_id, fig, IMPORTANCE_PLOT)
    _plt().close(fig)


def study_importances(rep: Report) -> dict[str, dict]:
    """The report's importances as the study attr `STUDY_ATTR` holds them."""
    return {r.factor: {"importance": r.importance, "noise": r.noise, "verdict": r.verdict.value,
                       "p_adjusted": r.p_adjusted} for r in rep.shown}


def publish_to_study(rep: Report, optuna_url: str, study_name: str) -> None:
    """The report's importances on the search's Optuna study: as the user attr `STUDY_ATTR` (shown on the
    study's page) and as the study's note in optuna-dashboard, whose own "Hyperparameter Importance" panel
    is a fixed PED-ANOVA over completed trials that cannot be swapped for this method."""
    import optuna

    from crosspt.search.optuna_glue import rdb_storage

    study = optuna.load_study(study_name=study_name, storage=rdb_storage(optuna_url))
    study.set_user_attr(STUDY_ATTR, study_importances(rep))
    try:
        from optuna_dashboard import save_note
    except ImportError:                  # the dashboard is optional; the attr is there for any reader
        return
    lines = ["## crosspt design-factor report", "",
             "Importance = share of the objective's variance a factor explains; noise = that share with its "
             "levels shuffled (95th percentile). The *Hyperparameter Importance* panel is optuna-dashboard's own "
             "PED-ANOVA and may disagree; these are the numbers of `crosspt report`.", "",
             "| factor | importance | noise | verdict | p (adjusted) |", "|---|---:|---:|---|---:|"]
    lines += [f"| {r.factor} | {'-' if r.importance is None else f'{r.importance:.2f}'} | "
              f"{'-' if r.noise is None else f'{r.noise:.2f}'} | {r.verdict.value} | "
              f"{'-' if r.p_adjusted is None else f'{r.p_adjusted:.2g}'} |" for r in rep.shown]
    save_note(study, "\n".join(lines) + "\n")


def report_search(uri: str, *, experiment: str | None = None, parent_run_id: str | None = None,
                  out: str | Path | None = None, log: bool = True, optuna_url: str | None = None,
                  study_name: str | None = None) -> tuple[Report, Path]:
    """Build, write (`out`, default `./report-<parent run>`) and log one search's report: report.md,
    report.html, report.json and the PNGs under the parent run's `report/`, its tables, the importance
    plot; with `optuna_url` and `study_name`, the importances on the study too. Returns the report and
    report.md's path."""
    from crosspt.registry import store

    s = load_search(uri, experiment, parent_run_id)
    rep = build_report(s.title, s.metric, s.mode, s.factors, s.rows, s.best_trial_id, s.running, s.algorithm,
                       s.rung_epoch)
    md = write_report(rep, out or f"report-{s.parent_run_id[:8]}")
    if log:
        c = store.client(uri)
        c.log_artifacts(s.parent_run_id, str(md.parent), REPORT_DIR)
        if rep.enough:
            logged = {a.path for a in c.list_artifacts(s.parent_run_id, REPORT_DIR)}
            for name, table in tables(rep).items():
                _log_table(c, s.parent_run_id, table, f"{REPORT_DIR}/{name}", logged)
            log_importance_plot(c, s.parent_run_id, rep)
    if optuna_url and study_name and rep.enough:
        publish_to_study(rep, optuna_url, study_name)
    return rep, md


def report_failed(e: BaseException, parent_run_id: str, uri: str) -> str:
    """The one line that says a search's report could not be drawn, the same at the end of `crosspt search`
    and from `crosspt report --parent`: what failed, that the trials are kept, and how to draw it again."""
    return (f"the design-factor report of parent run {parent_run_id} could not be drawn: {type(e).__name__}: {e} "
            f"(the trials are kept in MLflow; draw it again with `crosspt report --parent {parent_run_id} "
            f"--tracking-uri {uri}`)").replace("\n", " ")

"""The design-factor report of one search: which factors changed the objective, by how much, how sure
that is, and the best configuration.

One job per module:
- `rows`: the input, one search's trials as plain rows, and each factor's levels over them;
- `stats`: the statistics (permutation tests, Bonferroni, effects with the intervals that match them, importances with
  a noise level), pure numpy/scipy/statsmodels on plain rows, calibrated by simulation in
  benchmarks/report_calibration.md (`benchmarks.report_calibration`);
- `power`: what a design of this size can detect, and how many design trials an effect needs;
- `build`: every number of one report (`build_report`): verdicts on the design trials, the optimiser's
  trials as hints, the analysis at the common ASHA rung and prune rates per level;
- `render` and `plots`: the terminal table, report.md, the self-contained report.html, report.json, PNGs;
- `store`: MLflow in (rows of a search's child runs) and out (files, tables and the importance plot on the
  parent run), and the same importances on the Optuna study.

The report of a running search is the report so far.
"""
from crosspt.search.report.build import Report, build_report, pareto_front, strongest_interaction
from crosspt.search.report.render import format_table, to_json, write_report
from crosspt.registry.models import repeat_metric
from crosspt.search.report.rows import Factor, TrialRow, levels
from crosspt.search.report.stats import FactorResult, Verdict, analyse
from crosspt.search.report.store import (IMPORTANCE_PLOT, REPORT_DIR, load_search, log_importance_plot, report_failed,
                                         publish_to_study, report_search)

__all__ = ["report_failed", "Factor", "FactorResult", "IMPORTANCE_PLOT", "REPORT_DIR", "Report", "TrialRow", "Verdict", "analyse",
           "build_report", "format_table", "levels", "load_search", "log_importance_plot", "pareto_front",
           "publish_to_study", "repeat_metric", "report_search", "strongest_interaction", "to_json",
           "write_report"]

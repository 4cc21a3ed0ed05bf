"""`crosspt search`: the CLI face of crosspt.search (also used by jobs/search_glue.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_search_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="search space YAML (see search_spaces/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the space file, e.g. --set budget.num_samples=4 "
                        "or --set base.tasks=[sst2]")
    p.add_argument("--experiment", help="MLflow experiment name (default: the space's name)")
    p.add_argument("--data-dir", help="folder with glue_data/ and superglue/ (default: $CROSSPT_DATA_DIR)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--storage-path", help="Ray results folder or shared storage (default: ./ray_results)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of the same name")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier search's saved state")
    p.add_argument("--summary-json", help="write the final summary as JSON")
    p.add_argument("--promote", metavar="ALIAS", help="at the end, register the best FINISHED trial and point "
                                                      "ALIAS at it (see crosspt promote)")
    p.add_argument("--promote-model", metavar="NAME", help="registered model for --promote (default: the space's name)")
    p.add_argument("--promote-force", action="store_true",
                   help="let --promote move an alias that points at another run's version (refused otherwise)")


def cmd_search(args) -> int:
    from crosspt.search.driver import run_search
    from crosspt.search.summary import format_summary
    from crosspt.config.space import load_space

    space = load_space(args.space, args.overrides)
    summary = run_search(space, experiment=args.experiment, data_dir=args.data_dir,
                         tracking_uri=args.tracking_uri, storage_path=args.storage_path,
                         resume=args.resume, overwrite=args.overwrite, promote=args.promote,
                         promote_model=args.promote_model, promote_force=args.promote_force)
    print(format_summary(summary, space.objective.metric))
    print(summary["report"]["table"])
    if summary.get("promoted"):
        p = summary["promoted"]
        print(f"promoted: run {p['run_id']} -> {p['model_name']} version {p['version']} ({p['model_uri']})")
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    if summary["report"].get("error"):        # the search's last line, where the user looks
        print(f"error: {summary['report']['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from crosspt.errors import ConfigError, CrossPTError
    from crosspt.registry import store
    from crosspt.search.report import format_table, report_failed, report_search

    if args.plan:
        return cmd_plan(args)
    if args.experiment is None and args.parent is None:
        raise ConfigError("crosspt report needs --experiment or --parent (or --plan --space SPACE.yaml)")
    uri = store.resolve_tracking_uri(args.tracking_uri)
    try:
        rep, md = report_search(uri, experiment=args.experiment, parent_run_id=args.parent, out=args.out)
    except CrossPTError:
        raise                       # bad input (no such search): run_cli's one line
    # any other failure in the same line the search ended with (`report_failed`)
    except Exception as e:
        print(f"error: {report_failed(e, args.parent or args.experiment, uri)}", file=sys.stderr)
        return 1
    print(format_table(rep))
    print(f"written: {md}, {md.with_name('report.html').name} (figures inline), {md.with_name('report.json').name}")
    return 0


def pilot_noise(uri: str, experiment: str) -> float:
    """A finished search's residual sd per trial, in its report's units: the median over its tested
    factors of their models' residual sd (assessment when measured, else validation)."""
    import statistics

    from crosspt.errors import ConfigError
    from crosspt.search.report import build_report, load_search

    s = load_search(uri, experiment=experiment)
    rep = build_report(s.title, s.metric, s.mode, s.factors, s.rows, s.best_trial_id, algorithm=s.algorithm)
    sds = [r.resid_sd for r in rep.shown if r.resid_sd]
    if not sds:
        raise ConfigError(f"experiment '{experiment}': its latest search has too few finished trials to measure "
                          f"the noise")
    return rep.scale[0] * statistics.median(sds)


def cmd_plan(args) -> int:
    """`crosspt report --plan`: what a space's design can detect, before it runs."""
    from crosspt.config.space import load_space
    from crosspt.errors import ConfigError
    from crosspt.registry import store
    from crosspt.search.design import plan

    if not args.space:
        raise ConfigError("crosspt report --plan needs --space SPACE.yaml")
    if (args.noise_sd is None) == (args.pilot_experiment is None):
        raise ConfigError("crosspt report --plan needs one of --noise-sd or --pilot-experiment")
    space = load_space(args.space, args.overrides)
    if args.noise_sd is not None:
        sd, source = args.noise_sd, "given"
        if not sd > 0:
            raise ConfigError(f"--noise-sd must be > 0 (got {sd})")
    else:
        sd = pilot_noise(store.resolve_tracking_uri(args.tracking_uri), args.pilot_experiment)
        source = f"measured in experiment '{args.pilot_experiment}'"
    rows = plan(space, sd, args.effect)
    sizes = sorted({n for r in rows for n in r.mde})
    print(f"plan: space {space.name} — {len(rows)} factors, {space.design_count()} design trials "
          f"(search.design), residual sd {sd:.3g} per trial ({source}); effect at 0.05 / {len(rows)} per factor")
    print("smallest best − worst difference found with 80% power, by design trials:")
    print(f"{'factor':<32}{'levels':>7}" + "".join(f"{n:>9}" for n in sizes)
          + (f"{'trials for ' + format(args.effect, 'g'):>18}" if args.effect else ""))
    for r in rows:
        cells = "".join(f"{r.mde[n]:>9.2f}" if n in r.mde else f"{'-':>9}" for n in sizes)
        need = (f"{r.trials_for_effect if r.trials_for_effect else '> 4000':>18}" if args.effect else "")
        print(f"{r.factor:<32}{r.levels:>7}{cells}{need}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("search", help="Ray Tune + Optuna + ASHA search over the CrossPT factors")
    add_search_flags(p)
    p.set_defaults(func=cmd_search)
    r = sub.add_parser("report", help="design-factor report of a search (verdicts on its design trials: "
                                      "permutation tests per factor, Bonferroni, effects with the intervals that "
                                      "match them, power; the optimiser's trials as hints; importances, best, "
                                      "Pareto front); works on a running search. --plan: size a design first")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--experiment", help="MLflow experiment: its latest search")
    which.add_argument("--parent", help="the search's parent run id")
    r.add_argument("--plan", action="store_true",
                   help="before a search: the smallest effect each factor's design trials find with 80%% power, "
                        "at the space's design size and at 12/24/48 (needs --space and --noise-sd or "
                        "--pilot-experiment)")
    r.add_argument("--space", help="--plan: the search space YAML")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="--plan: override a key of the space file")
    r.add_argument("--noise-sd", type=float, help="--plan: a trial's residual sd, in the report's units (points "
                                                  "for scores in [0, 1])")
    r.add_argument("--pilot-experiment", help="--plan: measure the residual sd from this experiment's latest search")
    r.add_argument("--effect", type=float, help="--plan: also the design trials that find this best − worst "
                                                "difference (report units)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    r.add_argument("--out", help="folder for report.md, report.html, report.json and the PNGs "
                                 "(default: ./report-<parent run id>)")
    r.set_defaults(func=cmd_report)

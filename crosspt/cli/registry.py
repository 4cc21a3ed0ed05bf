"""CLI faces of the registry layer: `crosspt pretrain-sources | promote | predict | evaluate | export-peft`.

Loaded by `crosspt.cli._register_optional`; imports nothing heavy until a command runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from crosspt.errors import DataError
from crosspt.tasks.data import json_lines


# ---- pretrain-sources ----------------------------------------------------------------------------------
def add_pretrain_flags(p: argparse.ArgumentParser) -> None:
    from crosspt.cli.main import _common_run_flags

    _common_run_flags(p)      # --config --set --backbone --tasks (the SOURCE tasks) --shots --seed --data-dir
    p.add_argument("--model-name", default="glue-sources",
                   help="registered model that receives the bank as a new version (default: glue-sources)")
    p.add_argument("--alias", default="current",
                   help="alias moved to the new version (default: current; MLflow reserves 'latest')")
    p.add_argument("--no-register", action="store_true", help="save and log the bank, register nothing")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the config's, else 'crosspt-sources')")
    p.add_argument("--output-dir", help="where the per-task runs and the bank file go")
    p.add_argument("--summary-json", help="write the summary (bank path, metrics, model version) as JSON")


def cmd_pretrain_sources(args) -> int:
    from crosspt.cli.main import flag_overrides
    from crosspt.config.schema import load_config
    from crosspt.registry.sources import format_summary, pretrain_sources

    cfg = load_config(args.config, flag_overrides(args))

    def done(res):
        r = res["result"]
        print(f"source '{res['task']}' done: best val {r['best_val_score']:.4f}  test {r['test_score']:.4f}  "
              f"({r['wall_s']:.1f}s)", flush=True)

    summary = pretrain_sources(cfg, output_dir=args.output_dir, tracking_uri=args.tracking_uri,
                               experiment=args.experiment, model_name=None if args.no_register else args.model_name,
                               alias=args.alias, on_task_done=done)
    print(format_summary(summary))
    _write_json(args.summary_json, summary)
    return 0


# ---- promote ---------------------------------------------------------------------------------------------
def add_promote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", help="search experiment: the best FINISHED child run of its latest search is "
                                        "promoted (--parent-run-id: of that search; --all-searches: of any)")
    p.add_argument("--metric", default="best_val_score", help="child-run metric that ranks runs (default best_val_score)")
    p.add_argument("--mode", choices=["max", "min"], default="max")
    p.add_argument("--model-name", required=True, help="registered model name")
    p.add_argument("--alias", default="champion", help="alias to point at the promoted version (default champion)")
    p.add_argument("--run-id", help="promote this run instead of the best child run")
    p.add_argument("--parent-run-id", help="the search whose child runs compete (default: the experiment's latest)")
    p.add_argument("--all-searches", action="store_true",
                   help="let the child runs of every search in the experiment compete (other tasks, shots or "
                        "splits are not comparable: only for searches of one design)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--force", action="store_true", help="move the alias even if it points to another version")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the result as JSON")


def cmd_promote(args) -> int:
    from crosspt.registry.models import describe, promote

    result = promote(model_name=args.model_name, alias=args.alias, experiment=args.experiment, metric=args.metric,
                     mode=args.mode, run_id=args.run_id, parent_run_id=args.parent_run_id,
                     tracking_uri=args.tracking_uri, force=args.force, all_searches=args.all_searches)
    print(json.dumps(result, indent=2, default=str) if args.as_json else describe(result))
    return 0


# ---- predict ---------------------------------------------------------------------------------------------
def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION, or a local model folder")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")


def add_predict_flags(p: argparse.ArgumentParser) -> None:
    _model_flags(p)
    p.add_argument("--task", help="task to predict (required unless every input row has a 'task' column)")
    p.add_argument("--text", action="append", help="input text (repeatable)")
    p.add_argument("--text-b", action="append", help="second text of a sentence-pair task (repeatable, same count)")
    p.add_argument("--input", help="a .jsonl, .tsv or .csv file: columns text/text_b or the task's field names")
    p.add_argument("--output", help="write predictions to .jsonl, .csv or .tsv (default: JSON lines on stdout)")
    p.add_argument("--batch-size", type=int, help="default: the run's eval batch size")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")


def read_rows(path: str) -> list[dict]:
    """Rows of a .jsonl / .tsv / .csv input file as dicts (header row required for tsv/csv)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"input file not found: {p}")
    suffix = p.suffix.lower()
    rows: list[dict] = []
    if suffix in (".jsonl", ".json"):
        rows += [row for _, row in json_lines(p)]
    elif suffix in (".tsv", ".csv"):
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = [dict(r) for r in csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")]
    else:
        raise DataError(f"{p}: unsupported input format '{suffix}' (use .jsonl, .tsv or .csv)")
    if not rows:
        raise DataError(f"{p} has no rows")
    return rows


def _row_texts(row: dict, spec, where: str) -> tuple[str | None, str | None]:
    fields = spec.text_fields
    a = row.get("text", row.get(fields[0]))
    b = row.get("text_b", row.get(fields[1]) if len(fields) > 1 else None)
    if a is None or a == "":
        names = "'text'" + (f" or '{fields[0]}'" if fields[0] != "text" else "")
        raise DataError(f"{where}: no input text (column {names})")
    if spec.is_pair and (b is None or b == ""):
        names = "'text_b'" + (f" or '{fields[1]}'" if fields[1] != "text_b" else "")
        raise DataError(f"{where}: task '{spec.name}' needs a second text (column {names})")
    return a, b


def cmd_predict(args) -> int:
    from crosspt.registry.models import load_predictor

    if bool(args.text) == bool(args.input):
        raise DataError("give either --text (with --text-b for pair tasks) or --input FILE")
    if args.text_b and len(args.text_b) != len(args.text or []):
        raise DataError(f"{len(args.text or [])} --text but {len(args.text_b)} --text-b")
    if args.text:
        rows = [{"text": t, **({"text_b": args.text_b[i]} if args.text_b else {})} for i, t in enumerate(args.text)]
        where = "--text"
    else:
        rows = read_rows(args.input)
        where = args.input
    if not args.task and not all(r.get("task") for r in rows):
        raise DataError("give --task, or a 'task' column in every input row")
    tasks = [args.task or r["task"] for r in rows]
    predictor = load_predictor(args.model, args.tracking_uri, device=args.device, tasks=list(dict.fromkeys(tasks)))
    specs = {t: predictor.task(t) for t in dict.fromkeys(tasks)}       # unknown task -> error before work
    texts = [_row_texts(r, specs[t], f"{where}, row {i + 1}") for i, (r, t) in enumerate(zip(rows, tasks))]
    preds: list = [None] * len(rows)
    for name, spec in specs.items():
        idx = [i for i, t in enumerate(tasks) if t == name]
        out = predictor.predict(spec.name, [texts[i][0] for i in idx],
                                [texts[i][1] for i in idx] if spec.is_pair else None, batch_size=args.batch_size)
        for i, p in zip(idx, out):
            preds[i] = p
    records = [{**r, "task": specs[t].name, "prediction": p} for r, t, p in zip(rows, tasks, preds)]
    _write_records(records, args.output)
    return 0


def _write_records(records: list[dict], output: str | None) -> None:
    if not output:
        for r in records:
            print(json.dumps(r, ensure_ascii=False, default=str))
        return
    out = Path(output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix in (".csv", ".tsv"):
        keys = list(dict.fromkeys(k for r in records for k in r))
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys, delimiter="\t" if suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(records)
    else:
        out.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records),
                       encoding="utf-8")
    print(f"{len(records)} predictions -> {out}", file=sys.stderr)


# ---- evaluate --------------------------------------------------------------------------------------------
def add_evaluate_flags(p: argparse.ArgumentParser) -> None:
    _model_flags(p)
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", help="folder with glue_data/ and superglue/ (default: $CROSSPT_DATA_DIR, else the hub)")
    p.add_argument("--split", choices=["dev", "train"], default="dev",
                   help="labelled split to score (default dev: the official dev split, crosspt's test split)")
    p.add_argument("--max-examples", default="config",
                   help="N: the same N-example subset a run with data.max_test=N scores; 'all': the whole "
                        "split; default: the run's own data.max_test (the trial's test examples)")
    p.add_argument("--batch-size", type=int, help="default: the run's eval batch size")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--output", help="also write the metrics JSON to this file")


def _max_examples(text: str):
    if text in ("config", None):
        return "config"
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise DataError(f"--max-examples must be a positive integer, 'all' or 'config', got '{text}'") from None
    if n <= 0:
        raise DataError(f"--max-examples must be positive, got {n}")
    return n


def cmd_evaluate(args) -> int:
    from crosspt.registry.models import load_predictor
    from crosspt.tasks.data import resolve_data_dir

    limit = _max_examples(args.max_examples)
    predictor = load_predictor(args.model, args.tracking_uri, device=args.device, tasks=[args.task])
    data_dir = resolve_data_dir(args.data_dir)
    result = predictor.evaluate(args.task, data_dir, split=args.split, max_examples=limit,
                                batch_size=args.batch_size)
    result = {"model": args.model, **{k: v for k, v in getattr(predictor, "info", {}).items()
                                      if k in ("name", "version", "source_run_id")}, **result}
    print(json.dumps(result, indent=2))
    _write_json(args.output, result)
    return 0


# ---- export-peft -----------------------------------------------------------------------------------------
def add_export_flags(p: argparse.ArgumentParser) -> None:
    _model_flags(p)
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True, help="output folder for the PEFT adapter")


def cmd_export_peft(args) -> int:
    from crosspt.registry.peft_export import check_exportable, export_peft
    from crosspt.registry.pyfunc import CrossPTPredictor, match_task, stored_tasks
    from crosspt.registry.models import fetch_model

    bundle, _ = fetch_model(args.model, args.tracking_uri)
    match_task(stored_tasks(bundle), args.task)
    check_exportable(bundle)                 # refuse before loading any weights
    predictor = CrossPTPredictor(bundle, device="cpu")
    summary = export_peft(predictor, args.task, args.out)
    print(f"PEFT {summary['task_type']} prompt-tuning adapter for '{summary['task']}' "
          f"({summary['num_virtual_tokens']} virtual tokens x {summary['token_dim']}) -> {summary['out_dir']}\n"
          f"load: PeftModel.from_pretrained(<{summary['backbone']}>, '{summary['out_dir']}')")
    return 0


def _write_json(path: str | None, obj) -> None:
    if path:
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(path).expanduser().write_text(json.dumps(obj, indent=2, default=str))


def register(sub) -> None:
    commands = [
        ("pretrain-sources", "train one source prompt per task (parallel Ray tasks), save + register the bank",
         add_pretrain_flags, cmd_pretrain_sources),
        ("promote", "register a search's best run (or a run) as a model version with an alias",
         add_promote_flags, cmd_promote),
        ("predict", "predict with a registered (or local) crosspt model", add_predict_flags, cmd_predict),
        ("evaluate", "score a registered (or local) crosspt model on a labelled split", add_evaluate_flags,
         cmd_evaluate),
        ("export-peft", "export one task's prompt as a PEFT prompt-tuning adapter", add_export_flags, cmd_export_peft),
    ]
    for name, help_, add_flags, func in commands:
        p = sub.add_parser(name, help=help_)
        add_flags(p)
        p.set_defaults(func=func)

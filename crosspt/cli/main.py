"""The `crosspt` command line. Parses arguments, calls the run/search/registry layers, prints.

Every user error (CrossPTError) ends as one line on stderr and exit status 2 — no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from crosspt.errors import CrossPTError, first_in_chain


def _common_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key (repeatable), e.g. --set prompt.private_len=8")
    p.add_argument("--backbone", help="hub id, local path, 'minilm' (offline default) or 'smollm2' (offline decoder)")
    p.add_argument("--tasks", help="comma-separated task names (or task YAML files)")
    p.add_argument("--shots", type=int, help="examples per class")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir", help="folder with glue_data/ and superglue/ (default: $CROSSPT_DATA_DIR, else the hub)")


def flag_overrides(args) -> list[str]:
    """The common flags as dotted overrides (applied after --set, so flags win)."""
    out = list(args.overrides or [])
    if getattr(args, "backbone", None):
        out.append(f"backbone.name={args.backbone}")
    if getattr(args, "tasks", None):
        out.append("tasks=[" + ",".join(t.strip() for t in args.tasks.split(",") if t.strip()) + "]")
    if getattr(args, "shots", None) is not None:
        out.append(f"data.shots={args.shots}")
    if getattr(args, "seed", None) is not None:
        out.append(f"seed={args.seed}")
    if getattr(args, "data_dir", None):
        out.append(f"data.data_dir={Path(args.data_dir).expanduser().resolve()}")
    if getattr(args, "workers", None):
        out.append(f"scaling.num_workers={args.workers}")
    if getattr(args, "tracking_uri", None):
        out.append(f"tracking.tracking_uri={args.tracking_uri}")
    if getattr(args, "experiment", None):
        out.append(f"tracking.experiment={args.experiment}")
    return out


def cmd_train(args) -> int:
    from crosspt.config.schema import config_to_yaml, load_config
    from crosspt.registry.trial_logger import train_callback
    from crosspt.run.trainer import pin_data_dir, preflight, train

    cfg = pin_data_dir(load_config(args.config, flag_overrides(args)))
    if cfg.prompt.source_bank and cfg.prompt.source_bank.startswith("models:/"):
        from crosspt.registry.models import resolve_bank   # a registered bank: download it once, train from the file

        cfg.prompt.source_bank = resolve_bank(cfg.prompt.source_bank, cfg.tracking.tracking_uri)
    preflight(cfg)
    logger = None if args.no_tracking else train_run_logger(cfg)
    out_dir = Path(args.output_dir or Path("crosspt_runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config_to_yaml(cfg))

    def on_report(m, ckpt):
        print(f"epoch {m['epoch']:3d}  loss {m['train_loss']:.4f}  val {m['val_score']:.4f}  "
              f"best {m['best_val_score']:.4f}  ({m['epoch_s']:.1f}s)", flush=True)
        if logger:
            logger.log_epoch(m, ckpt)

    try:
        result = train(cfg, output_dir=out_dir, resume_from=args.resume_from, on_report=on_report,
                       callbacks=[train_callback(logger)] if logger else None)
    except BaseException as e:
        if logger:
            logger.finish("FAILED", error=f"{type(e).__name__}: {e}")
        raise
    if logger:
        logger.finish("FINISHED")
    summary = {k: result[k] for k in ("metrics", "trainable_params", "total_params", "wall_s", "config_hash",
                                      "best_epoch", "epochs_run", "seed")}
    print(format_result(summary))
    print(f"outputs: {out_dir}")
    if logger:
        print(f"mlflow run: {logger.run_id} ({logger.uri}, experiment {cfg.tracking.experiment})")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(summary, indent=2))
    return 0


def cmd_prepare_backbone(args) -> int:
    """Resolve a backbone now (the built-in `smollm2` is dequantised into the user cache once); print where."""
    from crosspt.backbones.loader import resolve_backbone

    t0 = time.time()
    info = resolve_backbone(args.name)
    print(f"{info['name']}: {info['family']} ({info['model_type']}) at {info['source']}  ({time.time() - t0:.1f}s)")
    return 0


def train_run_logger(cfg):
    """The MLflow run of one `crosspt train`: the same params (inactive keys marked), config, dataset
    inputs, provenance tags, per-epoch metrics and prompt artifacts as a search's child run, without the
    parent and trial tags."""
    from crosspt.config.schema import config_hash, config_to_yaml
    from crosspt.registry import experiments, provenance, store, trial_logger
    from crosspt.run.inputs import prepare_data
    from crosspt.search.params import trial_params

    uri = store.resolve_tracking_uri(cfg.tracking.tracking_uri)
    store.check_reachable(uri)
    experiment_id = experiments.ensure_experiment(uri, cfg.tracking.experiment)
    logger = trial_logger.TrialLogger(uri, experiment_id, None, None, None, run_name=cfg.name)
    _, splits = prepare_data(cfg)
    logger.start({**trial_params(cfg), "config_hash": config_hash(cfg)}, config_to_yaml(cfg),
                 datasets=provenance.split_datasets(splits, cfg.data.data_dir),
                 tags={"crosspt.kind": "train", **provenance.provenance_tags(cfg.data.data_dir)})
    return logger


def format_result(summary: dict) -> str:
    lines = [f"{'task':<14}{'split':<8}metrics"]
    for task, m in summary["metrics"].items():
        for split in ("val", "test", "assess"):
            if split not in m:
                continue                    # assess: only with data.assess_rows
            vals = "  ".join(f"{k}={v:.4f}" for k, v in m.get(split, {}).items())
            lines.append(f"{task:<14}{split:<8}{vals}")
    lines.append(f"trainable params {summary['trainable_params']:,} / total {summary['total_params']:,} "
                 f"({100 * summary['trainable_params'] / max(1, summary['total_params']):.3f}%)  "
                 f"wall {summary['wall_s']:.1f}s  best epoch {summary['best_epoch']}  "
                 f"config {summary['config_hash']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosspt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one configuration (Ray Train run)")
    _common_run_flags(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP)")
    p.add_argument("--output-dir", help="where checkpoints and outputs go")
    p.add_argument("--output-json", help="write final metrics/params/wall time as JSON")
    p.add_argument("--resume-from", help="checkpoint folder of an earlier run with the same config")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.tracking_uri, "
                                          "$MLFLOW_TRACKING_URI, else sqlite ./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    p.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare-backbone", help="resolve a backbone once, offline (smollm2: dequantise its GGUF "
                                                "file into the user cache), and print where it is")
    p.add_argument("name", help="'smollm2', 'minilm', a local folder or a hub id")
    p.set_defaults(func=cmd_prepare_backbone)

    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """Subcommands defined in the search/registry layers register themselves here."""
    for module in ("crosspt.cli.search", "crosspt.cli.registry"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args.func, args)


def run_cli(func, args) -> int:
    """Run a command; user errors become one line on stderr and exit status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return func(args)
    except CrossPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # errors raised inside Ray workers arrive wrapped: unwrap user errors
        inner = first_in_chain(e, CrossPTError)
        if inner is None:
            raise
        print(f"error: {inner}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

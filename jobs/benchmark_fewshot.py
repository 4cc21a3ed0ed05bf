"""Few-shot benchmark: zero-shot, PT (ours and PEFT's), SPoT, ATTEMPT-style, MPT (PEFT) and CrossPT (cat, wavg)
on the same frozen backbone, k-shot samples, seeds, step budget and learning-rate grid.

    python jobs/benchmark_fewshot.py --quick                  # sst2+rte, k=16, 2 seeds, MiniLM (~15 min, 2 CPUs)
    python jobs/benchmark_fewshot.py                          # full: 6 GLUE tasks, k=16/32, seeds 0,1,2
    python jobs/benchmark_fewshot.py --parallel 8             # jobs as concurrent Ray tasks
    ray job submit --working-dir . -- python jobs/benchmark_fewshot.py --parallel 16
    python jobs/benchmark_fewshot.py --speed                  # speed / memory / Ray-overhead ratios
    python jobs/benchmark_fewshot.py --standard --parallel 2  # benchmarks/standard.md (see below)
    python jobs/benchmark_fewshot.py --standard --quick       # the same stages on a sliver (the CI test)
    python jobs/benchmark_fewshot.py --decoder                # benchmarks/decoder.md: SmolLM2, ranked + generated
    ray job submit --working-dir . -- python jobs/benchmark_fewshot.py --standard --full --parallel 32 \
        --cpus-per-job 2                                      # the paper protocol on a GPU cluster (T5-base)

Standard mode (crosspt.bench.standard): one source bank pre-trained once on 1,500 rows of each of SST-2, QNLI,
MRPC, STS-B, CoLA; targets RTE, MRPC, SST-2, STS-B (each target's bank leaves its own task out), k=16/32,
seeds 0-4, lr grid 0.3/0.03 searched on validation at k=16, test = dev capped at 500 rows; PT, PT at CrossPT
cat's composed length, CrossPT cat and wavg single-task; PT and CrossPT cat multi-task; a SPoT-style transfer
matrix (3 seeds) and an untrained probe. Writes <out>/standard.md, standard.json, standard_transfer.png, and
registers the bank in MLflow as `<experiment>-bank@standard`. --render standard.json rebuilds the report.
--full: T5-base LM-adapted (a hub id: the machine needs the hub or a local copy), six targets, 3 lrs,
20 epochs, 20,000 source rows, transfer over 5 seeds, multi-task at k=16 and 32.

Quick mode (measured, see benchmarks/quick.md): 72 runs, 23.6 min wall on this 2-core machine while other
engineers' jobs kept the load average at 4-6; 15.0 min of CPU time (one torch thread), i.e. about 15 min when
the machine is free. Settings: targets sst2+rte, source pool sst2/rte/mrpc, k=16, seeds 0,1, lrs 0.3/0.03,
5 epochs (patience 2), max_length 48, prompt length 8, test capped at 100 dev examples.

Full mode (the defaults): 6 targets x k=16/32 x seeds 0,1,2 x lrs 0.3/0.1/0.03, 20 epochs (patience 5),
max_length 128, prompt length 10, test capped at 1000 dev examples (QNLI's 5463; the others are whole):
846 runs. Estimated from the quick run's per-run times scaled to 20 epochs, max_length 128 and the test
sizes: about 43 h sequential on this 2-core machine (an upper bound: early stopping usually ends runs
sooner), so run it with --parallel N on a Ray cluster: roughly 43/N h on N free cores (~3 h on 16).

Writes <out>/<name>.md (table), <name>.json (every run), <name>_avg.png (bar chart) and logs one MLflow
experiment (tracking URI: --tracking-uri, $MLFLOW_TRACKING_URI, else sqlite mlflow.db in the cwd).
Data: --data-dir or $CROSSPT_DATA_DIR (a folder with glue_data/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout, also on a cluster node

from crosspt.config.schema import BACKBONE_PRESETS  # noqa: E402

QUICK = dict(tasks=["sst2", "rte"], source_tasks=["sst2", "rte", "mrpc"], shots=[16], seeds=[0, 1],
             lrs=[0.3, 0.03], epochs=5, patience=2, max_test=100, max_length=48, prompt_len=8,
             threads=1)   # one torch thread: on a shared 2-core machine two threads oversubscribe badly
# the standard mode (benchmarks/standard.md): targets the frozen MiniLM can do something with, a source pool
# pre-trained on 1,500 rows each, k=16/32, seeds 0-4; sized to about 75 min on 2 CPUs with --parallel 2
STANDARD = dict(tasks=["rte", "mrpc", "sst2", "stsb"], source_tasks=["sst2", "qnli", "mrpc", "stsb", "cola"],
                shots=[16, 32], seeds=[0, 1, 2, 3, 4], lrs=[0.3, 0.03], epochs=5, patience=2, max_test=500,
                max_length=64, prompt_len=8, threads=1)
STANDARD_EXTRA = dict(source_rows=1500, source_val=200, source_epochs=2, source_lr=0.3, source_batch=16,
                      lr_shots=16, multi_shots=[16], transfer_seeds=[0, 1, 2])
# --standard --quick: the same stages on a sliver (the CI test, a few minutes)
STANDARD_QUICK = dict(tasks=["rte", "mrpc"], source_tasks=["sst2", "mrpc", "cola"], shots=[4, 8], seeds=[0, 1],
                      lrs=[0.3, 0.03], epochs=1, patience=1, max_test=24, max_length=32, prompt_len=2, threads=1,
                      batch_size=4)
STANDARD_QUICK_EXTRA = dict(source_rows=40, source_val=20, source_epochs=1, lr_shots=4, multi_shots=[4],
                            transfer_seeds=[0, 1])
# --standard --full: the paper protocol on a GPU cluster (T5-base LM-adapted; run it with --parallel N)
STANDARD_FULL = dict(tasks=["rte", "mrpc", "stsb", "cola", "sst2", "qnli"],
                     source_tasks=["sst2", "qnli", "mrpc", "stsb", "cola", "rte"], shots=[16, 32],
                     seeds=[0, 1, 2, 3, 4], lrs=[0.3, 0.1, 0.03], epochs=20, patience=5, max_test=1000,
                     max_length=256, prompt_len=10, batch_size=16, backbone="google/t5-base-lm-adapt")
STANDARD_FULL_EXTRA = dict(source_rows=20000, source_val=1000, source_epochs=3, source_batch=32, lr_shots=16,
                           multi_shots=[16, 32], transfer_seeds=[0, 1, 2, 3, 4])
# --decoder (benchmarks/decoder.md): the offline SmolLM2-135M-Instruct on SST-2 and RTE, k=16, seeds 0-2, zero-shot, PT
# and CrossPT cat/wavg over a one-task source bank (QNLI), test and generation scored on 200 dev rows, under the
# decoder's defaults: its chat template, the instruction-text init, the smollm2 preset's lr, 8 epochs,
# patience 3 and 32 validation rows per class. Sized to the CPU budget (see benchmarks/decoder.md): one lr,
# max_length 64 (longer inputs lose premise tokens, never the hypothesis or the answer cue), one torch thread a job.
_SMOLLM2_LR = BACKBONE_PRESETS["smollm2"]["optim.prompt_lr"]
DECODER = dict(tasks=["sst2", "rte"], source_tasks=["qnli"], shots=[16], seeds=[0, 1, 2], lrs=[_SMOLLM2_LR],
               epochs=8, patience=3, max_test=200, max_length=64, prompt_len=16, threads=1, generate=True,
               backbone="smollm2", prompt_init="auto")
DECODER_EXTRA = dict(source_rows=200, source_val=32, source_epochs=2, source_lr=_SMOLLM2_LR, source_batch=16,
                     lr_seed=0)
# --decoder --quick: the same stages on a sliver (the CI test, with a tiny backbone passed as --backbone)
DECODER_QUICK = dict(tasks=["rte"], source_tasks=["mrpc"], shots=[2], seeds=[0, 1], lrs=[0.3, 0.03], epochs=1,
                     patience=1, max_test=6, max_length=32, prompt_len=2, threads=1, generate=True, batch_size=4,
                     eval_batch_size=4, backbone="smollm2")
DECODER_QUICK_EXTRA = dict(source_rows=8, source_val=4, source_epochs=1, source_batch=4, timing_repeats=1)
FULL = dict(tasks=["sst2", "rte", "mrpc", "cola", "stsb", "qnli"],
            source_tasks=["sst2", "rte", "mrpc", "cola", "stsb", "qnli"], shots=[16, 32], seeds=[0, 1, 2],
            lrs=[0.3, 0.1, 0.03], epochs=20, patience=5, max_test=1000, max_length=128, prompt_len=10)


def parse_args(argv=None):
    from benchmarks.speed import SPEED_PARTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 tasks, k=16, 2 seeds, small budget (~15 min on 2 CPUs)")
    p.add_argument("--speed", action="store_true", help="speed / memory / Ray-overhead measurements instead")
    p.add_argument("--standard", action="store_true",
                   help="the standard benchmark: strong sources, transfer matrix, single- and multi-task, "
                        "k=16/32, seeds 0-4 (with --quick: a CI-sized sliver; with --full: the GPU protocol)")
    p.add_argument("--full", action="store_true", help="with --standard: the paper protocol (T5-base, GPU cluster)")
    p.add_argument("--decoder", action="store_true",
                   help="the decoder benchmark (benchmarks/decoder.md): SmolLM2, zero-shot / PT / CrossPT cat and "
                        "wavg, ranked and generated scores, train-step time against plain HF")
    p.add_argument("--render", metavar="JSON", help="with --standard: render the report of a finished run's JSON")
    p.add_argument("--trace-router", nargs="*", type=int, metavar="SEED",
                   help="with --render: re-run CrossPT cat's k=lr_shots cells of these seeds (default 0 1 2) "
                        "recording the router weights per epoch; added to the JSON and the report")
    p.add_argument("--ablate", nargs="*", type=int, metavar="SEED",
                   help="with --render: re-run PT's and CrossPT cat's k=lr_shots cells of these seeds (default "
                        "0 1 2) with the scoring heads frozen, and with neutral prompt init; added to the report")
    p.add_argument("--planted", nargs="*", type=int, metavar="SEED",
                   help="with --render: the planted-source probe on the run's bank (each target whose own task is "
                        "in the pool composes the whole pool, no private prompt, under the default router rule and "
                        "noisy_topk) on these seeds (default 0-4); added to the JSON and the report")
    p.add_argument("--planted-targets", nargs="+", metavar="TASK",
                   help="with --planted: only these targets (default: every target whose own task is in the pool)")
    p.add_argument("--reuse", metavar="JSON",
                   help="with --standard: take the sources, the probe and every single-lr cell from an earlier "
                        "run of the same settings (deterministic runs) and run the rest")
    p.add_argument("--analysis", metavar="MD", help="with --standard: a written diagnosis included in the report")
    p.add_argument("--arms", nargs="+", metavar="ARM",
                   help="with --standard: the single-task arms to run (pt pt_long crosspt_cat crosspt_wavg; all)")
    p.add_argument("--multi-shots", nargs="*", type=int, metavar="K",
                   help="with --standard: the k of the multi-task regime (none: no multi-task cells)")
    p.add_argument("--transfer-seeds", nargs="*", type=int, metavar="SEED",
                   help="with --standard: the seeds of the transfer matrix (none: no transfer matrix)")
    p.add_argument("--normalizations", nargs="+", metavar="RULE",
                   help="with --standard: run CrossPT cat and wavg again under these router rules (e.g. "
                        "noisy_topk) beside the default, and compare them in the report")
    p.add_argument("--no-probe", action="store_true", help="with --standard: skip the untrained probe stage")
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--source-tasks", nargs="+", help="source pool (each target leaves itself out)")
    p.add_argument("--shots", nargs="+", type=int)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--lrs", nargs="+", type=float, help="learning-rate grid, the same for every method")
    p.add_argument("--methods", nargs="+")
    p.add_argument("--epochs", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--max-test", type=int, help="cap on the dev split used as test (0: no cap)")
    p.add_argument("--max-length", type=int)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--prompt-init", help="prompt.init of every method's prompts (default vocab; the decoder "
                                         "benchmark: auto, the backbone's own default)")
    p.add_argument("--router-lr", type=float, help="the router's lr, fixed for every method with a router "
                                                   "(default 0.01)")
    p.add_argument("--source-shots", type=int)
    p.add_argument("--backbone", help="backbone (default: the mode's; minilm = the offline all-MiniLM-L6-v2)")
    p.add_argument("--data-dir")
    p.add_argument("--parallel", type=int, default=1, help="concurrent jobs as Ray tasks (1: sequential, no Ray)")
    p.add_argument("--cpus-per-job", type=float, default=1.0)
    p.add_argument("--threads", type=int, help="torch threads per job")
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--name")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment", default="crosspt-benchmark")
    p.add_argument("--no-mlflow", action="store_true")
    # speed mode
    p.add_argument("--ray-trials", type=int, default=3)
    p.add_argument("--ray-rounds", type=int, default=3,
                   help="in-process searches, each between two plain loops (the ratio is their median)")
    p.add_argument("--ray-epochs", type=int, default=12)
    p.add_argument("--skip-ray", action="store_true", help="speed mode without the Ray-overhead part")
    p.add_argument("--speed-parts", nargs="+", default=list(SPEED_PARTS), choices=SPEED_PARTS,
                   help="which speed measurements to run")
    p.add_argument("--speed-name", default="speed", help="output file stem of the speed mode")
    p.add_argument("--speed-compare", action="store_true",
                   help="render a before/after speed table from finished speed runs' JSON (--before, --after)")
    p.add_argument("--before", nargs="+", metavar="JSON", help="with --speed-compare: the before side's speed JSONs")
    p.add_argument("--after", nargs="+", metavar="JSON", help="with --speed-compare: the after side's speed JSONs")
    p.add_argument("--before-label", default="before")
    p.add_argument("--after-label", default="after")
    return p.parse_args(argv)


def _preset(args) -> dict:
    if args.decoder:
        return dict(DECODER_QUICK if args.quick else DECODER)
    if args.standard:
        return dict(STANDARD_FULL if args.full else STANDARD_QUICK if args.quick else STANDARD)
    return dict(QUICK if args.quick else FULL)


def settings_from(args):
    from crosspt.bench.settings import BenchSettings
    from crosspt.tasks.data import resolve_data_dir

    base = _preset(args)
    for key in ("tasks", "source_tasks", "shots", "seeds", "lrs", "methods", "epochs", "patience", "max_length",
                "prompt_len", "prompt_init", "source_shots", "threads", "router_lr"):
        v = getattr(args, key)
        if v is not None:
            base[key] = v
    if args.max_test is not None:
        base["max_test"] = args.max_test or None
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir:
        data_dir = str(Path(data_dir).expanduser().resolve())
    backbone = args.backbone or base.pop("backbone", None) or "minilm"
    base.pop("backbone", None)
    return BenchSettings(backbone=backbone, data_dir=data_dir, **base)


def main_benchmark(args) -> int:
    from crosspt.bench.harness import run_benchmark
    from crosspt.bench.report import bar_chart, log_to_mlflow, render_report
    from crosspt.bench.settings import BenchSettings
    from crosspt.bench.stats import estimate_full_wall

    s = settings_from(args)
    name = args.name or ("quick" if args.quick else "fewshot")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"benchmark '{name}': {len(s.tasks)} targets x {len(s.shots)} k x {len(s.seeds)} seeds x "
          f"{len(s.methods)} methods, lrs {s.lrs}, {s.epochs} epochs (patience {s.patience}), "
          f"max_test {s.max_test}, backbone {s.backbone}, parallel {args.parallel}", flush=True)
    summary = run_benchmark(s, out / f"{name}_artifacts", parallel=args.parallel, cpus_per_job=args.cpus_per_job,
                            log=lambda m: print(m, flush=True))
    summary["name"] = name
    full = BenchSettings(**FULL)
    summary["full_estimate"] = estimate_full_wall(summary, full)
    text = render_report(summary, name)
    md, js, png = out / f"{name}.md", out / f"{name}.json", out / f"{name}_avg.png"
    md.write_text(text)
    js.write_text(json.dumps(summary, indent=1, default=str))
    bar_chart(summary["table"], png, title=f"{name}: average test score per method (x100)")
    print(text)
    if not args.no_mlflow:
        info = log_to_mlflow(summary, text, {"results": js, "chart": png}, tracking_uri=args.tracking_uri,
                             experiment=args.experiment)
        print(f"MLflow: {info['tracking_uri']} experiment '{info['experiment']}' run {info['run_id']}")
    print(f"wrote {md}, {js}, {png}; wall {summary['wall_s']:.0f}s")
    return 0


def main_standard(args) -> int:
    from crosspt.bench.standard import StandardSettings
    from crosspt.bench.standard_run import run_standard

    name = args.name or ("standard_quick" if args.quick else "standard_full" if args.full else "standard")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{name}.json"
    if args.render:
        summary = json.loads(Path(args.render).read_text())
        if args.trace_router is not None:
            from crosspt.bench.standard_run import trace_router

            summary["router_trace"] = trace_router(summary, seeds=args.trace_router or [0, 1, 2],
                                                   log=lambda m: print(m, flush=True))
        if args.ablate is not None:
            from crosspt.bench.standard_run import ablate

            summary["ablations"] = ablate(summary, seeds=args.ablate or [0, 1, 2], parallel=args.parallel,
                                          log=lambda m: print(m, flush=True))
        if args.planted is not None:
            from crosspt.bench.standard_run import planted

            done = planted(summary, seeds=args.planted or [0, 1, 2, 3, 4], targets=args.planted_targets,
                           parallel=args.parallel, log=lambda m: print(m, flush=True))
            # cells added to an earlier probe replace the same (target, seed) cells only
            again = {(r["task"], r["seed"]) for r in done}
            keep = [r for r in summary.get("planted", []) if (r["task"], r["seed"]) not in again]
            summary["planted"] = keep + done
        if args.trace_router is not None or args.ablate is not None or args.planted is not None:
            js.write_text(json.dumps(summary, indent=1, default=str))
    else:
        extra = dict(STANDARD_FULL_EXTRA if args.full else STANDARD_QUICK_EXTRA if args.quick else STANDARD_EXTRA)
        for key in ("arms", "multi_shots", "transfer_seeds", "normalizations"):
            if getattr(args, key) is not None:
                extra[key] = getattr(args, key)
        if args.no_probe:
            extra["probe"] = False
        st = StandardSettings(bench=settings_from(args), **extra)
        b = st.bench
        print(f"standard benchmark '{name}': targets {b.tasks}, source pool {b.source_tasks}, k={b.shots}, "
              f"seeds {b.seeds}, lrs {b.lrs}, {b.epochs} epochs, backbone {b.backbone}, parallel {args.parallel}",
              flush=True)
        earlier = json.loads(Path(args.reuse).read_text()) if args.reuse else None
        summary = run_standard(st, out / f"{name}_artifacts", parallel=args.parallel,
                               cpus_per_job=args.cpus_per_job, log=lambda m: print(m, flush=True), reuse=earlier)
        summary["name"] = name
        js.write_text(json.dumps(summary, indent=1, default=str))       # the runs first: nothing is lost
    from crosspt.bench.standard_report import log_standard_to_mlflow, write_report   # after the run: see above

    analysis = Path(args.analysis).read_text() if args.analysis else None
    files = write_report(summary, out, name, analysis)
    print(files["md"].read_text())
    if not args.no_mlflow:
        info = log_standard_to_mlflow(summary, files, tracking_uri=args.tracking_uri, experiment=args.experiment)
        print(f"MLflow: {info['tracking_uri']} experiment '{info['experiment']}' run {info['run_id']}")
    print(f"wrote {js}, " + ", ".join(str(p) for p in files.values()) + f"; wall {summary['wall_s']:.0f}s")
    return 0


def main_decoder(args) -> int:
    from crosspt.bench.decoder import DecoderSettings, render, run_decoder

    name = args.name or ("decoder_quick" if args.quick else "decoder")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ds = DecoderSettings(bench=settings_from(args), **(DECODER_QUICK_EXTRA if args.quick else DECODER_EXTRA))
    b = ds.bench
    print(f"decoder benchmark '{name}': targets {b.tasks}, source pool {b.source_tasks}, k={b.shots}, seeds {b.seeds}, "
          f"lrs {b.lrs} at seed {ds.lr_seed}, {b.epochs} epochs, backbone {b.backbone}, parallel {args.parallel}",
          flush=True)
    js, md = out / f"{name}.json", out / f"{name}.md"

    def write(summary: dict) -> None:          # after every target too: a long run leaves its table as it goes
        summary["name"] = name
        js.write_text(json.dumps(summary, indent=1, default=str))
        md.write_text(render(summary))

    summary = run_decoder(ds, out / f"{name}_artifacts", parallel=args.parallel, cpus_per_job=args.cpus_per_job,
                          log=lambda m: print(m, flush=True), partial=write)
    write(summary)
    print(md.read_text())
    print(f"wrote {md}, {js}; wall {summary['wall_s']:.0f}s")
    return 0


def main_speed_compare(args) -> int:
    """Before/after of the speed mode: each side's runs (parts measured in separate runs) merged, one table
    with both columns, then each side's own tables."""
    from benchmarks.speed import merge_speed, render_before_after, render_speed

    sides = {k: merge_speed([json.loads(Path(f).read_text()) for f in files])
             for k, files in (("before", args.before), ("after", args.after))}
    text = "\n".join(["# Speed: before / after", "", render_before_after(
        sides["before"], sides["after"], before_label=args.before_label, after_label=args.after_label),
        "## Before: " + args.before_label, "", render_speed(sides["before"]).split("\n", 2)[2],
        "## After: " + args.after_label, "", render_speed(sides["after"]).split("\n", 2)[2]])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{args.speed_name}.md", out / f"{args.speed_name}.json"
    md.write_text(text)
    js.write_text(json.dumps({"before_label": args.before_label, "after_label": args.after_label, **sides},
                             indent=1, default=str))
    print(text)
    print(f"wrote {md}, {js}")
    return 0


def main_speed(args) -> int:
    from benchmarks.speed import render_speed, run_speed

    s = settings_from(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    res = run_speed(s, out / "speed_artifacts", ray_trials=args.ray_trials, ray_epochs=args.ray_epochs,
                    ray_rounds=args.ray_rounds,
                    skip_ray=args.skip_ray, parts=args.speed_parts, log=lambda m: print(m, flush=True))
    text = render_speed(res)
    md, js = out / f"{args.speed_name}.md", out / f"{args.speed_name}.json"
    md.write_text(text)
    js.write_text(json.dumps(res, indent=1, default=str))
    print(text)
    print(f"wrote {md}, {js}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from crosspt.cli.main import run_cli

    a = parse_args()
    sys.exit(run_cli(main_speed_compare if a.speed_compare else main_speed if a.speed else
                     main_decoder if a.decoder else main_standard if a.standard else main_benchmark, a))

"""Speed mode: CrossPT's training-step and inference cost against PT, peak memory, and Ray's overhead.

Every comparison is made where only the thing measured differs: same process, same backbone object,
same batches, timed in interleaved blocks with a rotating order so that load from other processes on a
shared machine hits every variant alike; medians, not means. Memory is measured in fresh interpreters.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from crosspt.bench.harness import init_ray_local
from crosspt.bench.job import SplitCache
from crosspt.bench.methods import Method, load_backbone_for, run_config
from crosspt.bench.settings import BenchSettings

Log = Callable[[str], None]


class SpeedPart(StrEnum):
    STEP = "step"
    INFERENCE = "inference"
    RSS = "rss"
    RAY = "ray"
    TRIAL = "trial"


SPEED_PARTS = tuple(str(p) for p in SpeedPart)
_CHECKOUT = Path(__file__).resolve().parents[1]     # the RSS children import this script from it


def _speed_cfg(s: BenchSettings, task: str, method: str, n_sources: int, *, epochs: int = 1, max_test: int | None = 200,
               private_len: int | None = None):
    """One short config (k=16, seed 0, lr 0.1, no early stopping); `private_len` overrides the prompt
    length so that PT can match CrossPT cat's composed length."""
    s2 = BenchSettings(**{**asdict(s), "epochs": epochs, "patience": None, "max_test": max_test})
    cfg = run_config(s2, method, [task], 16, 0, 0.1, n_sources=n_sources)
    if private_len is not None:
        cfg.prompt.private_len = private_len
    return cfg


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int, per_round: int,
                 arg: Callable[[int], Any]) -> dict[str, list[float]]:
    """Seconds of each `fns[name](arg(i))` call: every step `i` runs every variant once, the order
    rotating by one each step."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for i in range(per_round):
            a = arg(i)
            k = (r * per_round + i) % len(order)
            for name in order[k:] + order[:k]:
                t = time.perf_counter()
                fns[name](a)
                times[name].append(time.perf_counter() - t)
    return times


def measure_step_ratio(s: BenchSettings, *, task: str = "sst2", n_sources: int = 4, rounds: int = 6,
                       steps: int = 8, log: Log = print) -> dict:
    """Training step (compose + forward + backward + AdamW step) of CrossPT cat vs PT at equal composed
    length, same process, same batches, alternating blocks; median seconds per step."""
    from crosspt.run.model import build_model
    from crosspt.tasks.data import multitask_batches

    L = s.prompt_len
    composed = (n_sources + 1) * L
    variants = {"pt": (Method.PT, 0, composed), "crosspt_cat": (Method.CROSSPT_CAT, n_sources, L),
                "attempt_wavg": (Method.ATTEMPT, n_sources, L), "crosspt_wavg": (Method.CROSSPT_WAVG, n_sources, L)}
    models, opts, cache = {}, {}, SplitCache()
    for name, (method, ns, pl) in variants.items():
        cfg = _speed_cfg(s, task, method, ns, private_len=pl)
        tasks, splits = cache.get(cfg)
        models[name] = build_model(cfg, tasks, backbone=load_backbone_for(cfg, tasks))
        models[name].train()
        opts[name] = torch.optim.AdamW(models[name].param_groups(0.1, 0.01))
    batches = [models["pt"].backbone.collate(b, train=True)
               for b in multitask_batches({t: sp["train"] for t, sp in splits.items()}, s.batch_size, seed=0)]

    def stepper(name):
        def step(batch):
            m, o = models[name], opts[name]
            loss = m(batch)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
        return step

    steps_of = {name: stepper(name) for name in models}
    for step in steps_of.values():                         # warm-up
        for b in batches[:2]:
            step(b)
    times = _interleaved(steps_of, rounds, steps, lambda i: batches[i % len(batches)])
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"task": task, "batch_size": s.batch_size, "composed_len": {k: models[k].prompt.spec.composed_len
                                                                      for k in models},
           "median_step_s": med, "steps_each": len(times["pt"]), "threads": torch.get_num_threads(),
           "ratio_crosspt_cat_vs_pt": med["crosspt_cat"] / med["pt"],
           "ratio_attempt_wavg_vs_pt": med["attempt_wavg"] / med["pt"],
           "ratio_crosspt_wavg_vs_pt": med["crosspt_wavg"] / med["pt"]}
    log(f"step time: PT {med['pt'] * 1e3:.1f} ms, CrossPT cat {med['crosspt_cat'] * 1e3:.1f} ms "
        f"(ratio {res['ratio_crosspt_cat_vs_pt']:.3f})")
    return res


@torch.no_grad()
def measure_inference_ratio(s: BenchSettings, *, task: str = "sst2", n_sources: int = 4, rounds: int = 20,
                            log: Log = print) -> dict:
    """Forward latency (predict) of a promoted CrossPT prompt (collapsed to one tensor [L, d], fed as a PT
    prompt) vs a PT model of the same length holding the same values, same backbone object, same batches;
    the uncollapsed CrossPT model for reference, and whether the promoted prompt predicts exactly what the
    uncollapsed model predicts."""
    from crosspt.bench.prompts import FixedPrompt
    from crosspt.run.model import CrossPTModel, build_model
    from crosspt.tasks.data import eval_batches

    L = s.prompt_len
    composed = (n_sources + 1) * L
    cfg_c = _speed_cfg(s, task, Method.CROSSPT_CAT, n_sources, private_len=L)
    tasks, splits = SplitCache().get(cfg_c)
    cross = build_model(cfg_c, tasks, backbone=load_backbone_for(cfg_c, tasks))
    # a trained-looking router: non-uniform weights
    cross.prompt.router.logits.copy_(torch.linspace(-1, 1, cross.prompt.spec.n_candidates).unsqueeze(0))
    cfg_p = _speed_cfg(s, task, Method.PT, 0, private_len=composed)
    pt = build_model(cfg_p, tasks, backbone=cross.backbone)        # the same frozen backbone object
    collapsed, _ = cross.prompt.collapsed(0)
    # PT carries the same values as its own parameter: the two paths differ only in how the prompt is
    # produced (PT's composition of one private prompt vs a stored tensor), not in what the model computes
    pt.prompt.private.prompts.copy_(collapsed.unsqueeze(0))
    promoted = CrossPTModel(FixedPrompt(collapsed), cross.backbone)
    models = {"pt": pt, "promoted": promoted, "crosspt_uncollapsed": cross}
    for m in models.values():
        m.eval()
    batches = [pt.backbone.collate(b, train=False) for b in eval_batches(splits[task]["test"], s.eval_batch_size)]
    for m in models.values():
        m.predict(batches[0])
    times = _interleaved({k: m.predict for k, m in models.items()}, rounds, len(batches), batches.__getitem__)
    same = all(torch.equal(promoted.predict(b), cross.predict(b)) for b in batches)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"task": task, "batch_size": s.eval_batch_size, "batches": len(batches), "composed_len": composed,
           "collapsed_shape": list(collapsed.shape), "median_batch_s": med,
           "ratio_promoted_vs_pt": med["promoted"] / med["pt"],
           "ratio_uncollapsed_vs_pt": med["crosspt_uncollapsed"] / med["pt"],
           "promoted_predictions_identical": same, "samples_each": len(times["pt"])}
    log(f"inference: PT {med['pt'] * 1e3:.1f} ms/batch, promoted {med['promoted'] * 1e3:.1f} ms/batch "
        f"(ratio {res['ratio_promoted_vs_pt']:.3f}), identical predictions: {same}")
    return res


# ---- peak memory, each in a fresh interpreter ------------------------------------------------------
def _rss_backbone(cfg, tasks, s: BenchSettings, with_data: bool, prompt_len: int = 0) -> None:
    """Load the frozen backbone; then zero-shot inference over the test split (`with_data`), or one
    full-width no-grad eval batch of `max_length` tokens (plus a `prompt_len`-token prompt)."""
    from crosspt.bench.prompts import EmptyPrompt, FixedPrompt
    from crosspt.run.model import CrossPTModel
    from crosspt.tasks.data import Example

    bb = load_backbone_for(cfg, tasks)
    prompt = FixedPrompt(torch.zeros(prompt_len, bb.embed_dim)) if prompt_len else EmptyPrompt(1, bb.embed_dim)
    model = CrossPTModel(prompt, bb).eval()
    if with_data:
        from crosspt.run.inputs import prepare_data
        from crosspt.run.loop import LocalSession, evaluate

        _, splits = prepare_data(cfg)
        with tempfile.TemporaryDirectory() as d:
            evaluate(model, {t: sp["test"] for t, sp in splits.items()}, LocalSession(d), s.eval_batch_size)
        return
    long = " ".join(["sentence"] * s.max_length)
    exs = [Example(tasks[0].name, f"x/{i}", (long,) * len(tasks[0].text_fields), 0) for i in range(s.eval_batch_size)]
    with torch.no_grad():
        model.predict(bb.collate(exs, train=False))


def _status_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB, from /proc (Linux)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return tuple(int(next(x for x in status if x.startswith(k)).split()[1]) / 1024.0   # type: ignore[return-value]
                 for k in ("VmRSS:", "VmHWM:"))


def _peak_rss() -> dict:
    """This process's peak RSS in MiB: getrusage's maxrss and /proc's VmHWM (None where unreadable)."""
    import resource

    out: dict[str, Any] = {"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    try:
        out["vmhwm_mib"] = _status_mib()[1]
    except (OSError, StopIteration):
        out["vmhwm_mib"] = None
    return out


_PHASES = {"_set_up": "setup", "_train_epoch": "train", "_evaluate": "eval"}   # run_loop steps probed


def _probe_phases(loop) -> dict[str, float]:
    """Wrap run_loop's steps (`_PHASES`) in module `loop` so that each records how far it lifts the peak
    RSS (VmHWM after minus before, MiB, summed over its calls); returns that dict, filled as the trial runs."""
    lifted = {name: 0.0 for name in _PHASES.values()}

    def probed(fn, name):
        def run(*a, **k):
            before = _status_mib()[1]
            try:
                return fn(*a, **k)
            finally:
                lifted[name] += _status_mib()[1] - before
        return run

    for attr, name in _PHASES.items():
        setattr(loop, attr, probed(getattr(loop, attr), name))
    return lifted


def _default_heap() -> None:
    """Turn `crosspt.run.memory.lean_heap` into a no-op in this process: glibc's own malloc policy."""
    from crosspt.run import memory

    memory.release_free_heap = memory.set_mmap_threshold = lambda *a: False


def _rss_child(spec_json: str) -> None:
    """Runs in a fresh interpreter: do one thing, print the peak RSS (MiB) as JSON."""
    spec = json.loads(spec_json)
    s = BenchSettings(**spec["settings"])
    if s.threads:
        torch.set_num_threads(int(s.threads))
    what = spec["what"]
    out: dict[str, Any] = {"what": what}
    if what != "import":
        from crosspt.tasks.specs import resolve_tasks

        cfg = _speed_cfg(s, spec["task"], spec.get("method", Method.PT), spec.get("n_sources", 0),
                         epochs=spec.get("epochs", 2), max_test=spec.get("max_test", 200),
                         private_len=spec.get("private_len"))
        if what in ("backbone", "backbone_data"):
            _rss_backbone(cfg, resolve_tasks(cfg.tasks), s, with_data=what == "backbone_data",
                          prompt_len=spec.get("batch_prompt_len", 0))
        else:                                                    # a whole trial
            from crosspt.run import loop

            if spec.get("default_heap"):
                _default_heap()
            out["lifted_mib"] = _probe_phases(loop)
            out["start_mib"] = _status_mib()[1]
            with tempfile.TemporaryDirectory() as d:
                out["test_score"] = loop.run_loop(cfg, loop.LocalSession(d))["test_score"]
    print("RSS_JSON " + json.dumps({**out, **_peak_rss()}))


def _rss_specs(n_sources: int, L: int) -> dict[str, dict]:
    """What each measured child does (`_rss_child`): the denominator `backbone` is the frozen backbone and
    one no-grad batch of `max_length` input tokens; `backbone_prompt` the same batch with the trials'
    composed prompt length added (what the prompt alone costs in activations)."""
    cat = {"what": "trial", "method": Method.CROSSPT_CAT, "n_sources": n_sources, "private_len": L}
    return {
        "import": {"what": "import"},
        "backbone": {"what": "backbone"},
        "backbone_prompt": {"what": "backbone", "batch_prompt_len": (n_sources + 1) * L},
        "backbone_data": {"what": "backbone_data"},
        "trial_pt": {"what": "trial", "method": Method.PT, "private_len": (n_sources + 1) * L},
        "trial_crosspt_cat": cat,
        "trial_crosspt_cat_default_heap": {**cat, "default_heap": True},
    }


def measure_rss(s: BenchSettings, *, task: str = "sst2", n_sources: int = 4, epochs: int = 2, log: Log = print) -> dict:
    """Peak RSS (getrusage maxrss) of fresh subprocesses: interpreter+imports, frozen backbone alone (load +
    one full-width no-grad eval batch), the same batch with the composed prompt, backbone + the task's data +
    zero-shot inference over its test split, a PT trial and a CrossPT cat trial (also with glibc's default
    malloc policy, `crosspt.run.memory.lean_heap` off); for the trials, how far each run_loop step lifted
    the peak."""
    import subprocess
    import sys

    out, hwm, lifted = {}, {}, {}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # Linux carries ru_maxrss across execve from the process that forked the child (here: this big
    # process), so each measured child is started by a tiny launcher interpreter instead
    launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    for name, spec in _rss_specs(n_sources, s.prompt_len).items():
        spec = {**spec, "settings": asdict(s), "task": task, "epochs": epochs}
        code = ("import crosspt, torch, transformers\n" if spec["what"] == "import" else "") + \
            f"import sys; sys.path.insert(0, {json.dumps(str(_CHECKOUT))})\n" + \
            f"from benchmarks.speed import _rss_child; _rss_child({json.dumps(json.dumps(spec))})"
        p = subprocess.run([sys.executable, "-c", launcher, sys.executable, "-c", code], capture_output=True,
                           text=True, env=env, timeout=900)
        line = [x for x in p.stdout.splitlines() if x.startswith("RSS_JSON ")]
        if p.returncode or not line:
            raise RuntimeError(f"RSS child '{name}' failed: {p.stderr[-2000:]}")
        got = json.loads(line[-1][len("RSS_JSON "):])
        out[name], hwm[name] = got["maxrss_mib"], got.get("vmhwm_mib")
        if "lifted_mib" in got:
            lifted[name] = {"start": got["start_mib"], **got["lifted_mib"]}
        log(f"peak RSS {name}: getrusage maxrss {out[name]:.0f} MiB, VmHWM {hwm[name]} MiB"
            + (f", lifted by {lifted[name]}" if name in lifted else ""))
    return {"maxrss_mib": out, "vmhwm_mib": hwm, "lifted_mib": lifted, "task": task, "epochs": epochs,
            "composed_len": (n_sources + 1) * s.prompt_len,
            "ratio_trial_vs_backbone": out["trial_crosspt_cat"] / out["backbone"],
            "ratio_trial_default_heap_vs_backbone": out["trial_crosspt_cat_default_heap"] / out["backbone"],
            "ratio_trial_vs_backbone_prompt": out["trial_crosspt_cat"] / out["backbone_prompt"],
            "ratio_trial_vs_backbone_data": out["trial_crosspt_cat"] / out["backbone_data"],
            "ratio_crosspt_trial_vs_pt_trial": out["trial_crosspt_cat"] / out["trial_pt"]}


# ---- Ray overhead ------------------------------------------------------------------------------------
def _overhead_space(s: BenchSettings, task: str, epochs: int, cpus: int, points: list[dict], in_process: bool,
                    name: str):
    """The search space of the overhead runs: the given lr points, random searcher, FIFO, one at a time."""
    from crosspt.config.space import SearchSpace

    return SearchSpace.model_validate({
        "name": name,
        "base": {"tasks": [task], "seed": 0, "backbone": {"name": s.backbone, "max_length": s.max_length},
                 "data": {"shots": 16, "max_test": 200, "data_dir": s.data_dir},
                 "prompt": {"n_sources": 0, "private_len": s.prompt_len},
                 "train": {"epochs": epochs, "batch_size": s.batch_size, "patience": None,
                           "checkpoint_every": epochs},
                 "scaling": {"num_workers": 1, "cpus_per_worker": cpus, "in_process": in_process}},
        "space": {"optim.prompt_lr": {"type": "choice", "values": sorted({p["optim.prompt_lr"] for p in points})}},
        "objective": {"metric": "best_val_score", "mode": "max"},
        "budget": {"num_samples": len(points)},
        "scheduler": {"type": "fifo"},
        "search": {"algorithm": "random", "seed": 0, "points": points},
        "resources": {"max_concurrent_trials": 1},
    })


def _plain_loop(space, points: list[dict], tag: str, log: Log) -> tuple[list[dict], float]:
    """The same configurations through run_loop in a plain loop -> (per-trial rows, wall seconds)."""
    from crosspt.run.loop import LocalSession, run_loop

    t = time.time()
    rows = []
    for p in points:
        cfg = space.config_for(p)
        with tempfile.TemporaryDirectory() as d:
            tt = time.time()
            r = run_loop(cfg, LocalSession(d))
        rows.append({"lr": p["optim.prompt_lr"], "best_val_score": r["best_val_score"],
                     "test_score": r["test_score"], "wall_s": time.time() - tt})
    wall = time.time() - t
    per_trial = ", ".join(f"{x['wall_s']:.1f}s" for x in rows)
    log(f"plain loop ({tag}): {len(points)} trials in {wall:.1f}s ({per_trial}), torch threads {torch.get_num_threads()}")
    return rows, wall


def _search_run(space, s: BenchSettings, root: Path, uri: str) -> dict:
    """One run_search over `space` -> {wall_s, failed, trials (lr, scores, the trial's own wall seconds
    `trial.wall_s`, None where the trial did not log it) by lr}."""
    from crosspt.registry import experiments
    from crosspt.search.driver import run_search

    t = time.time()
    summ = run_search(space, data_dir=s.data_dir, tracking_uri=uri, storage_path=str(root / "ray_results"),
                      overwrite=True, verbose=0)
    wall = time.time() - t
    children = sorted(experiments.child_runs(uri, summ["experiment_id"], summ["parent_run_id"]),
                      key=lambda r: r.info.start_time)
    # the child runs' params are strings: (the order it ran in, its trial.wall_s) by the lr as logged
    by_lr = {r.data.params.get("optim.prompt_lr"): (i, r.data.metrics.get("trial.wall_s"))
             for i, r in enumerate(children)}
    trials = []
    for x in sorted(summ["trials"], key=lambda x: x["params"].get("optim.prompt_lr", 0)):
        lr = x["params"].get("optim.prompt_lr")
        ran, trial_wall = by_lr.get(str(lr), (None, None))
        trials.append({"lr": lr, "best_val_score": x.get("best_val_score"), "test_score": x.get("test_score"),
                       "trial_wall_s": trial_wall, "ran": ran})
    return {"wall_s": wall, "failed": summ["num_failed"], "trials": trials}


def _same_scores(a: list[dict], b: list[dict]) -> bool:
    return [(x["lr"], x["best_val_score"], x["test_score"]) for x in a] == \
        [(x["lr"], x["best_val_score"], x["test_score"]) for x in b]


def bracketed_rounds(searches: Sequence[dict], plains: Sequence[tuple[list[dict], float]]) -> list[dict]:
    """Search round r (`searches[r]`, a `_search_run`) against the plain loops run just before and just after
    it (`plains[r]`, `plains[r + 1]`: `(per-trial rows, wall)`), so that the machine's drift between runs
    hits both sides of each ratio alike. Per round: the ratio to the mean of the two plain walls; the search's
    wall outside its trials (driver, Tune start, the first trial's process start-up before its function runs,
    the report); each trial's own wall minus the same configuration's mean plain wall, in the order the trials
    ran (`ran`, else by lr): the first pays its fresh process's imports and backbone load, which the plain
    loop's process had already paid by its second run."""
    out = []
    for r, search in enumerate(searches):
        (rows_a, wall_a), (rows_b, wall_b) = plains[r], plains[r + 1]
        plain = (wall_a + wall_b) / 2
        by_lr = {x["lr"]: (x["wall_s"] + y["wall_s"]) / 2 for x, y in zip(
            sorted(rows_a, key=lambda x: x["lr"]), sorted(rows_b, key=lambda x: x["lr"]))}
        walls = [x.get("trial_wall_s") for x in search["trials"]]
        known = all(w is not None for w in walls)
        out.append({"wall_s": search["wall_s"], "plain_s": plain, "ratio": search["wall_s"] / plain,
                    "outside_trials_s": search["wall_s"] - sum(walls) if known else None,
                    "trial_minus_plain_s": {x["lr"]: x["trial_wall_s"] - by_lr[x["lr"]]
                                            for x in sorted(search["trials"], key=lambda x: x.get("ran") or 0)
                                            if x.get("trial_wall_s") is not None}})
    return out


def measure_ray_overhead(s: BenchSettings, out_dir: Path, *, task: str = "rte", n_trials: int = 3,
                         epochs: int = 12, rounds: int = 1, lrs: Sequence[float] = (0.3, 0.1, 0.03, 0.01, 0.003),
                         log: Log = print) -> dict:
    """N short trials through crosspt.search.run_search (random searcher, FIFO, one trial at a time) vs the
    same configurations through run_loop in a plain loop. In order: plain, the worker-group search
    (in_process false), plain, then `rounds` times the in-process search followed by plain. Each search is
    compared with the plain runs on either side of it; the in-process ratio is the median over its rounds
    (two quiet runs of the same tree differed by 0.1 in a single round: the machine drifts between runs)."""
    cpus = s.threads or os.cpu_count() or 1          # Ray gives a trial OMP_NUM_THREADS = its CPUs
    torch.set_num_threads(cpus)
    points = [{"optim.prompt_lr": float(lrs[i % len(lrs)])} for i in range(n_trials)]
    plain_space = _overhead_space(s, task, epochs, cpus, points, True, "plain")
    plains = [_plain_loop(plain_space, points, "before the searches", log)]
    init_s = init_ray_local()
    log(f"ray init: {init_s:.1f}s")
    root = Path(out_dir) / "ray_overhead"
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    res = {"task": task, "trials": n_trials, "epochs": epochs, "cpus_per_trial": cpus, "plain": plains[0][0],
           "ray_init_s": init_s, "concurrency": 1, "rounds": rounds}
    wg = _search_run(_overhead_space(s, task, epochs, cpus, points, False, "overhead-worker_group"), s, root, uri)
    log(f"run_search in_process=False: {wg['wall_s']:.1f}s")
    plains.append(_plain_loop(plain_space, points, "after the worker-group search", log))
    searches = []
    for r in range(rounds):
        searches.append(_search_run(_overhead_space(s, task, epochs, cpus, points, True,
                                                    f"overhead-in_process-{r + 1}"), s, root, uri))
        log(f"run_search in_process=True, round {r + 1}/{rounds}: {searches[-1]['wall_s']:.1f}s")
        plains.append(_plain_loop(plain_space, points, f"after in-process round {r + 1}", log))
    wg_round = bracketed_rounds([wg], plains[:2])[0]
    ip_rounds = bracketed_rounds(searches, plains[1:])
    ratios = [x["ratio"] for x in ip_rounds]
    res["worker_group"] = {**wg, **wg_round, "ratio_vs_plain": wg_round["ratio"]}
    res["in_process"] = {**searches[0], "ratio_vs_plain": statistics.median(ratios), "ratio_min": min(ratios),
                         "ratio_max": max(ratios), "rounds": ip_rounds}
    walls = [w for _, w in plains]
    res.update({"plain_walls_s": walls, "plain_s": statistics.mean(walls), "plain_before_s": walls[0],
                "plain_after_s": walls[-1], "plain_after": plains[-1][0]})
    log(f"worker_group: ratio vs the plain runs around it {wg_round['ratio']:.3f}")
    log("in_process: ratio per round " + ", ".join(f"{x:.3f}" for x in ratios)
        + f"; median {res['in_process']['ratio_vs_plain']:.3f}")
    ps = sorted(plains[0][0], key=lambda x: x["lr"])
    res["identical_in_process_vs_worker_group"] = all(_same_scores(x["trials"], wg["trials"]) for x in searches)
    res["identical_in_process_vs_plain"] = all(_same_scores(x["trials"], ps) for x in searches)
    res["identical_worker_group_vs_plain"] = _same_scores(wg["trials"], ps)
    import ray

    ray.shutdown()
    return res


# ---- what a trial pays besides training ----------------------------------------------------------------
TRIAL_TIMES = ("start_to_first_step_s", "last_step_to_end_s", "eval_s", "wall_s", "data_preparations",
               "start_to_first_step_cpu_s", "last_step_to_end_cpu_s", "eval_cpu_s", "cpu_s")


def measure_trial_costs(s: BenchSettings, out_dir: Path, *, space_path: str | Path = "search_spaces/smoke.yaml",
                        log: Log = print) -> dict:
    """The smoke space as a real search (in-process trials, MLflow in sqlite), one trial at a time so that
    trials do not share the CPUs: per trial the `trial.*` timings its run logged (start -> first optimizer
    step, last step -> end, seconds evaluating, wall, task-file reads), and the search's wall outside its
    trials (driver, Ray, actor start-up) per trial."""
    import yaml

    from crosspt.config.space import SearchSpace
    from crosspt.registry import experiments
    from crosspt.search.driver import run_search

    tree = yaml.safe_load(Path(space_path).read_text())
    tree.setdefault("resources", {})["max_concurrent_trials"] = 1
    if s.threads:
        tree["base"].setdefault("scaling", {})["cpus_per_worker"] = int(s.threads)
    space = SearchSpace.model_validate(tree)
    init_s = init_ray_local()
    root = Path(out_dir) / "trial_costs"
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    t = time.time()
    summ = run_search(space, data_dir=s.data_dir, tracking_uri=uri, storage_path=str(root / "ray_results"),
                      overwrite=True, verbose=0)
    wall = time.time() - t
    import ray

    ray.shutdown()
    trials = []
    for run in experiments.child_runs(uri, summ["experiment_id"], summ["parent_run_id"]):
        m = run.data.metrics
        trials.append({"trial": run.data.tags.get("crosspt.trial_number", run.data.params.get("trial_number")),
                       "status": run.info.status,
                       "epochs": int(m.get("epoch", -1)) + 1,
                       **{k: m.get(f"trial.{k}") for k in TRIAL_TIMES}})
    trials.sort(key=lambda x: int(x["trial"] or 0))
    timed = [x for x in trials if x["wall_s"] is not None and x["start_to_first_step_s"] is not None]

    def mean(k):
        vals = [x[k] for x in timed if x[k] is not None]
        return statistics.fmean(vals) if vals else None

    cpu = [x for x in timed if x["cpu_s"] is not None]
    res = {"space": str(space_path), "trials": trials, "search_wall_s": wall, "ray_init_s": init_s,
           "fixed_s": mean("start_to_first_step_s") + mean("last_step_to_end_s"),
           "start_to_first_step_s": mean("start_to_first_step_s"), "last_step_to_end_s": mean("last_step_to_end_s"),
           "eval_share": sum(x["eval_s"] for x in timed) / sum(x["wall_s"] for x in timed) if timed else float("nan"),
           "data_preparations": mean("data_preparations"),
           # the same in the trial process's CPU seconds: on a shared machine these do not move with the load
           "fixed_cpu_s": (mean("start_to_first_step_cpu_s") + mean("last_step_to_end_cpu_s")) if cpu else None,
           "start_to_first_step_cpu_s": mean("start_to_first_step_cpu_s"),
           "last_step_to_end_cpu_s": mean("last_step_to_end_cpu_s"),
           "eval_cpu_share": sum(x["eval_cpu_s"] for x in cpu) / sum(x["cpu_s"] for x in cpu) if cpu else None,
           "load_avg": os.getloadavg(),
           "outside_trials_per_trial_s": (wall - sum(x["wall_s"] for x in timed)) / max(1, len(timed))}
    log(f"smoke trials: fixed cost {res['fixed_s']:.1f}s per trial (start -> first step "
        f"{res['start_to_first_step_s']:.1f}s, last step -> end {res['last_step_to_end_s']:.1f}s), evaluation "
        f"{res['eval_share'] * 100:.0f}% of trial wall, {res['data_preparations']:.1f} data preparations per trial, "
        f"{res['outside_trials_per_trial_s']:.1f}s per trial outside the trials")
    return res


# ---- the whole speed mode ------------------------------------------------------------------------------
def run_speed(s: BenchSettings, out_dir: str | Path, *, ray_trials: int = 3, ray_epochs: int = 12,
              ray_rounds: int = 1, skip_ray: bool = False, parts: Sequence[str] = SPEED_PARTS,
              log: Log = print) -> dict:
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if s.threads:
        torch.set_num_threads(int(s.threads))
    res: dict[str, Any] = {"settings": asdict(s), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if SpeedPart.STEP in parts:
        res["step"] = measure_step_ratio(s, log=log)
    if SpeedPart.INFERENCE in parts:
        res["inference"] = measure_inference_ratio(s, log=log)
    if SpeedPart.RSS in parts:
        res["rss"] = measure_rss(s, log=log)
    if SpeedPart.RAY in parts and not skip_ray:
        res["ray"] = measure_ray_overhead(s, out_dir, n_trials=ray_trials, epochs=ray_epochs, rounds=ray_rounds,
                                          log=log)
    if SpeedPart.TRIAL in parts and not skip_ray:
        res["trial"] = measure_trial_costs(s, out_dir, log=log)
    res["wall_s"] = time.time() - t0
    return res


def _step_rows(st: dict, settings: dict) -> list[str]:
    ms, cl, L = st["median_step_s"], st["composed_len"], settings["prompt_len"]
    return [
        f"| train step PT (L={cl['pt']}) | {ms['pt'] * 1e3:.1f} ms | |",
        f"| train step CrossPT cat (4x{L} + {L} = {cl['crosspt_cat']}) | {ms['crosspt_cat'] * 1e3:.1f} ms | |",
        f"| **step ratio CrossPT cat / PT (equal composed length)** | **{st['ratio_crosspt_cat_vs_pt']:.3f}** | <= 1.10 |",
        f"| step ratio ATTEMPT-style wavg (L={cl['attempt_wavg']}) / PT (L={cl['pt']}) | "
        f"{st['ratio_attempt_wavg_vs_pt']:.3f} | (info: shorter prompt) |",
        f"| step ratio CrossPT wavg (L={cl['crosspt_wavg']}) / PT (L={cl['pt']}) | "
        f"{st['ratio_crosspt_wavg_vs_pt']:.3f} | (info: shorter prompt) |"]


def _inference_rows(inf: dict, st: dict | None) -> list[str]:
    mb = inf["median_batch_s"]
    return [
        f"| predict PT (L={inf['composed_len']}, batch {inf['batch_size']}) | {mb['pt'] * 1e3:.1f} ms | |",
        f"| predict promoted (collapsed {inf['collapsed_shape']}) | {mb['promoted'] * 1e3:.1f} ms | |",
        f"| **inference ratio promoted / PT** | **{inf['ratio_promoted_vs_pt']:.3f}** | <= 1.02 |",
        f"| inference ratio uncollapsed CrossPT / PT | {inf['ratio_uncollapsed_vs_pt']:.3f} | (info) |",
        f"| promoted predictions identical to uncollapsed | {inf['promoted_predictions_identical']} | True |",
        f"| (timed samples per variant: train {st['steps_each'] if st else '-'}, predict "
        f"{inf['samples_each']}) | | |"]


def _rss_rows(rss: dict, settings: dict) -> list[str]:
    m, h = rss["maxrss_mib"], rss.get("vmhwm_mib") or {}

    def both(k):
        return f"{m[k]:.0f} MiB" + (f" (VmHWM {h[k]:.0f})" if h.get(k) else "")

    batch = f"{settings['eval_batch_size']} x {settings['max_length']} tokens"
    rows = [f"| peak RSS interpreter + imports | {both('import')} | |",
            f"| peak RSS frozen backbone alone (load + 1 no-grad batch of {batch}) | {both('backbone')} | |"]
    if "backbone_prompt" in m:
        rows.append(f"| peak RSS backbone + 1 no-grad batch of {batch} + a {rss['composed_len']}-token prompt | "
                    f"{both('backbone_prompt')} | (info) |")
    rows += [f"| peak RSS backbone + {rss['task']} data + zero-shot inference over the test split | "
             f"{both('backbone_data')} | |",
             f"| peak RSS PT trial ({rss['epochs']} epochs) | {both('trial_pt')} | |",
             f"| peak RSS CrossPT cat trial ({rss['epochs']} epochs) | {both('trial_crosspt_cat')} | |"]
    if "trial_crosspt_cat_default_heap" in m:
        rows.append(f"| peak RSS CrossPT cat trial, glibc's default malloc policy (lean_heap off) | "
                    f"{both('trial_crosspt_cat_default_heap')} | (info) |")
    rows.append(f"| **RSS ratio trial / backbone alone** | **{rss['ratio_trial_vs_backbone']:.3f}** | <= 1.20 |")
    if "ratio_trial_default_heap_vs_backbone" in rss:
        rows += [f"| RSS ratio trial with glibc's default malloc policy / backbone alone | "
                 f"{rss['ratio_trial_default_heap_vs_backbone']:.3f} | (info: without lean_heap) |",
                 f"| RSS ratio trial / (backbone + 1 batch with the prompt) | "
                 f"{rss['ratio_trial_vs_backbone_prompt']:.3f} | (info) |"]
    rows += [f"| RSS ratio trial / (backbone + data + zero-shot inference) | {rss['ratio_trial_vs_backbone_data']:.3f} | (info) |",
             f"| RSS ratio CrossPT trial / PT trial | {rss['ratio_crosspt_trial_vs_pt_trial']:.3f} | (info) |"]
    return rows


def _rss_breakdown(rss: dict) -> list[str]:
    """Where each trial's peak comes from: VmHWM at the start of run_loop, then how far each step lifted it."""
    lifted = rss.get("lifted_mib") or {}
    if not lifted:
        return []
    lines = ["", "Peak RSS of each trial by run_loop step (MiB the step lifted VmHWM by, summed over its calls):", "",
             "| trial | interpreter + imports | setup (data, backbone, prompt, optimizer) | training epochs "
             "| evaluations (val each epoch, test) | rest | peak |", "|---|---|---|---|---|---|---|"]
    for name, d in lifted.items():
        peak = rss["vmhwm_mib"][name]
        rest = peak - d["start"] - d["setup"] - d["train"] - d["eval"]
        lines.append(f"| {name} | {d['start']:.0f} | +{d['setup']:.0f} | +{d['train']:.0f} | +{d['eval']:.0f} "
                     f"| +{rest:.0f} | {peak:.0f} |")
    return lines


def _ray_rows(ray: dict) -> list[str]:
    wg, ip = ray["worker_group"], ray["in_process"]
    walls = ray.get("plain_walls_s") or [ray["plain_before_s"], ray["plain_after_s"]]
    rounds = ip.get("rounds") or []

    def seconds(xs):
        return ", ".join("-" if x is None else f"{x:+.1f}" for x in xs)

    per_trial = ", ".join(f"{x['wall_s']:.1f}" for x in ray["plain"])
    lines = [f"| plain loop: {ray['trials']} trials x {ray['epochs']} epochs ({ray['task']}), each run "
             f"(first run's trials: {per_trial} s) | {', '.join(f'{w:.1f}' for w in walls)} s | trials >= 30 s |",
             f"| ray.init (not counted below) | {ray['ray_init_s']:.1f} s | |",
             f"| run_search, in_process=false (worker group per trial), between plain runs 1 and 2 | "
             f"{wg['wall_s']:.1f} s | |",
             f"| **Ray overhead ratio, in_process=false** (vs the mean of the plain runs around it) | "
             f"**{wg['ratio_vs_plain']:.3f}** | <= 1.15 |"]
    if rounds:
        round_walls = ", ".join(f"{x['wall_s']:.1f}" for x in rounds)
        round_ratios = ", ".join(f"{x['ratio']:.3f}" for x in rounds)
        lines += [f"| run_search, in_process=true, each round (round r between plain runs r+1 and r+2) | "
                  f"{round_walls} s | |",
                  f"| in-process search / plain loop, each round | {round_ratios} | |",
                  f"| **Ray overhead ratio, in_process=true** (median over {len(rounds)} rounds; min - max) | "
                  f"**{ip['ratio_vs_plain']:.3f}** ({ip['ratio_min']:.3f} - {ip['ratio_max']:.3f}) | <= 1.05 |",
                  f"| in-process search: wall outside its trials (driver, Tune, first process start, report), "
                  f"each round | {seconds(x['outside_trials_s'] for x in rounds)} s | |"]
        for i, x in enumerate(rounds):
            d = x["trial_minus_plain_s"]
            if not d:                 # trials that log no `trial.wall_s` (a tree from before it)
                continue
            lines.append(f"| in-process round {i + 1}: each trial's own wall minus the same lr's plain wall, in the "
                         f"order they ran (lr {', '.join(str(k) for k in d)}) | {seconds(d.values())} s | |")
    else:        # a result from before the rounds
        lines.append(f"| **Ray overhead ratio, in_process=true** (vs mean plain) | **{ip['ratio_vs_plain']:.3f}** | "
                     f"<= 1.05 |")
    lines += [f"| identical val/test scores in-process vs worker group | {ray['identical_in_process_vs_worker_group']} | True |",
              f"| identical val/test scores in-process vs plain loop | {ray['identical_in_process_vs_plain']} | (info) |"]
    lines += ["", "Per-trial scores (lr: best val / test):", ""]
    for key in ("plain", "plain_after", "in_process", "worker_group"):
        rows = ray[key] if key.startswith("plain") else ray[key]["trials"]
        lines.append(f"- {key}: " + "; ".join(f"{x['lr']}: {x['best_val_score']:.4f} / {x['test_score']:.4f}"
                                             for x in sorted(rows, key=lambda x: x["lr"])))
    lines += ["", "run_search includes its MLflow logging (sqlite), Tune bookkeeping and the design-factor report; "
              f"trials run one at a time with {ray['cpus_per_trial']} CPUs each (the plain loop uses the same "
              "threads and logs nothing)."]
    return lines


def _trial_rows(tr: dict) -> list[str]:
    rows = [f"| smoke trials ({len(tr['trials'])}, one at a time): fixed cost per trial, start -> first step + "
            f"last step -> end | {tr['fixed_s']:.1f} s ({tr['start_to_first_step_s']:.1f} + {tr['last_step_to_end_s']:.1f}) | |",
            f"| smoke trials: evaluation share of a trial's wall | {tr['eval_share'] * 100:.0f}% | |"]
    if tr.get("fixed_cpu_s") is not None:
        rows += [f"| smoke trials, the trial process's CPU seconds: fixed cost (start -> first step + last step -> end) | "
                 f"{tr['fixed_cpu_s']:.1f} s ({tr['start_to_first_step_cpu_s']:.1f} + {tr['last_step_to_end_cpu_s']:.1f}) | |",
                 f"| smoke trials: evaluation share of a trial's CPU seconds | {tr['eval_cpu_share'] * 100:.0f}% | |"]
    return rows + [
        f"| smoke trials: data preparations (task-file reads) per trial | {tr['data_preparations']:.1f} | <= 1 |",
        f"| smoke search: wall outside its trials per trial (driver, Tune, actor start-up) | "
        f"{tr['outside_trials_per_trial_s']:.1f} s (search {tr['search_wall_s']:.0f} s) | |"]


def _trial_table(tr: dict) -> list[str]:
    load = f"; load average {', '.join(f'{x:.1f}' for x in tr['load_avg'])} at the end" if tr.get("load_avg") else ""
    lines = ["", f"Smoke-space trials ({tr['space']}, in-process, max_concurrent_trials 1{load}), from their runs' "
                 "`trial.*` metrics (wall seconds, CPU seconds of the trial's process in brackets):",
             "", "| trial | status | epochs | start -> first step (s) | last step -> end (s) | evaluating (s) | trial (s) "
                 "| data preparations |", "|---|---|---|---|---|---|---|---|"]
    for x in tr["trials"]:
        def f(k, fmt="{:.1f}"):
            wall = fmt.format(x[k]) if x.get(k) is not None else "-"
            cpu = "cpu_s" if k == "wall_s" else k[:-len("_s")] + "_cpu_s"
            return wall + (f" ({x[cpu]:.1f})" if x.get(cpu) is not None else "")
        lines.append(f"| {x['trial']} | {x['status']} | {x['epochs']} | {f('start_to_first_step_s')} | "
                     f"{f('last_step_to_end_s')} | {f('eval_s')} | {f('wall_s')} | "
                     f"{x['data_preparations'] if x.get('data_preparations') is not None else '-'} |")
    return lines


def merge_speed(results: Sequence[dict]) -> dict:
    """One side's results from several speed runs (each with some of the parts): the parts merged, the run
    settings of the first."""
    out: dict[str, Any] = {"runs": len(results), "wall_s": sum(r.get("wall_s", 0) for r in results)}
    for r in results:
        for k, v in r.items():
            if k not in ("wall_s",):
                out.setdefault(k, v)
    return out


def render_before_after(before: dict, after: dict, *, before_label: str, after_label: str, note: str = "") -> str:
    """The speed table with a before and an after column (each side `merge_speed` of its runs)."""
    def get(res, *path):
        for p in path:
            if not isinstance(res, dict) or p not in res:
                return None
            res = res[p]
        return res

    def fmt(v, spec):
        return "-" if v is None else spec.format(v)

    rows = [
        ("train step PT (same batches, CPU)", ("step", "median_step_s", "pt"), "{:.1f} ms", 1e3, ""),
        ("train step CrossPT cat, equal composed length", ("step", "median_step_s", "crosspt_cat"), "{:.1f} ms", 1e3, ""),
        ("step ratio CrossPT cat / PT", ("step", "ratio_crosspt_cat_vs_pt"), "{:.3f}", 1, "<= 1.10"),
        ("plain loop: trials x epochs (rte), mean of its runs around the searches",
         ("ray", "plain_s"), "{:.1f} s", 1, ""),
        ("**in-process search / plain loop** (median over the rounds)", ("ray", "in_process", "ratio_vs_plain"),
         "{:.3f}", 1, "<= 1.05"),
        ("in-process search / plain loop, each round", lambda res: ", ".join(
            f"{x['ratio']:.3f}" for x in get(res, "ray", "in_process", "rounds") or []) or None, "{}", 1, ""),
        ("in-process search: wall outside its trials, each round", lambda res: ", ".join(
            "-" if x.get("outside_trials_s") is None else f"{x['outside_trials_s']:.1f} s"
            for x in get(res, "ray", "in_process", "rounds") or []) or None, "{}", 1, ""),
        ("worker-group search / plain loop", ("ray", "worker_group", "ratio_vs_plain"), "{:.3f}", 1, "(<= 1.15)"),
        ("identical val/test scores in-process vs plain loop", ("ray", "identical_in_process_vs_plain"), "{}", 1, "True"),
        ("identical val/test scores in-process vs worker group", ("ray", "identical_in_process_vs_worker_group"), "{}", 1,
         "True"),
        ("smoke trial: fixed cost, start -> first step + last step -> end", ("trial", "fixed_s"), "{:.1f} s", 1, ""),
        ("smoke trial: start -> first step", ("trial", "start_to_first_step_s"), "{:.1f} s", 1, ""),
        ("smoke trial: last step -> end", ("trial", "last_step_to_end_s"), "{:.1f} s", 1, ""),
        ("smoke trial: evaluation share of its wall", ("trial", "eval_share"), "{:.0%}", 1, ""),
        ("smoke trial, in its process's CPU seconds: fixed cost", ("trial", "fixed_cpu_s"), "{:.1f} s", 1, ""),
        ("smoke trial, CPU seconds: start -> first step", ("trial", "start_to_first_step_cpu_s"), "{:.1f} s", 1, ""),
        ("smoke trial, CPU seconds: last step -> end", ("trial", "last_step_to_end_cpu_s"), "{:.1f} s", 1, ""),
        ("smoke trial, CPU seconds: evaluation share", ("trial", "eval_cpu_share"), "{:.0%}", 1, ""),
        ("smoke trial: data preparations (task-file reads) per trial", ("trial", "data_preparations"), "{:.1f}", 1,
         "<= 1"),
        ("smoke search: wall outside its trials, per trial (driver, Tune, actors)",
         ("trial", "outside_trials_per_trial_s"), "{:.1f} s", 1, ""),
        ("smoke search: wall (one trial at a time)", ("trial", "search_wall_s"), "{:.0f} s", 1, ""),
    ]
    lines = [f"| measurement | before: {before_label} | after: {after_label} | target |", "|---|---|---|---|"]
    for label, path, spec, scale, target in rows:
        cells = []
        for res in (before, after):
            if callable(path):
                v = path(res)
            else:
                v = get(res, *path)
                v = v * scale if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            cells.append(fmt(v, spec))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {target} |")
    return "\n".join(lines + ([""] + [note] if note else [])) + "\n"


def render_speed(res: dict) -> str:
    st, inf, rss, ray, settings = res.get("step"), res.get("inference"), res.get("rss"), res.get("ray"), res["settings"]
    lines = ["# Speed and memory (same process, same batches)", "",
             f"machine: {res['cpus']} CPUs, torch threads {res['torch_threads']}; backbone {settings['backbone']}, "
             f"batch {settings['batch_size']} (train) / {settings['eval_batch_size']} (predict)", "",
             "| measurement | value | target |", "|---|---|---|"]
    lines += _step_rows(st, settings) if st else []
    lines += _inference_rows(inf, st) if inf else []
    lines += _rss_rows(rss, settings) if rss else []
    lines += _trial_rows(res["trial"]) if res.get("trial") else []
    lines += _ray_rows(ray) if ray else []
    lines += _trial_table(res["trial"]) if res.get("trial") else []
    lines += _rss_breakdown(rss) if rss else []
    lines += ["", f"wall {res['wall_s']:.0f}s"]
    return "\n".join(lines) + "\n"

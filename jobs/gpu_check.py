"""GPU check: what a CrossPT training step and a trial cost on one GPU, through the product's own code.

    python jobs/gpu_check.py --json $OUT/gpu_check.json      # one GPU: every part, about 4-6 min on an H100/H200
    python jobs/gpu_check.py --tiny                           # tiny model, CPU is fine (checks that it runs)

Needs torch, transformers, safetensors, numpy, pyyaml and pydantic (crosspt's config schema); no Ray, MLflow,
Optuna or datasets, no network, no GLUE files: the frozen model is a T5-base-shaped random model saved to a
temp folder with a small word-level tokenizer, the data a synthetic SST-2 written in the layout crosspt reads.

1. Step time and MFU: `crosspt.run.loop._train_step` (the loop's step: pinned non-blocking upload, compose,
   forward, backward, AdamW, the loss added on the device) on batches of `--batch` x `--seq` input tokens,
   PT vs CrossPT at equal composed length, timed in blocks of `--block` steps between two device syncs (the
   host runs ahead within a block, as in training). Beside it, for CrossPT, two variants that put back one
   thing the hot path removed: frozen weights in fp32 under bf16 autocast (how the loader loaded them), and
   the old loop's two host reads per step (`bool(isfinite(loss))` before backward, `float(loss)` after).
2. Host syncs per step: steps under `torch.cuda.set_sync_debug_mode("warn")` (every synchronising CUDA call),
   and `benchmarks.syncs.count_host_syncs` (which op, which line).
3. Profile: CrossPT steps under torch.profiler: the top ops by self device time, and how busy the device was
   (kernel time / wall).
4. Trials per GPU: for c in `--concurrency` (default 1,2,4,8 on a GPU), c processes on the one GPU, each running
   `--waves` trials one after the other with `run_loop` and a `LocalSession` (what an in-process Tune trial
   runs, without Ray): trials/hour, the trials' start -> first step and last step -> end seconds, the
   evaluation share of a trial's wall, and the peak device memory they held.

Compared at equal composed prompt length: CrossPT = 4 sources x 25 + private 25, `cat` (125 tokens), task
router, random source bank; PT = one private prompt of 125 tokens.

MFU: the backbone is frozen, so the backward pass computes activation gradients only (no weight gradients):
FLOPs/step = 4 x (N_enc x encoder tokens + (N_dec + V*d) x decoder tokens), i.e. 2N forward + 2N backward per
token instead of the usual 6N, N_enc / N_dec the non-embedding parameters of the encoder / decoder stacks, V*d
the (tied) LM head applied to decoder tokens; encoder tokens include the prompt. Attention-score FLOPs
(QK^T, AV) are not counted. Peak: H100 / H200 SXM bf16 dense 989 TFLOP/s (--peak-tflops).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout

import torch

H100_BF16_DENSE_TFLOPS = 989.0
WORDS = ("good great fine lovely charming moving bad dull awful boring weak flat the a film movie story "
         "plot actor it is was and but very not quite").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model and batch, few steps (CPU smoke test)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128, help="input tokens per example (before the prompt)")
    p.add_argument("--sources", type=int, default=4)
    p.add_argument("--source-len", type=int, default=25)
    p.add_argument("--private-len", type=int, default=25)
    p.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    p.add_argument("--block", type=int, default=10, help="steps between two device syncs when timing")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--profile-steps", type=int, default=5, help="CrossPT steps under torch.profiler (0: skip)")
    p.add_argument("--concurrency", default=None,
                   help="trials per GPU to measure, e.g. 1,2,4,8 (default on a GPU; '' for none)")
    p.add_argument("--waves", type=int, default=2, help="trials each process runs one after the other")
    p.add_argument("--trial-epochs", type=int, default=3)
    p.add_argument("--trial-shots", type=int, default=32, help="train (and val) examples per class of a trial")
    p.add_argument("--level-timeout", type=float, default=240, help="seconds one concurrency level may take")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)       # internal: one trial process
    a = p.parse_args(argv)
    if a.tiny:
        a.batch, a.seq, a.sources, a.source_len, a.private_len = 4, 16, 2, 3, 3
        a.steps, a.block, a.warmup, a.profile_steps = 4, 2, 1, 2
        a.trial_epochs, a.trial_shots, a.waves = 1, 4, 1
    on_gpu = torch.cuda.is_available() and not a.cpu
    text = a.concurrency if a.concurrency is not None else ("1,2,4,8" if on_gpu and not a.tiny else "")
    a.concurrency = [int(c) for c in text.split(",") if c.strip()]
    return a


# ---- the frozen model and the data, written where crosspt reads them ------------------------------------
def t5_config(tiny: bool, vocab: int):
    from transformers import T5Config

    if tiny:
        return T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                        num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                    num_heads=12, dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, tie_word_embeddings=True)


def write_backbone(folder: Path, tiny: bool) -> Path:
    """A random T5 (fp32 on disk: the loader picks the compute dtype) and a word-level tokenizer over `WORDS`
    and the sst2 label words, T5 flavour: `[PAD]` 0 = pad = decoder start, `[SEP]` 1 = eos, `[UNK]` 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration

    vocab = {"[PAD]": 0, "[SEP]": 1, "[UNK]": 2}
    for w in (*WORDS, "negative", "positive", "sst2", "sentence:"):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A [SEP]", pair="$A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[SEP]", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[SEP]", unk_token="[UNK]",
                                   model_max_length=4096)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config(tiny, len(vocab)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def sentence(rng, words: int) -> str:
    return " ".join(rng.choices(WORDS, k=words))


def write_sst2(data_dir: Path, rows: int) -> Path:
    """A synthetic `glue_data/SST-2` (train.tsv, dev.tsv) of 12-word sentences, labels alternating."""
    import random

    rng = random.Random(0)
    folder = data_dir / "glue_data" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        lines = ["sentence\tlabel"] + [f"{sentence(rng, 12)}\t{i % 2}" for i in range(rows)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return data_dir


def run_config(a, backbone: Path, data_dir: Path, method: str, use_gpu: bool, **over):
    from crosspt.config.schema import load_config

    composed = (a.sources + 1) * max(a.source_len, a.private_len)
    prompt = {"prompt.n_sources": 0, "prompt.private_len": composed} if method == "pt" else \
        {"prompt.n_sources": a.sources, "prompt.source_len": a.source_len, "prompt.private_len": a.private_len,
         "prompt.composition": "cat", "prompt.source_bank": "random"}
    return load_config(None, {"tasks": ["sst2"], "seed": 0, "backbone.name": str(backbone),
                              "backbone.max_length": a.seq, "data.data_dir": str(data_dir),
                              "prompt.init": "random", "optim.prompt_lr": 0.3, "optim.router_lr": 0.01,
                              "train.batch_size": a.batch, "train.patience": None, "scaling.use_gpu": use_gpu,
                              **prompt, **over})


# ---- 1-3: the step ---------------------------------------------------------------------------------------
def param_counts(model) -> dict:
    emb = model.shared.weight.numel()
    enc = sum(p.numel() for p in model.encoder.parameters()) - emb       # encoder.embed_tokens is `shared`
    dec = sum(p.numel() for p in model.decoder.parameters()) - emb
    head = model.config.vocab_size * model.config.d_model
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"total": total, "embedding": emb, "encoder_nonemb": enc, "decoder_nonemb": dec, "lm_head": head}


def step_flops(pc: dict, batch: int, enc_tokens: int, dec_tokens: int) -> float:
    return 4.0 * (pc["encoder_nonemb"] * batch * enc_tokens + (pc["decoder_nonemb"] + pc["lm_head"]) * batch * dec_tokens)


def step_examples(a, n: int):
    """`n` sst2 examples whose formatted input is `a.seq` tokens ("sst2 sentence: ..." + eos)."""
    import random

    from crosspt.tasks.data import Example

    rng = random.Random(1)
    return [Example("sst2", f"sst2/step/{i}", (sentence(rng, a.seq - 3),), i % 2) for i in range(n)]


class Steps:
    """The product's training step on one built run (`crosspt.run.loop._set_up`), and its variants."""

    def __init__(self, run, batches):
        from crosspt.run import loop

        self.loop, self.run, self.batches = loop, run, batches
        self.state = loop.TrainState()
        self.tally = loop._LossTally(run.device)
        self.i = 0

    def step(self, old_syncs: bool = False):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        if not old_syncs:
            self.loop._train_step(self.run, self.state, batch, self.tally)
            return
        # the old loop's per-step host reads, on top of the same step: `if not torch.isfinite(loss)` between
        # forward and backward, `float(loss)` after the optimizer step
        run, state = self.run, self.state
        batch = self.loop.to_device(batch, run.device)
        run.model.prompt.set_step(state.global_step)
        with self.loop.autocast(run.device, run.cfg.backbone.dtype):
            loss = run.ddp(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {float(loss)}")
        self.loop._optimizer_step(run, loss)
        float(loss.detach())
        state.global_step += 1

    def finish(self):
        self.tally.finish(0)                     # divergence would raise here


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(steps: Steps, n: int, block: int, device, **kw) -> list[float]:
    """Seconds per step, one value per block of `block` steps timed between two device syncs."""
    out = []
    for _ in range(max(1, n // block)):
        sync(device)
        t = time.perf_counter()
        for _ in range(block):
            steps.step(**kw)
        sync(device)
        out.append((time.perf_counter() - t) / block)
    steps.finish()
    return out


def count_syncs(steps: Steps, n: int, device) -> dict:
    """Host syncs in `n` steps: CUDA's sync debug mode (every synchronising call) and crosspt's counter."""
    from benchmarks.syncs import count_host_syncs

    steps.step()
    sync(device)
    res = {"steps": n}
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(n):
                    steps.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where: dict[str, int] = {}
        for w in syncs:
            key = f"{'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
        res["cuda_debug_mode_per_step"] = len(syncs) / n
        res["cuda_debug_mode_where"] = where
    with count_host_syncs() as counted:
        for _ in range(n):
            steps.step()
    sync(device)
    steps.finish()
    res["counted_per_step"] = counted.total / n
    res["counted_ours_per_step"] = counted.ours() / n
    res["counted_where"] = dict(counted.where)
    return res


def profile_ops(steps: Steps, n: int, device, top: int = 10) -> dict:
    """`n` steps under torch.profiler: the `top` ops by self device time (CPU time on CPU) with their share,
    and the device's busy share of the wall (the sum of kernel self times over the steps' wall time)."""
    from torch.profiler import ProfilerActivity, profile

    steps.step()
    sync(device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(n):
            steps.step()
        sync(device)
    wall = time.perf_counter() - t
    steps.finish()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return {"ops": [{"op": e.key, "self_ms_per_step": getattr(e, key) / 1e3 / n, "share": getattr(e, key) / total,
                     "calls_per_step": e.count / n} for e in events[:top]],
            "device_busy_share": (total / 1e6) / wall if on_gpu else None, "profiled_wall_ms_per_step": wall / n * 1e3}


def measure_steps(a, backbone_dir: Path, data_dir: Path, device) -> dict:
    from crosspt.backbones.loader import load_for_config
    from crosspt.run import loop
    from crosspt.run.model import build_model
    from crosspt.run.precision import compute_dtype
    from crosspt.tasks.specs import resolve_tasks

    use_gpu = device.type == "cuda"
    t0 = time.time()
    cfgs = {m: run_config(a, backbone_dir, data_dir, m, use_gpu) for m in ("pt", "crosspt")}
    tasks = resolve_tasks(["sst2"])
    dtype = compute_dtype(device, "auto")
    backbone = load_for_config(cfgs["pt"], tasks, torch_dtype=dtype)       # as the loop loads it
    examples = step_examples(a, 4 * a.batch)
    splits = {"sst2": {"train": examples, "val": examples[:a.batch], "test": examples[:a.batch]}}
    runs, steps = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_steps_"))
    for m, cfg in cfgs.items():
        model = build_model(cfg, tasks, backbone=backbone)
        runs[m] = loop._set_up(cfg, loop.LocalSession(tmp / m, use_gpu=use_gpu), model, splits)
        batches = [backbone.collate(examples[i:i + a.batch], train=True) for i in range(0, len(examples), a.batch)]
        steps[m] = Steps(runs[m], batches)
    pc = param_counts(backbone.model)
    widths = batches[0]["input_ids"].shape[1], batches[0]["target_ids"].shape[1]
    res = {"device": torch.cuda.get_device_name(device) if use_gpu else "cpu", "weights_dtype": str(dtype),
           "params": pc, "batch": a.batch, "input_tokens": widths[0], "decoder_tokens": widths[1],
           "composed_len": runs["crosspt"].model.prompt.spec.composed_len, "build_s": time.time() - t0,
           "weights_bytes": sum(p.numel() * p.element_size() for p in backbone.model.parameters())}
    flops = step_flops(pc, a.batch, res["composed_len"] + widths[0], widths[1])
    res["flops_per_step"] = flops
    for s in steps.values():
        for _ in range(a.warmup):
            s.step()
        s.finish()
    variants = {"pt": (steps["pt"], {}), "crosspt": (steps["crosspt"], {}),
                "crosspt_old_syncs": (steps["crosspt"], {"old_syncs": True})}
    times: dict[str, list[float]] = {k: [] for k in variants}
    peak = {k: 0 for k in variants}
    for r in range(2):                           # two rounds, the order reversed in the second
        for name in (list(variants) if r == 0 else list(variants)[::-1]):
            s, kw = variants[name]
            if use_gpu:
                torch.cuda.reset_peak_memory_stats()
            times[name] += time_steps(s, a.steps // 2, a.block, device, **kw)
            if use_gpu:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
    if use_gpu and dtype == torch.bfloat16:
        # the loader before: fp32 weights in memory, cast to bf16 by autocast in every forward
        backbone.model.float()
        for _ in range(a.warmup):
            steps["crosspt"].step()
        torch.cuda.reset_peak_memory_stats()
        times["crosspt_fp32_weights"] = time_steps(steps["crosspt"], a.steps, a.block, device)
        peak["crosspt_fp32_weights"] = torch.cuda.max_memory_allocated()
        backbone.model.to(dtype)
    res["steps"] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        res["steps"][name] = {"median_step_s": med, "blocks": len(ts), "examples_per_s": a.batch / med,
                              "tflops": flops / med / 1e12, "mfu": flops / med / (a.peak_tflops * 1e12),
                              "peak_mem_bytes": peak.get(name, 0)}
    st = res["steps"]
    res["ratio_crosspt_vs_pt"] = st["crosspt"]["median_step_s"] / st["pt"]["median_step_s"]
    print(render_steps(res, a), flush=True)
    res["syncs"] = count_syncs(steps["crosspt"], max(2, a.steps // 10), device)
    print(render_syncs(res["syncs"]), flush=True)
    if a.profile_steps:
        res["profile"] = profile_ops(steps["crosspt"], a.profile_steps, device)
        print(render_profile(res["profile"], res["device"]), flush=True)
    del runs, steps, variants, backbone
    if use_gpu:
        torch.cuda.empty_cache()
    return res


# ---- 4: trials per GPU, c processes each running trials with run_loop ------------------------------------
def worker(spec: dict) -> None:
    """One process of a concurrency level: `waves` trials one after the other, each a fresh `run_loop` with a
    `LocalSession` (backbone loaded from disk, splits drawn, evaluation, checkpoints), as an in-process Tune
    trial runs them; prints one JSON line with each trial's timings."""
    from types import SimpleNamespace

    from crosspt.run.loop import LocalSession, run_loop

    a = SimpleNamespace(**spec["args"])
    rows = []
    for w in range(a.waves):
        lr = (0.3, 0.1, 0.03)[(spec["index"] + w) % 3]
        cfg = run_config(a, Path(spec["backbone"]), Path(spec["data_dir"]), "crosspt", spec["use_gpu"],
                         **{"seed": spec["index"] * 100 + w, "data.shots": a.trial_shots,
                            "data.max_test": 4 * a.trial_shots, "train.epochs": a.trial_epochs,
                            "train.batch_size": 8, "train.generated_metrics": False, "optim.prompt_lr": lr,
                            "backbone.max_length": 64})
        started = time.time()
        with tempfile.TemporaryDirectory(prefix="gpu_check_trial_") as d:
            session = LocalSession(d, use_gpu=spec["use_gpu"])
            result = run_loop(cfg, session)
        end, clock = time.time(), session.clock
        rows.append({"wave": w, "wall_s": end - started, "start_to_first_step_s": clock["first_step"] - started,
                     "last_step_to_end_s": end - clock["last_step"], "eval_s": clock["eval_s"],
                     "train_s": clock["last_step"] - clock["first_step"], "test_score": result["test_score"]})
    print("TRIALS_JSON " + json.dumps(rows), flush=True)


class DeviceMemoryPeak:
    """Peak device-wide GPU memory in use (every process: the trials), sampled in a thread."""

    def __init__(self, use_gpu: bool, every: float = 0.2):
        import threading

        self.use_gpu, self.every, self.peak = use_gpu, every, 0
        self.baseline = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _used(self) -> int:
        if not self.use_gpu:
            return 0
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def trials_bytes(self) -> int:
        return max(0, self.peak - self.baseline)


def measure_concurrency(a, backbone_dir: Path, data_dir: Path, use_gpu: bool) -> list[dict]:
    """For each level c: c processes at once on the GPU, `waves` trials each; trials/hour over the level's wall."""
    args = {k: v for k, v in vars(a).items() if k not in ("concurrency", "json", "worker")}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    for c in a.concurrency:
        specs = [{"args": args, "index": i, "backbone": str(backbone_dir), "data_dir": str(data_dir),
                  "use_gpu": use_gpu} for i in range(c)]
        with DeviceMemoryPeak(use_gpu) as mem:
            t = time.time()
            procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(s)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env) for s in specs]
            outs = []
            for p in procs:
                try:
                    out, err = p.communicate(timeout=max(1.0, a.level_timeout - (time.time() - t)))
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, err = p.communicate()
                outs.append((p.returncode, out, err))
            wall = time.time() - t
        trials, failed = [], 0
        for rc, out, err in outs:
            line = [x for x in out.splitlines() if x.startswith("TRIALS_JSON ")]
            if rc or not line:
                failed += a.waves
                print(f"  a trial process failed (exit {rc}): {err.strip()[-600:]}", flush=True)
                continue
            trials += json.loads(line[-1][len("TRIALS_JSON "):])

        def med(k, rows=trials):
            return statistics.median(x[k] for x in rows) if rows else float("nan")

        row = {"concurrency": c, "trials": len(trials), "failed": failed, "wall_s": wall,
               "trials_per_hour": len(trials) / wall * 3600, "median_trial_s": med("wall_s"),
               "start_to_first_step_s": med("start_to_first_step_s"),
               # a process's later trials find the frozen backbone loaded (`crosspt.run.backbone_cache`)
               "start_to_first_step_later_s": med("start_to_first_step_s", [x for x in trials if x["wave"] > 0]),
               "last_step_to_end_s": med("last_step_to_end_s"),
               "eval_share": (sum(x["eval_s"] for x in trials) / sum(x["wall_s"] for x in trials)) if trials else float("nan"),
               "gpu_mem_bytes": mem.trials_bytes, "gpu_mem_per_trial_bytes": mem.trials_bytes / c}
        rows.append(row)
        print(render_concurrency([row], header=len(rows) == 1), flush=True)
    return rows


# ---- output ---------------------------------------------------------------------------------------------
GIB = 1024 ** 3


def render_steps(res: dict, a) -> str:
    pc, st = res["params"], res["steps"]
    lines = [f"device: {res['device']}; frozen weights {res['weights_dtype'].replace('torch.', '')} "
             f"({res['weights_bytes'] / GIB:.2f} GiB); T5 {'tiny' if a.tiny else 'base-shaped'} {pc['total'] / 1e6:.1f}M "
             f"params (encoder {pc['encoder_nonemb'] / 1e6:.1f}M + decoder {pc['decoder_nonemb'] / 1e6:.1f}M "
             f"non-embedding, embedding/LM head {pc['embedding'] / 1e6:.1f}M); build {res['build_s']:.1f}s",
             f"batch {res['batch']} x ({res['composed_len']} prompt + {res['input_tokens']} input) encoder tokens, "
             f"{res['decoder_tokens']} decoder tokens; FLOPs/step {res['flops_per_step'] / 1e12:.2f} TFLOP "
             f"(4 x (N_enc x enc_tokens + (N_dec + V*d) x dec_tokens)); peak {a.peak_tflops:.0f} TFLOP/s; "
             f"steps timed in blocks of {a.block} between device syncs", "",
             "| step (`crosspt.run.loop._train_step`) | median step (ms) | examples/s | TFLOP/s | MFU | peak mem (GiB) |",
             "|---|---|---|---|---|---|"]
    labels = {"pt": f"PT (private {res['composed_len']})",
              "crosspt": f"CrossPT cat ({a.sources}x{a.source_len} + {a.private_len})",
              "crosspt_old_syncs": "CrossPT + the old loop's 2 host reads per step",
              "crosspt_fp32_weights": "CrossPT, frozen weights fp32 under bf16 autocast (the old loader)"}
    for name, r in st.items():
        lines.append(f"| {labels[name]} | {r['median_step_s'] * 1e3:.1f} | {r['examples_per_s']:.0f} | "
                     f"{r['tflops']:.1f} | {r['mfu'] * 100:.1f}% | {r['peak_mem_bytes'] / GIB:.2f} |")
    lines += ["", f"step time ratio CrossPT / PT = {res['ratio_crosspt_vs_pt']:.3f} (target <= 1.10)"]
    for name in ("crosspt_old_syncs", "crosspt_fp32_weights"):
        if name in st:
            lines.append(f"{labels[name]} / CrossPT = {st[name]['median_step_s'] / st['crosspt']['median_step_s']:.3f}")
    return "\n".join(lines)


def render_syncs(s: dict) -> str:
    lines = ["", f"host syncs per training step ({s['steps']} steps):"]
    if "cuda_debug_mode_per_step" in s:
        lines.append(f"- torch.cuda.set_sync_debug_mode: {s['cuda_debug_mode_per_step']:g} per step"
                     + (f" ({', '.join(f'{n}x {w}' for w, n in s['cuda_debug_mode_where'].items())})"
                        if s["cuda_debug_mode_where"] else ""))
    lines.append(f"- count_host_syncs: {s['counted_per_step']:g} per step, {s['counted_ours_per_step']:g} in crosspt's "
                 f"code" + (f" ({'; '.join(f'{n}x {w}' for w, n in s['counted_where'].items())})"
                            if s["counted_where"] else ""))
    return "\n".join(lines)


def render_profile(p: dict, device: str) -> str:
    busy = f"; device busy {p['device_busy_share'] * 100:.0f}% of the wall" if p["device_busy_share"] is not None else ""
    lines = ["", f"torch.profiler, CrossPT step ({p['profiled_wall_ms_per_step']:.1f} ms/step profiled{busy}), top "
                 f"{len(p['ops'])} ops by self {'CUDA' if device != 'cpu' else 'CPU'} time:",
             "| op | self ms / step | share | calls / step |", "|---|---|---|---|"]
    lines += [f"| `{r['op'][:80]}` | {r['self_ms_per_step']:.2f} | {r['share'] * 100:.1f}% | {r['calls_per_step']:g} |"
              for r in p["ops"]]
    return "\n".join(lines)


def render_concurrency(rows: list[dict], header: bool = True) -> str:
    lines = ["", "Trials per GPU (c processes on the one GPU, each running trials with run_loop + LocalSession, no Ray):",
             "| trials per GPU | trials (failed) | wall (s) | trials/hour | median trial (s) | start -> first step (s): "
             "all / a process's later trials | last step -> end (s) | eval share of trial wall | peak GPU mem (GiB) "
             "| per trial (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"] if header else []
    lines += [f"| {r['concurrency']} | {r['trials']} ({r['failed']}) | {r['wall_s']:.0f} | {r['trials_per_hour']:.0f} | "
              f"{r['median_trial_s']:.1f} | {r['start_to_first_step_s']:.1f} / {r['start_to_first_step_later_s']:.1f} | "
              f"{r['last_step_to_end_s']:.1f} | "
              f"{r['eval_share'] * 100:.0f}% | {r['gpu_mem_bytes'] / GIB:.2f} | {r['gpu_mem_per_trial_bytes'] / GIB:.2f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return {}
    use_gpu = torch.cuda.is_available() and not a.cpu
    device = torch.device("cuda" if use_gpu else "cpu")
    if not use_gpu:
        torch.set_num_threads(1)         # a CPU run is a smoke test: one thread, no oversubscribed cores
    t0 = time.time()
    print(f"torch {torch.__version__}, {'GPU ' + torch.cuda.get_device_name(0) if use_gpu else 'CPU'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        backbone_dir = write_backbone(tmp / "t5", a.tiny)
        data_dir = write_sst2(tmp / "data", rows=max(256, 8 * a.trial_shots))
        res = {"steps": measure_steps(a, backbone_dir, data_dir, device)}
        if a.concurrency:
            res["concurrency"] = measure_concurrency(a, backbone_dir, data_dir, use_gpu)
    res["wall_s"] = time.time() - t0
    print(f"\nwall {res['wall_s']:.1f}s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()

"""GPU check: CrossPT vs prompt tuning training throughput on a T5-base-sized frozen model (random weights),
where its time goes (torch.profiler, top 10 ops), and how many trials one GPU runs at once.

    python jobs/gpu_check.py            # one GPU, bf16 autocast: all three parts, < 8 min on an H100/H200
    python jobs/gpu_check.py --tiny     # tiny config, a few steps, CPU is fine (checks that it runs)
    python jobs/gpu_check.py --tiny --concurrency 1,2   # the concurrency part too, on CPU

1. Step time and MFU, PT vs CrossPT: needs only torch + transformers + crosspt's method and backbone layers
   (the model is built from a T5Config, batches are random token ids; no Ray / MLflow / Optuna / datasets).
2. Profile: a few CrossPT steps under torch.profiler, the 10 ops with the most self (CUDA) time.
3. Concurrency (`--concurrency 1,2,4,8`, default on a GPU): for each c a real `crosspt` search (Ray Tune +
   Optuna + MLflow in a temp folder) of `--waves` x c trials at `scaling.gpus_per_worker = 1/c` on the same
   random T5-base-shaped model saved to disk (with a small word-level tokenizer) and a synthetic SST-2 of
   a few dozen rows: trials/hour and the GPU memory the trials held at their peak (device-wide, less what
   was in use before the search).

Compared at equal composed prompt length: CrossPT = 4 sources x 25 + private 25, `cat` (125 tokens), task
router; PT = one private prompt of 125 tokens. Both train only the prompt (+ router) with AdamW, through
the same frozen backbone and the same batches.

MFU: the backbone is frozen, so the backward pass computes activation gradients only (no weight
gradients): FLOPs/step = 4 x (N_enc x encoder tokens + (N_dec + V*d) x decoder tokens), i.e. 2N forward +
2N backward per token instead of the usual 6N, where N_enc / N_dec are the non-embedding parameters of
the encoder / decoder stacks, V*d the (tied) LM-head projection applied to decoder tokens, and encoder
tokens include the prompt. Attention-score FLOPs (QK^T, AV) are not counted. Peak: H100 / H200 SXM bf16 dense
989 TFLOP/s (--peak-tflops).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout

import torch

H100_BF16_DENSE_TFLOPS = 989.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model and batch (CPU smoke test)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128, help="input tokens per example (before the prompt)")
    p.add_argument("--target-len", type=int, default=4, help="decoder (label) tokens per example")
    p.add_argument("--sources", type=int, default=4)
    p.add_argument("--source-len", type=int, default=25)
    p.add_argument("--private-len", type=int, default=25)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="alternating PT / CrossPT blocks")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                   help="frozen weights kept in fp32 (bf16 autocast casts them each step) or stored in bf16")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa | eager)")
    p.add_argument("--profile-steps", type=int, default=5, help="CrossPT steps under torch.profiler (0: skip)")
    p.add_argument("--concurrency", default=None,
                   help="trials per GPU to measure, e.g. 1,2,4,8 (default on a GPU; '' or none on CPU)")
    p.add_argument("--waves", type=int, default=2, help="trials per level = waves x concurrency")
    p.add_argument("--search-epochs", type=int, default=2)
    a = p.parse_args(argv)
    if a.tiny:
        a.batch, a.seq, a.target_len, a.sources, a.source_len, a.private_len = 4, 16, 2, 2, 3, 3
    on_gpu = torch.cuda.is_available() and not a.cpu
    text = a.concurrency if a.concurrency is not None else ("1,2,4,8" if on_gpu and not a.tiny else "")
    a.concurrency = [int(c) for c in text.split(",") if c.strip()]
    return a


def build_model(tiny: bool, attn: str = "sdpa"):
    from transformers import T5Config, T5ForConditionalGeneration

    if tiny:
        cfg = T5Config(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                       num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    else:   # t5-base shape
        cfg = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                       num_heads=12, dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                       decoder_start_token_id=0, tie_word_embeddings=True)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg)


def param_counts(model) -> dict:
    emb = model.shared.weight.numel()
    enc = sum(p.numel() for p in model.encoder.parameters()) - emb       # encoder.embed_tokens is `shared`
    dec = sum(p.numel() for p in model.decoder.parameters()) - emb
    head = model.config.vocab_size * model.config.d_model
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"total": total, "embedding": emb, "encoder_nonemb": enc, "decoder_nonemb": dec, "lm_head": head}


def step_flops(pc: dict, batch: int, enc_tokens: int, dec_tokens: int) -> float:
    return 4.0 * (pc["encoder_nonemb"] * batch * enc_tokens + (pc["decoder_nonemb"] + pc["lm_head"]) * batch * dec_tokens)


def make_batches(n: int, batch: int, seq: int, tlen: int, vocab: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        out.append({"input_ids": torch.randint(2, vocab, (batch, seq), generator=g).to(device),
                    "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
                    "target_ids": torch.randint(2, vocab, (batch, tlen), generator=g).to(device),
                    "task_ids": torch.zeros(batch, dtype=torch.long, device=device)})
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    from crosspt.backbones.seq2seq import Seq2SeqBackbone
    from crosspt.method.prompts import CrossPTPrompt, PromptSpec
    from crosspt.tasks.specs import get_task

    use_gpu = torch.cuda.is_available() and not a.cpu
    device = torch.device("cuda" if use_gpu else "cpu")
    t0 = time.time()
    model = build_model(a.tiny, a.attn)
    if a.weights == "bf16":
        model = model.to(torch.bfloat16)
    pc = param_counts(model)
    backbone = Seq2SeqBackbone(model, None, [get_task("sst2")], name="t5-base-shaped-random").to(device)
    d = model.config.d_model
    emb = backbone.word_embeddings().weight.detach()
    composed = (a.sources + 1) * max(a.source_len, a.private_len)
    prompts = {
        "pt": CrossPTPrompt(PromptSpec(n_tasks=1, dim=d, n_sources=0, private_len=composed, init="random"),
                            word_embeddings=emb.cpu(), seed=0).to(device),
        "crosspt": CrossPTPrompt(PromptSpec(n_tasks=1, dim=d, n_sources=a.sources, source_len=a.source_len,
                                            private_len=a.private_len, composition="cat", init="random"),
                                 word_embeddings=emb.cpu(), seed=0).to(device),
    }
    assert prompts["pt"].spec.composed_len == prompts["crosspt"].spec.composed_len == composed
    opts = {k: torch.optim.AdamW(p.param_groups(0.3, 0.01)) for k, p in prompts.items()}
    batches = make_batches(8, a.batch, a.seq, a.target_len, model.config.vocab_size, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_gpu else torch.autocast("cpu", enabled=False)
    build_s = time.time() - t0

    def sync():
        if use_gpu:
            torch.cuda.synchronize()

    def run(name: str, n: int) -> list[float]:
        prompt, opt = prompts[name], opts[name]
        prompt.train()
        times = []
        for i in range(n):
            b = batches[i % len(batches)]
            sync()
            t = time.perf_counter()
            with autocast:
                p, m, _ = prompt(b["task_ids"])
                loss = backbone.loss(p, m, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            prompt.set_step(int(prompt.step) + 1)
            sync()
            times.append(time.perf_counter() - t)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss {float(loss)}")
        return times

    weights_mem = torch.cuda.memory_allocated() if use_gpu else 0
    step_times = {k: [] for k in prompts}
    peak = {k: 0 for k in prompts}
    for name in prompts:
        run(name, a.warmup)
    for r in range(a.rounds):
        for name in (("pt", "crosspt") if r % 2 == 0 else ("crosspt", "pt")):
            if use_gpu:
                torch.cuda.reset_peak_memory_stats()
            step_times[name] += run(name, a.steps)
            if use_gpu:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
    enc_tokens, dec_tokens = composed + a.seq, a.target_len
    flops = step_flops(pc, a.batch, enc_tokens, dec_tokens)
    dtype = ("bf16 autocast" if use_gpu else "fp32") + f", {a.weights} weights, attention {model.config._attn_implementation}"
    res = {"device": torch.cuda.get_device_name(0) if use_gpu else "cpu", "dtype": dtype,
           "params": pc, "batch": a.batch, "seq": a.seq, "target_len": a.target_len, "build_s": build_s,
           "flops_per_step": flops, "weights_bytes": weights_mem}
    for name in prompts:
        med = statistics.median(step_times[name])
        res[name] = {"composed_len": prompts[name].spec.composed_len, "median_step_s": med,
                     "mean_step_s": statistics.fmean(step_times[name]), "steps": len(step_times[name]),
                     "examples_per_s": a.batch / med, "tokens_per_s": a.batch * (enc_tokens + dec_tokens) / med,
                     "peak_mem_bytes": peak[name], "tflops": flops / med / 1e12,
                     "mfu": flops / med / (a.peak_tflops * 1e12)}
    res["step_time_ratio"] = res["crosspt"]["median_step_s"] / res["pt"]["median_step_s"]
    res["peak_mem_ratio"] = (res["crosspt"]["peak_mem_bytes"] / res["pt"]["peak_mem_bytes"]) if use_gpu else None
    if a.profile_steps:
        res["profile"] = profile_ops(lambda: run("crosspt", 1), a.profile_steps, use_gpu)
    if a.concurrency:
        res["concurrency"] = measure_concurrency(model, a, use_gpu)
    res["wall_s"] = time.time() - t0
    print(render(res, a))
    return res


def profile_ops(step, n: int, use_gpu: bool, top: int = 10) -> list[dict]:
    """`n` calls of `step` under torch.profiler: the `top` ops by self time on the device (CUDA kernels'
    time on a GPU, CPU time on CPU), each with its share of the profiled total."""
    from torch.profiler import ProfilerActivity, profile

    step()                                           # warm: no first-call allocations in the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
    key = "self_device_time_total" if use_gpu else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"op": e.key, "self_ms_per_step": getattr(e, key) / 1e3 / n, "share": getattr(e, key) / total,
             "calls_per_step": e.count / n} for e in events[:top]]


# ---- trials per GPU: a real crosspt search per concurrency level --------------------------------------
WORDS = ("good great fine lovely charming moving bad dull awful boring weak flat the a film movie story "
         "plot actor it is was and but very not quite").split()


def write_backbone(model, folder: Path) -> Path:
    """The (random) model and a word-level tokenizer over `WORDS` and the sst2 label words, T5 flavour:
    `[PAD]` 0 = pad = decoder start, `[SEP]` 1 = eos appended to every sequence, `[UNK]` 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[SEP]": 1, "[UNK]": 2}
    for w in (*WORDS, "negative", "positive", "sst2", ":", ".", ","):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A [SEP]", pair="$A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[SEP]", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[SEP]", unk_token="[UNK]",
                                   model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def write_sst2(data_dir: Path, rows: int = 64) -> Path:
    """A synthetic `glue_data/SST-2` (train.tsv, dev.tsv): the layout crosspt reads, no download."""
    import random

    rng = random.Random(0)
    folder = data_dir / "glue_data" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        lines = ["sentence\tlabel"] + [f"{' '.join(rng.choices(WORDS, k=12))}\t{i % 2}" for i in range(rows)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return data_dir


def level_space(backbone: Path, c: int, a, use_gpu: bool):
    """The search of one level: `waves x c` trials, `c` at once, each on 1/c of the GPU."""
    from crosspt.config.space import SearchSpace

    scaling = {"num_workers": 1, "in_process": True, "cpus_per_worker": 1, "use_gpu": use_gpu,
               **({"gpus_per_worker": 1.0 / c} if use_gpu else {})}
    return SearchSpace.model_validate({
        "name": f"gpu-check-c{c}",
        "base": {"tasks": ["sst2"], "backbone": {"name": str(backbone), "max_length": 64},
                 "data": {"shots": 8, "max_test": 32}, "prompt": {"n_sources": a.sources,
                 "source_len": a.source_len, "private_len": a.private_len},
                 "train": {"batch_size": 8, "eval_batch_size": 32, "patience": None}, "scaling": scaling},
        "space": {"optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.3}},
        "objective": {"metric": "best_val_score", "mode": "max"},
        "budget": {"num_samples": a.waves * c, "max_epochs": a.search_epochs},
        "scheduler": {"type": "fifo"}, "resources": {"max_concurrent_trials": c},
        "search": {"algorithm": "random", "seed": 0}})


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


def measure_concurrency(model, a, use_gpu: bool) -> list[dict]:
    """For each level c of `a.concurrency`: trials/hour and the trials' peak GPU memory of a real search."""
    import tempfile

    from crosspt.search.driver import run_search

    if use_gpu:
        torch.cuda.empty_cache()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        backbone = write_backbone(model.float(), tmp / "t5-base-shaped")
        data_dir = write_sst2(tmp / "data")
        for c in a.concurrency:
            space = level_space(backbone, c, a, use_gpu)
            with DeviceMemoryPeak(use_gpu) as mem:
                t = time.time()
                summary = run_search(space, data_dir=str(data_dir), tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                                     storage_path=str(tmp / "ray_results"), verbose=0)
                wall = time.time() - t
            done = summary["num_trials"] - summary["num_failed"]
            rows.append({"concurrency": c, "trials": summary["num_trials"], "failed": summary["num_failed"],
                         "wall_s": wall, "trials_per_hour": done / wall * 3600,
                         "gpu_mem_bytes": mem.trials_bytes, "gpu_mem_per_trial_bytes": mem.trials_bytes / c})
    return rows


def render(res: dict, a) -> str:
    pc = res["params"]
    gib = 1024 ** 3
    lines = [f"device: {res['device']} ({res['dtype']}); frozen T5 {'tiny' if a.tiny else 'base-shaped'} "
             f"{pc['total'] / 1e6:.1f}M params (encoder {pc['encoder_nonemb'] / 1e6:.1f}M + decoder "
             f"{pc['decoder_nonemb'] / 1e6:.1f}M non-embedding, embedding/LM head {pc['embedding'] / 1e6:.1f}M)",
             f"batch {res['batch']} x ({res['crosspt']['composed_len']} prompt + {res['seq']} input) encoder tokens, "
             f"{res['target_len']} decoder tokens; {res['pt']['steps']} timed steps per method "
             f"(alternating blocks), build {res['build_s']:.1f}s",
             f"FLOPs/step = 4 x (N_enc x enc_tokens + (N_dec + V*d) x dec_tokens) = {res['flops_per_step'] / 1e12:.2f} TFLOP "
             f"(frozen weights: no weight-gradient FLOPs; attention scores not counted); "
             f"peak {a.peak_tflops:.0f} TFLOP/s",
             "",
             "| method | composed len | median step (ms) | examples/s | tokens/s | peak GPU mem (GiB) | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for name, label in (("pt", f"PT (private {res['pt']['composed_len']})"), ("crosspt", f"CrossPT cat ({a.sources}x{a.source_len} + {a.private_len})")):
        r = res[name]
        lines.append(f"| {label} | {r['composed_len']} | {r['median_step_s'] * 1e3:.1f} | {r['examples_per_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_mem_bytes'] / gib:.2f} | {r['tflops']:.1f} | "
                     f"{r['mfu'] * 100:.1f}% |")
    lines.append("")
    lines.append(f"step time ratio CrossPT / PT = {res['step_time_ratio']:.3f} (target <= 1.10)")
    if res["peak_mem_ratio"] is not None:
        lines.append(f"peak memory ratio CrossPT / PT = {res['peak_mem_ratio']:.3f}; frozen weights "
                     f"{res['weights_bytes'] / gib:.2f} GiB")
    if res.get("profile"):
        lines += ["", f"torch.profiler, CrossPT step, top {len(res['profile'])} ops by self "
                      f"{'CUDA' if res['device'] != 'cpu' else 'CPU'} time:",
                  "| op | self ms / step | share | calls / step |", "|---|---|---|---|"]
        lines += [f"| `{r['op']}` | {r['self_ms_per_step']:.2f} | {r['share'] * 100:.1f}% | {r['calls_per_step']:g} |"
                  for r in res["profile"]]
    if res.get("concurrency"):
        lines += ["", "Trials per GPU (real crosspt search per level, scaling.gpus_per_worker = 1/c):",
                  "| trials per GPU | trials (failed) | wall (s) | trials/hour | trials' peak GPU mem (GiB) | per trial (GiB) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['concurrency']} | {r['trials']} ({r['failed']}) | {r['wall_s']:.0f} | {r['trials_per_hour']:.0f} | "
                  f"{r['gpu_mem_bytes'] / gib:.2f} | {r['gpu_mem_per_trial_bytes'] / gib:.2f} |" for r in res["concurrency"]]
    lines.append(f"wall {res['wall_s']:.1f}s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

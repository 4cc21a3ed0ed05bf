"""Few-shot benchmark: baselines and CrossPT on the same backbone, data, k-shot samples, seeds and budget.

Methods (one row each; every trained method gets the same epochs / patience / batch size and the same
learning-rate grid over ITS OWN learning rate, picked by validation score):

    zero_shot     no training: the frozen backbone with an empty prompt (label semantics only)
    pt            vanilla prompt tuning, our module (n_sources=0, private prompt only)
    peft_pt       PEFT's PromptTuning as an outside reference for the PT row (encoder: PEFT's
                  FEATURE_EXTRACTION model around the AutoModel, virtual tokens before [CLS], scored
                  like our encoder family; seq2seq/decoder: PEFT's PromptEmbedding fed to our adapter,
                  rank classification)
    spot          SPoT: the target prompt starts as a copy of the best source prompt (best by target
                  validation score of each source prompt used as-is) = what `prompt.init=source` does
                  with a 1-source bank; the source itself is not composed
    attempt       ATTEMPT-style: input-conditioned attention router over the sources + private, wavg
    mpt           MPT: PEFT's MultitaskPromptTuning, source stage on the other tasks (multi-task),
                  target stage initialised with AVERAGE_SOURCE_TASKS
    crosspt_cat   CrossPT, task router, concatenation of the weighted sources + private prompt
    crosspt_wavg  CrossPT, task router, weighted average

Source prompts are single-task PT prompts (the `pt` runs at `source_shots`, best lr by validation),
trained once per seed per task of the source pool; each target's bank leaves the target out
(`select_sources(..., exclude=[target])`).

Jobs are plain dicts executed by `execute_job` (sequentially, or as Ray tasks when `parallel > 1`).
Nothing here imports Ray or MLflow at module import.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("zero_shot", "pt", "peft_pt", "spot", "attempt", "mpt", "crosspt_cat", "crosspt_wavg")
LABELS = {"zero_shot": "Zero-shot", "pt": "PT (ours)", "peft_pt": "PT (PEFT)", "spot": "SPoT",
          "attempt": "ATTEMPT-style", "mpt": "MPT (PEFT)", "crosspt_cat": "CrossPT cat",
          "crosspt_wavg": "CrossPT wavg"}
TRAINED = tuple(m for m in METHODS if m != "zero_shot")
NEEDS_SOURCES = ("spot", "attempt", "mpt", "crosspt_cat", "crosspt_wavg")
ALL_TASKS = ("sst2", "rte", "mrpc", "cola", "stsb", "qnli")


@dataclass
class BenchSettings:
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))          # targets
    source_tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))   # source pool
    shots: list[int] = field(default_factory=lambda: [16, 32])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lrs: list[float] = field(default_factory=lambda: [0.3, 0.1, 0.03])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    backbone: str = "minilm"
    epochs: int = 20
    patience: int | None = 5
    batch_size: int = 8
    eval_batch_size: int = 64
    max_test: int | None = None
    max_length: int = 128
    prompt_len: int = 10               # private length = source length = PEFT virtual tokens
    source_shots: int | None = None    # k per class of the source prompts (default: max(shots))
    router_lr: float = 0.01            # fixed (not searched) for every method with a router
    data_dir: str | None = None
    threads: int | None = None         # torch threads per job (None: torch's default)

    def src_k(self) -> int:
        return self.source_shots or max(self.shots)

    def check(self) -> None:
        from crosspt.errors import ConfigError
        from crosspt.tasks.specs import resolve_tasks

        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown benchmark method(s) {bad}; choose from {', '.join(METHODS)}")
        resolve_tasks(list(self.tasks))
        resolve_tasks(list(self.source_tasks))
        if any(m in NEEDS_SOURCES for m in self.methods):
            for t in self.tasks:
                if not [s for s in self.source_tasks if s != t]:
                    raise ConfigError(f"target '{t}' has no source task left after leaving it out "
                                      f"(source pool: {self.source_tasks})")
        if not self.lrs or not self.seeds or not self.shots:
            raise ConfigError("lrs, seeds and shots must be non-empty")


# ---- prompt modules that are not ours (same interface as crosspt.prompts.CrossPTPrompt) ---------------
class EmptyPrompt(nn.Module):
    """A length-0 prompt for every task: zero-shot, and the PEFT encoder path (PEFT adds its own)."""

    def __init__(self, n_tasks: int, dim: int):
        super().__init__()
        from crosspt.method.prompts import PromptSpec

        self.spec = PromptSpec(n_tasks=n_tasks, dim=dim, n_sources=0, private_len=0)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    temperature = 0.0

    def set_step(self, step: int) -> None:
        self.step.fill_(step)

    def needs_input(self) -> bool:
        return False

    def forward(self, task_ids, input_embeds=None, input_mask=None):
        b, dev = task_ids.shape[0], self.step.device
        return (torch.zeros(b, 0, self.spec.dim, device=dev), torch.zeros(b, 0, dtype=torch.long, device=dev),
                torch.zeros(b, 0, device=dev))

    def task_weights(self) -> torch.Tensor:
        return torch.zeros(self.spec.n_tasks, 0)

    def collapsed(self, task_id: int):
        return torch.zeros(0, self.spec.dim), torch.zeros(0, dtype=torch.long)

    def param_groups(self, prompt_lr, router_lr, weight_decay=0.0) -> list[dict]:
        return []


class PeftPrompt(EmptyPrompt):
    """PEFT's own PromptEmbedding / MultitaskPromptEmbedding as a prompt module (seq2seq/decoder path)."""

    def __init__(self, n_tasks: int, dim: int, encoder: nn.Module, n_virtual: int, multitask: bool):
        super().__init__(n_tasks, dim)
        self.encoder = encoder
        self.multitask = multitask
        self.spec = type(self.spec)(n_tasks=n_tasks, dim=dim, n_sources=0, private_len=n_virtual)
        self.register_buffer("indices", torch.arange(n_virtual), persistent=False)

    def forward(self, task_ids, input_embeds=None, input_mask=None):
        b = task_ids.shape[0]
        idx = self.indices.unsqueeze(0).expand(b, -1)
        p = self.encoder(idx, task_ids) if self.multitask else self.encoder(idx)
        return p, torch.ones(p.shape[:2], dtype=torch.long, device=p.device), torch.ones(b, 1, device=p.device)

    def task_weights(self) -> torch.Tensor:
        return torch.ones(self.spec.n_tasks, 1)

    @torch.no_grad()
    def collapsed(self, task_id: int):
        p, m, _ = self(torch.tensor([task_id], device=self.indices.device))
        return p[0].detach().cpu(), m[0].cpu()

    def param_groups(self, prompt_lr, router_lr, weight_decay=0.0) -> list[dict]:
        return [{"params": [p for p in self.encoder.parameters() if p.requires_grad], "lr": prompt_lr,
                 "weight_decay": weight_decay, "name": "prompts"}]


def _peft_encoder_class():
    from crosspt.backbones.encoder import EncoderBackbone

    class PeftEncoderBackbone(EncoderBackbone):
        """Our encoder scoring (mean pool over the real tokens, cosine to the class sentences, bi-encoded
        pairs), with the frozen AutoModel wrapped by PEFT: virtual tokens go where PEFT puts them (before
        [CLS]) and position/token-type ids are left to the model, as PeftModelForFeatureExtraction does."""

        n_virtual = 0
        multitask = False
        _row_task_ids = None

        def _outputs(self, prompt, prompt_mask, batch):
            batch = self._to_device(batch)
            t = batch["task_ids"]
            self._row_task_ids = torch.cat([t, t[batch["b_rows"]]])
            return super()._outputs(prompt, prompt_mask, batch)

        def encode(self, prompt, prompt_mask, input_ids, attention_mask, token_type_ids=None):
            if prompt.shape[1]:
                raise ValueError("the PEFT encoder path takes its prompt from PEFT, not from a prompt module")
            n, lv = input_ids.shape[0], self.n_virtual
            if self.multitask:
                # PeftModelForFeatureExtraction.forward calls get_prompt without task_ids, which MPT needs:
                # do the same concatenation here, with the task ids
                emb = self.word_embeddings()(input_ids)
                p = self.model.get_prompt(batch_size=n, task_ids=self._row_task_ids[:n]).to(emb.dtype)
                m = torch.cat([torch.ones(n, lv, dtype=attention_mask.dtype, device=attention_mask.device),
                               attention_mask], dim=1)
                hidden = self.model.base_model(inputs_embeds=torch.cat([p, emb], dim=1),
                                               attention_mask=m).last_hidden_state
            else:
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            hidden = hidden[:, lv:]
            pool = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * pool).sum(1) / pool.sum(1).clamp(min=1e-6)
            return F.normalize(mean.float(), dim=-1)

    return PeftEncoderBackbone


def peft_config(kind: str, n_virtual: int, dim: int, *, n_tasks: int = 1, task_type: str = "FEATURE_EXTRACTION",
                init_state: str | None = None):
    """PEFT's PromptTuningConfig (SAMPLE_VOCAB init) or MultitaskPromptTuningConfig (RANDOM for the source
    stage, AVERAGE_SOURCE_TASKS from `init_state` for the target stage)."""
    from peft import MultitaskPromptTuningConfig, PromptTuningConfig

    common = dict(task_type=task_type, num_virtual_tokens=n_virtual, token_dim=dim, num_transformer_submodules=1)
    if kind == "pt":
        return PromptTuningConfig(prompt_tuning_init="SAMPLE_VOCAB", **common)
    if init_state:
        return MultitaskPromptTuningConfig(prompt_tuning_init="AVERAGE_SOURCE_TASKS",
                                           prompt_tuning_init_state_dict_path=init_state, num_tasks=1, **common)
    return MultitaskPromptTuningConfig(prompt_tuning_init="RANDOM", num_tasks=n_tasks, **common)


def attach_peft(backbone, kind: str, n_virtual: int, *, n_tasks: int = 1, init_state: str | None = None):
    """Wrap a loaded backbone for PEFT prompt tuning -> (prompt module, backbone)."""
    if backbone.family == "encoder":
        from peft import get_peft_model

        cfg = peft_config(kind, n_virtual, backbone.embed_dim, n_tasks=n_tasks, init_state=init_state)
        backbone.__class__ = _peft_encoder_class()
        backbone.n_virtual, backbone.multitask = n_virtual, kind == "mpt"
        backbone.model = get_peft_model(backbone.model, cfg)
        backbone.model.eval()
        return EmptyPrompt(backbone.num_tasks, backbone.embed_dim), backbone
    from peft.tuners.multitask_prompt_tuning.model import MultitaskPromptEmbedding
    from peft.tuners.prompt_tuning import PromptEmbedding

    task_type = "SEQ_2_SEQ_LM" if backbone.family == "seq2seq" else "CAUSAL_LM"
    cfg = peft_config(kind, n_virtual, backbone.embed_dim, n_tasks=n_tasks, task_type=task_type,
                      init_state=init_state)
    enc = (MultitaskPromptEmbedding if kind == "mpt" else PromptEmbedding)(cfg, backbone.word_embeddings())
    return PeftPrompt(backbone.num_tasks, backbone.embed_dim, enc.float(), n_virtual, kind == "mpt"), backbone


def mpt_state(model) -> dict[str, torch.Tensor]:
    """The MPT source-stage tensors in PEFT's own state-dict layout (what its target init loads)."""
    enc = _mpt_encoder(model)
    return {"prefix_task_cols": enc.prefix_task_cols.detach().cpu().contiguous(),
            "prefix_task_rows": enc.prefix_task_rows.detach().cpu().contiguous(),
            "prompt_embeddings": enc.embedding.weight.detach().cpu().contiguous()}


def _mpt_encoder(model):
    if isinstance(model.prompt, PeftPrompt):
        return model.prompt.encoder
    pm = model.backbone.model
    return pm.prompt_encoder[pm.active_adapter]


# ---- one job ---------------------------------------------------------------------------------------
def prompt_tree(method: str, s: BenchSettings, n_sources: int) -> dict:
    L = s.prompt_len
    pt = {"n_sources": 0, "private_len": L, "init": "vocab"}
    if method in ("zero_shot", "pt", "spot", "peft_pt", "mpt", "mpt_source"):
        return pt
    comp = {"attempt": "wavg", "crosspt_cat": "cat", "crosspt_wavg": "wavg"}[method]
    return {"n_sources": n_sources, "source_len": L, "private_len": L, "init": "vocab", "composition": comp,
            "router": "attention" if method == "attempt" else "task"}


def run_config(s: BenchSettings, method: str, tasks: Sequence[str], k: int, seed: int, lr: float,
               n_sources: int = 0):
    from crosspt.config.schema import build_config

    tree = {"name": f"bench-{method}-{'+'.join(tasks)}-k{k}-s{seed}", "seed": seed, "tasks": list(tasks),
            "backbone": {"name": s.backbone, "max_length": s.max_length},
            "data": {"data_dir": s.data_dir, "shots": k, "max_test": s.max_test},
            "prompt": prompt_tree(method, s, n_sources),
            "optim": {"prompt_lr": lr, "router_lr": s.router_lr},
            "train": {"epochs": s.epochs, "batch_size": s.batch_size, "eval_batch_size": s.eval_batch_size,
                      "patience": s.patience, "checkpoint_every": s.epochs}}
    return build_config(tree, f"benchmark {method}")


def _load_backbone(cfg, tasks):
    from crosspt.backbones.loader import load_backbone

    b = cfg.backbone
    return load_backbone(b.name, tasks, family=b.family, label_semantics=cfg.prompt.label_semantics,
                         with_prefix=cfg.prompt.prefix, max_length=b.max_length, pair_encoding=b.pair_encoding)


def build_bench_model(job: dict, cfg, tasks):
    """The model a job trains (or evaluates), from its method."""
    from crosspt.run.model import CrossPTModel, build_model
    from crosspt.method.prompts import init_prompt

    method = job["method"]
    torch.manual_seed(cfg.seed)
    backbone = _load_backbone(cfg, tasks)
    if method == "zero_shot":
        return CrossPTModel(EmptyPrompt(len(tasks), backbone.embed_dim), backbone)
    if method in ("peft_pt", "mpt", "mpt_source"):
        torch.manual_seed(cfg.seed)
        init_state = None
        if method == "mpt":
            from safetensors.torch import save_file

            fd, init_state = tempfile.mkstemp(suffix=".safetensors", prefix="mpt_source_")
            os.close(fd)
            save_file(job["mpt_state"], init_state)
        try:
            prompt, backbone = attach_peft(backbone, "pt" if method == "peft_pt" else "mpt", cfg.prompt.private_len,
                                           n_tasks=len(tasks), init_state=init_state)
        finally:
            if init_state:
                os.unlink(init_state)
        return CrossPTModel(prompt, backbone)
    bank = job.get("bank") if method != "spot" else None
    model = build_model(cfg, tasks, bank=bank, backbone=backbone)
    if method == "spot":
        with torch.no_grad():
            p = model.prompt.private.prompts
            p.copy_(init_prompt(tuple(p.shape), "source", source=job["source"]))
    return model


def _spot_choose(job: dict, s: BenchSettings) -> tuple[torch.Tensor, str, dict]:
    """SPoT's source choice: each source prompt, used as the target's prompt untrained, scored on the
    target's validation split; the best one wins (ties: bank order)."""
    from crosspt.run.loop import LocalSession, evaluate, score_of

    cfg = run_config(s, "pt", [job["task"]], job["k"], job["seed"], job["lr"])
    tasks, splits = _prepare_cached(cfg)
    from crosspt.run.model import build_model

    model = build_model(cfg, tasks, backbone=_load_backbone(cfg, tasks))
    val = {t: sp["val"] for t, sp in splits.items()}
    scores = {}
    for name, src in zip(job["bank_tasks"], job["bank"]):
        with torch.no_grad():
            model.prompt.private.prompts.copy_(src.unsqueeze(0).expand_as(model.prompt.private.prompts))
        scores[name] = score_of(evaluate(model, val, LocalSession(tempfile.gettempdir()), s.eval_batch_size), tasks)
    best = max(job["bank_tasks"], key=lambda n: scores[n])          # max keeps the first of ties
    return job["bank"][job["bank_tasks"].index(best)], best, scores


_SPLITS: dict[str, tuple] = {}
_ORIG_PREPARE: dict[str, Any] = {}


def _prepare_cached(cfg):
    """prepare_data, memoised per process on what determines the splits (the k-shot samples are a pure
    function of task, k, seed, data dir and max_test; run_loop still draws its own, identical, copy)."""
    from crosspt.run.loop import prepare_data

    if prepare_data is _prepare_cached:           # called by run_loop while execute_job has patched it in
        prepare_data = _ORIG_PREPARE["f"]
    key = json.dumps([cfg.tasks, cfg.seed, cfg.data.model_dump(mode="json")], sort_keys=True)
    if key not in _SPLITS:
        if len(_SPLITS) > 64:
            _SPLITS.clear()
        _SPLITS[key] = prepare_data(cfg)
    return _SPLITS[key]


def execute_job(job: dict) -> dict:
    """Run one benchmark job (a method on a task, k, seed and lr); returns a plain result record."""
    from crosspt.run.loop import LocalSession, evaluate, run_loop, score_of

    s = BenchSettings(**job["settings"])
    if s.threads:
        torch.set_num_threads(int(s.threads))
    t0 = time.time()
    method = job["method"]
    tasks_names = job.get("tasks") or [job["task"]]
    extra: dict[str, Any] = {}
    if method == "spot":
        src, name, scores = _spot_choose(job, s)
        job = {**job, "source": src}
        extra.update({"spot_source": name, "spot_source_val": scores})
    n_src = len(job.get("bank_tasks") or [])
    if job.get("bank_tasks") and method != "spot":
        extra["sources"] = list(job["bank_tasks"])
    cfg = run_config(s, method, tasks_names, job["k"], job["seed"], job.get("lr") or s.lrs[0], n_sources=n_src)
    tasks, splits = _prepare_cached(cfg)
    model = build_bench_model(job, cfg, tasks)
    out = Path(tempfile.mkdtemp(prefix="crosspt_bench_"))
    try:
        if method == "zero_shot":
            sess = LocalSession(out)
            val = evaluate(model, {t: sp["val"] for t, sp in splits.items()}, sess, s.eval_batch_size)
            test = evaluate(model, {t: sp["test"] for t, sp in splits.items()}, sess, s.eval_batch_size)
            res = {"metrics": {t.name: {"val": val[t.name], "test": test[t.name]} for t in tasks},
                   "best_val_score": score_of(val, tasks), "test_score": score_of(test, tasks),
                   "epochs_run": 0, "best_epoch": -1, "trainable_params": 0, "history": []}
        else:
            # run_loop draws its k-shot splits itself; hand it the memoised (identical) ones: reading and
            # sampling SST-2's 67k rows costs more than a few-shot run
            import crosspt.run.loop as TL

            orig = TL.prepare_data
            _ORIG_PREPARE.setdefault("f", orig)
            TL.prepare_data = _prepare_cached
            try:
                res = run_loop(cfg, LocalSession(out, keep=1), model=model)
            finally:
                TL.prepare_data = orig
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rec = {"method": method, "task": "+".join(tasks_names), "k": job["k"], "seed": job["seed"],
           "lr": job.get("lr"), "val": float(res["best_val_score"]), "test": float(res["test_score"]),
           "metrics": res["metrics"], "epochs_run": res["epochs_run"], "best_epoch": res["best_epoch"],
           "trainable_params": res.get("trainable_params", 0), "wall_s": time.time() - t0,
           "epoch_s": [h["epoch_s"] for h in res.get("history", []) if "epoch_s" in h],
           "n_train": {t: len(sp["train"]) for t, sp in splits.items()},
           "n_val": {t: len(sp["val"]) for t, sp in splits.items()},
           "n_test": {t: len(sp["test"]) for t, sp in splits.items()},
           "sample_ids": {t: sorted(e.uid for e in sp["train"]) for t, sp in splits.items()}, **extra}
    if method == "pt":
        rec["prompt"] = model.prompt.private.prompts[0].detach().cpu().clone()   # the best epoch's prompt
    if method == "mpt_source":
        rec["mpt_state"] = mpt_state(model)
    return rec


# ---- running many jobs ----------------------------------------------------------------------------
def execute(jobs: list[dict], parallel: int = 1, log: Callable[[str], None] = print,
            cpus_per_job: float = 1.0) -> list[dict]:
    """Run jobs sequentially in this process, or as `parallel` concurrent Ray tasks."""
    if not jobs:
        return []
    done: list[dict | None] = [None] * len(jobs)
    if parallel <= 1:
        for i, j in enumerate(jobs):
            done[i] = execute_job(j)
            log(_progress(i + 1, len(jobs), done[i]))
        return done  # type: ignore[return-value]
    import ray

    _init_ray_local()
    remote = ray.remote(num_cpus=cpus_per_job, max_retries=0)(execute_job)
    pending = {}
    queue = list(enumerate(jobs))
    n_done = 0
    while queue or pending:
        while queue and len(pending) < parallel:
            i, j = queue.pop(0)
            pending[remote.remote(j)] = i
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            done[i] = ray.get(ref)
            n_done += 1
            log(_progress(n_done, len(jobs), done[i]))
    return done  # type: ignore[return-value]


def _progress(i: int, n: int, r: dict) -> str:
    lr = f" lr={r['lr']:g}" if r.get("lr") is not None and r["method"] != "zero_shot" else ""
    return (f"  [{i:>3}/{n}] {r['method']:<13} {r['task']:<16} k={r['k']:<3} seed={r['seed']}{lr}: "
            f"val {r['val']:.4f}  test {r['test']:.4f}  epochs {r['epochs_run']}  {r['wall_s']:.1f}s")


def select_best(records: Iterable[dict]) -> dict[tuple, dict]:
    """Per (method, task, k, seed): the record with the best validation score (ties: the earlier lr)."""
    best: dict[tuple, dict] = {}
    for r in records:
        key = (r["method"], r["task"], r["k"], r["seed"])
        if key not in best or r["val"] > best[key]["val"]:
            best[key] = r
    return best


def leave_one_out_bank(bank: torch.Tensor, meta: dict, target: str) -> tuple[torch.Tensor, list[str]]:
    """Every source prompt of the bank except the target's own."""
    from crosspt.run.artifacts import select_sources

    n = sum(1 for t in meta["tasks"] if t != target)
    return select_sources(bank, meta, n, rule="order", exclude=[target])


def run_benchmark(s: BenchSettings, out_dir: str | Path, *, parallel: int = 1, cpus_per_job: float = 1.0,
                  log: Callable[[str], None] = print) -> dict:
    """All phases; returns the summary (settings, every run, the selected runs, the table)."""
    from crosspt.run.artifacts import load_bank, save_bank

    s.check()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    settings = asdict(s)
    methods = list(s.methods)
    need_src = any(m in NEEDS_SOURCES for m in methods)
    pool = list(dict.fromkeys(s.source_tasks))
    src_k = s.src_k()
    phase_walls = {}

    def job(method, task, k, seed, lr=None, **kw):
        return {"method": method, "task": task, "k": k, "seed": seed, "lr": lr, "settings": settings, **kw}

    # phase 1: PT on targets (and on the source pool at source_shots), zero-shot, PEFT PT
    pt_keys = []
    if "pt" in methods:
        pt_keys += [(t, k, sd) for t in s.tasks for k in s.shots for sd in s.seeds]
    if need_src:
        pt_keys += [(t, src_k, sd) for t in pool for sd in s.seeds]
    pt_keys = list(dict.fromkeys(pt_keys))
    jobs = [job("pt", t, k, sd, lr) for (t, k, sd) in pt_keys for lr in s.lrs]
    if "zero_shot" in methods:
        jobs += [job("zero_shot", t, k, sd) for t in s.tasks for k in s.shots for sd in s.seeds]
    if "peft_pt" in methods:
        jobs += [job("peft_pt", t, k, sd, lr) for t in s.tasks for k in s.shots for sd in s.seeds for lr in s.lrs]
    log(f"phase 1: {len(jobs)} jobs (PT incl. {len(pool) if need_src else 0} source tasks at k={src_k}, "
        f"zero-shot, PEFT PT)")
    tp = time.time()
    records = execute(jobs, parallel, log, cpus_per_job)
    phase_walls["phase1"] = time.time() - tp
    best = select_best(records)

    banks: dict[int, tuple[torch.Tensor, dict, str]] = {}
    if need_src:
        for sd in s.seeds:
            rows = [best[("pt", t, src_k, sd)] for t in pool]
            path = out_dir / "banks" / f"bank_seed{sd}.safetensors"
            save_bank(path, torch.stack([r["prompt"] for r in rows]), backbone=s.backbone, tasks=pool,
                      metrics={r["task"]: {"val": r["val"], "lr": r["lr"]} for r in rows},
                      extra={"seed": sd, "shots": src_k})
            bank, meta = load_bank(path, backbone=s.backbone, source_len=s.prompt_len)
            banks[sd] = (bank, meta, str(path))

    # phase 2: methods composing from the sources, and MPT's source stage
    jobs = []
    for t in s.tasks:
        for sd in s.seeds:
            if need_src:
                src, names = leave_one_out_bank(banks[sd][0], banks[sd][1], t)
                assert t not in names
            for k in s.shots:
                for m in ("spot", "attempt", "crosspt_cat", "crosspt_wavg"):
                    if m in methods:
                        jobs += [job(m, t, k, sd, lr, bank=src, bank_tasks=names) for lr in s.lrs]
            if "mpt" in methods:
                jobs += [job("mpt_source", t, src_k, sd, lr, tasks=names, bank_tasks=names, target=t)
                         for lr in s.lrs]
    log(f"phase 2: {len(jobs)} jobs (SPoT, ATTEMPT-style, CrossPT cat/wavg, MPT source stage)")
    tp = time.time()
    recs2 = execute(jobs, parallel, log, cpus_per_job)
    phase_walls["phase2"] = time.time() - tp
    for j, r in zip(jobs, recs2):
        if r["method"] == "mpt_source":
            r["target"] = j["target"]
            r["task"] = f"src-for-{j['target']}"
    records += recs2

    # phase 3: MPT target stage from the best source stage
    jobs = []
    if "mpt" in methods:
        src_best = select_best(r for r in recs2 if r["method"] == "mpt_source")
        for t in s.tasks:
            for sd in s.seeds:
                st = src_best[("mpt_source", f"src-for-{t}", src_k, sd)]
                jobs += [job("mpt", t, k, sd, lr, mpt_state=st["mpt_state"], bank_tasks=st["sources"])
                         for k in s.shots for lr in s.lrs]
        log(f"phase 3: {len(jobs)} jobs (MPT target stage)")
    tp = time.time()
    records += execute(jobs, parallel, log, cpus_per_job)
    phase_walls["phase3"] = time.time() - tp

    selected = select_best(r for r in records if r["method"] in methods)
    table = summarize(list(selected.values()), methods, list(s.tasks), list(s.shots))
    runs = [{k: v for k, v in r.items() if k not in ("prompt", "mpt_state", "sample_ids")} for r in records]
    summary = {
        "settings": settings, "source_shots": src_k, "wall_s": time.time() - t0, "phase_wall_s": phase_walls,
        "banks": {str(sd): b[2] for sd, b in banks.items()},
        "runs": runs,
        "selected": [{k: v for k, v in r.items() if k not in ("prompt", "mpt_state", "metrics")}
                     for r in selected.values()],
        "table": table,
        "sample_ids": {f"{r['method']}|{r['task']}|k{r['k']}|s{r['seed']}": r.get("sample_ids")
                       for r in records if r["method"] in ("pt", "zero_shot")},
        "notes": notes(s),
    }
    return summary


# ---- tables -----------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(selected: Sequence[dict], methods: Sequence[str], tasks: Sequence[str],
              shots: Sequence[int]) -> dict:
    """Cells (method, task, k) -> mean/std over seeds of the test score, plus per-method averages.

    The average of a method at k is computed per seed (mean over the tasks) and then mean ± std over
    seeds; its mean equals the mean of the task means when every seed ran every task."""
    by: dict[tuple, dict[int, float]] = {}
    for r in selected:
        by.setdefault((r["method"], r["task"], r["k"]), {})[r["seed"]] = r["test"]
    cells, avgs = {}, {}
    for m in methods:
        for k in shots:
            per_seed: dict[int, list[float]] = {}
            for t in tasks:
                vals = by.get((m, t, k))
                if not vals:
                    continue
                mu, sd = mean_std([vals[x] for x in sorted(vals)])
                cells[f"{m}|{t}|{k}"] = {"mean": mu, "std": sd, "n": len(vals),
                                        "seeds": {str(x): vals[x] for x in sorted(vals)}}
                for x, v in vals.items():
                    per_seed.setdefault(x, []).append(v)
            full = {x: statistics.fmean(v) for x, v in per_seed.items() if len(v) == len(tasks)}
            if full:
                mu, sd = mean_std([full[x] for x in sorted(full)])
                avgs[f"{m}|{k}"] = {"mean": mu, "std": sd, "n": len(full),
                                    "seeds": {str(x): full[x] for x in sorted(full)}}
    return {"methods": list(methods), "tasks": list(tasks), "shots": list(shots), "cells": cells, "avg": avgs}


def _fmt(c: dict | None, scale: float = 100.0) -> str:
    if not c:
        return "n/a"
    return f"{c['mean'] * scale:.1f} ± {c['std'] * scale:.1f}"


def format_table(table: dict, na: dict[str, str] | None = None) -> str:
    """Markdown: one row per (task, method), one column per k, then an average row per method."""
    na = na or {}
    shots = table["shots"]
    head = "| task | method | " + " | ".join(f"k={k}" for k in shots) + " |"
    lines = [head, "|" + "---|" * (2 + len(shots))]
    for t in table["tasks"]:
        for m in table["methods"]:
            vals = [_fmt(table["cells"].get(f"{m}|{t}|{k}")) for k in shots]
            if m in na and all(v == "n/a" for v in vals):
                vals = [f"n/a: {na[m]}"] * len(shots)
            lines.append(f"| {t} | {LABELS.get(m, m)} | " + " | ".join(vals) + " |")
    for m in table["methods"]:
        vals = [_fmt(table["avg"].get(f"{m}|{k}")) for k in shots]
        lines.append(f"| **avg** | {LABELS.get(m, m)} | " + " | ".join(f"**{v}**" for v in vals) + " |")
    return "\n".join(lines)


def format_compact(table: dict) -> str:
    """Markdown: methods x tasks (+ avg), one block per k (means only)."""
    out = []
    for k in table["shots"]:
        out.append(f"k={k} | " + " | ".join(table["tasks"]) + " | avg")
        out.append("---|" * (len(table["tasks"]) + 2))
        for m in table["methods"]:
            row = [table["cells"].get(f"{m}|{t}|{k}") for t in table["tasks"]]
            a = table["avg"].get(f"{m}|{k}")
            cells = " | ".join(f"{c['mean'] * 100:.1f}" if c else "n/a" for c in row)
            out.append(f"{LABELS.get(m, m)} | {cells} | " + (f"{a['mean'] * 100:.1f}" if a else "n/a"))
        out.append("")
    return "\n".join(out)


def notes(s: BenchSettings) -> list[str]:
    from crosspt.tasks.metrics import primary_metric

    cap = f"capped at {s.max_test} examples (seeded subset, the same for every seed and method)" \
        if s.max_test else "uncapped"
    return [
        f"backbone {s.backbone} (frozen), max_length {s.max_length}; prompt length {s.prompt_len} for every "
        f"prompt (PT / PEFT virtual tokens / each source / private); CrossPT cat composes "
        f"(n_sources+1)x{s.prompt_len} tokens, wavg and ATTEMPT-style {s.prompt_len}",
        f"test = official GLUE dev split, {cap}; train/val = k-shot samples per class from the train split "
        f"(val disjoint, also k per class; stsb: 2k examples), identical uids for every method at the same seed",
        "score = primary metric x100: " + ", ".join(f"{t}={primary_metric(t)}" for t in s.tasks)
        + " (combined = mean of f1/acc or pearson/spearman)",
        f"budget per run: {s.epochs} epochs, batch {s.batch_size}, early stopping patience {s.patience} on val; "
        f"learning-rate grid {s.lrs} over each method's own prompt lr (PEFT: all its prompt parameters; "
        f"encoder heads share it), picked per (method, task, k, seed) by best validation score; router lr "
        f"fixed at {s.router_lr}",
        "zero-shot: no training, empty prompt, label sentences of the task (encoder) / label words",
        f"sources: one single-task PT prompt per task of {s.source_tasks} per seed at k={s.src_k()} (best lr by val); "
        f"each target's bank leaves the target out",
        "SPoT: the source whose prompt scores best on the target's validation split untrained initialises the "
        "target prompt (prompt.init=source with that 1-source bank), then PT",
        "ATTEMPT-style: attention router (input-conditioned) over the leave-one-out sources + private, wavg",
        "MPT: PEFT MultitaskPromptTuning, source stage (RANDOM init, multi-task over the leave-one-out sources, "
        f"k={s.src_k()}, best lr by mean source val), target stage AVERAGE_SOURCE_TASKS; on the encoder PEFT's "
        "FEATURE_EXTRACTION forward does not pass task_ids to get_prompt, so the harness calls "
        "get_prompt(task_ids) and concatenates before [CLS] exactly as that forward does",
        "PEFT PT (encoder): PeftModelForFeatureExtraction (SAMPLE_VOCAB init) forward, virtual tokens before "
        "[CLS], mean-pooled over the real tokens and scored like our encoder family (our PT puts its prompt "
        "after the input with mask-derived position ids)",
        "mean ± std over seeds (sample std, ddof=1); avg row: mean over tasks per seed, then mean ± std over seeds",
    ]


def bar_chart(table: dict, path: str | Path, title: str = "few-shot benchmark: average test score") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, shots = table["methods"], table["shots"]
    width = 0.8 / max(1, len(shots))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods), 3.8))
    for i, k in enumerate(shots):
        cs = [table["avg"].get(f"{m}|{k}") for m in methods]
        xs = [j + (i - (len(shots) - 1) / 2) * width for j in range(len(methods))]
        ax.bar(xs, [c["mean"] * 100 if c else 0 for c in cs], width, yerr=[c["std"] * 100 if c else 0 for c in cs],
               capsize=3, label=f"k={k}")
        for x, c in zip(xs, cs):
            if c:
                ax.text(x, c["mean"] * 100 + 0.5, f"{c['mean'] * 100:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(methods)), [LABELS.get(m, m) for m in methods], rotation=25, ha="right", fontsize=8)
    lows = [c["mean"] * 100 - c["std"] * 100 for c in table["avg"].values()]
    if lows:
        ax.set_ylim(bottom=max(0.0, min(lows) - 10))
    ax.set_ylabel("avg test score (x100)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_to_mlflow(summary: dict, text: str, files: dict[str, Path], *, tracking_uri: str | None,
                  experiment: str) -> dict:
    """One experiment: a parent run (params, average metrics, table, JSON, bar chart) and one child run
    per selected (method, task, k, seed)."""
    from crosspt.registry import tracking as T

    uri = T.resolve_tracking_uri(tracking_uri)
    T.check_reachable(uri)
    exp_id = T.ensure_experiment(uri, experiment)
    c = T.client(uri)
    s = summary["settings"]
    parent = c.create_run(exp_id, run_name=summary.get("name", "benchmark"), tags={"crosspt.benchmark": "fewshot"})
    pid = parent.info.run_id
    T.log_params(c, pid, {f"bench.{k}": (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in s.items()})
    metrics = {}
    for key, c_ in summary["table"]["avg"].items():
        m, k = key.split("|")
        metrics[f"avg_{m}_k{k}"] = c_["mean"]
        metrics[f"avg_{m}_k{k}_std"] = c_["std"]
    for key, c_ in summary["table"]["cells"].items():
        m, t, k = key.split("|")
        metrics[f"{m}_{t}_k{k}"] = c_["mean"]
    metrics["wall_s"] = summary["wall_s"]
    T.log_metrics(c, pid, metrics)
    c.log_text(pid, text, "table.md")
    for name, path in files.items():
        c.log_artifact(pid, str(path))
    for r in summary["selected"]:
        ch = c.create_run(exp_id, run_name=f"{r['method']}-{r['task']}-k{r['k']}-s{r['seed']}",
                          tags={"mlflow.parentRunId": pid, "crosspt.method": r["method"],
                                "crosspt.role": "target" if r["task"] in s["tasks"] else "source"})
        T.log_params(c, ch.info.run_id, {"method": r["method"], "task": r["task"], "k": r["k"], "seed": r["seed"],
                                         "lr": r["lr"], **({"spot_source": r["spot_source"]} if "spot_source" in r else {})})
        T.log_metrics(c, ch.info.run_id, {"val_score": r["val"], "test_score": r["test"], "epochs_run": r["epochs_run"],
                                          "best_epoch": r["best_epoch"], "wall_s": r["wall_s"],
                                          "trainable_params": r["trainable_params"]})
        c.set_terminated(ch.info.run_id, "FINISHED")
    c.set_terminated(pid, "FINISHED")
    return {"tracking_uri": uri, "experiment": experiment, "experiment_id": exp_id, "run_id": pid}


DEV_SIZES = {"sst2": 872, "rte": 277, "mrpc": 408, "cola": 1043, "stsb": 1500, "qnli": 5463}


def estimate_full_wall(summary: dict, full: BenchSettings) -> dict:
    """Rough sequential wall time of `full` from the measured runs of this (smaller) benchmark.

    Per method: measured mean seconds per job split into epochs (scaled by full.epochs / epochs and by
    full.max_length / max_length) and the rest (loading + test evaluation, scaled by the mean test size);
    job counts from the full grid. An order-of-magnitude figure, not a promise."""
    runs = [r for r in summary["runs"] if r.get("wall_s")]
    if not runs:
        return {}
    q = summary["settings"]

    def test_size(tasks, cap):
        return statistics.fmean(min(DEV_SIZES.get(t, 1000), cap or 10 ** 9) for t in tasks)

    test_ratio = test_size(full.tasks, full.max_test) / test_size(q["tasks"], q["max_test"])
    epoch_ratio = (full.epochs / q["epochs"]) * (full.max_length / q["max_length"])
    per = {}
    for r in runs:
        ep = sum(r.get("epoch_s") or [])
        per.setdefault(r["method"], []).append((r["wall_s"] - ep) * test_ratio + ep * epoch_ratio)
    n_lr, n_t, n_k, n_s = len(full.lrs), len(full.tasks), len(full.shots), len(full.seeds)
    grid = n_lr * n_t * n_k * n_s
    pool, targets = set(full.source_tasks), set(full.tasks)
    counts = {"pt": n_lr * (n_t * n_k * n_s + n_s * len(pool)
                            - (n_s * len(pool & targets) if full.src_k() in full.shots else 0)),
              "zero_shot": n_t * n_k * n_s, "peft_pt": grid, "spot": grid, "attempt": grid,
              "crosspt_cat": grid, "crosspt_wavg": grid, "mpt_source": n_lr * n_t * n_s, "mpt": grid}
    detail, total = {}, 0.0
    for m, n in counts.items():
        if m in per:
            sec = statistics.fmean(per[m])
            detail[m] = {"jobs": n, "est_s_per_job": round(sec, 1)}
            total += n * sec
    return {"jobs": sum(counts.values()), "est_s_sequential": total, "test_ratio": test_ratio,
            "epoch_ratio": epoch_ratio, "detail": detail}


def verdict(table: dict) -> list[str]:
    """Plain statements: does CrossPT beat PT (ours) on the average, per k?"""
    out = []
    for k in table["shots"]:
        pt = table["avg"].get(f"pt|{k}")
        for m in ("crosspt_cat", "crosspt_wavg"):
            c = table["avg"].get(f"{m}|{k}")
            if not (pt and c):
                continue
            d = (c["mean"] - pt["mean"]) * 100
            beats = "beats" if d > 0 else "does NOT beat"
            within = " (within one std over seeds)" if abs(d) <= max(c["std"], pt["std"]) * 100 else ""
            out.append(f"k={k}: {LABELS[m]} {beats} PT (ours) on the average: {c['mean'] * 100:.1f} vs "
                       f"{pt['mean'] * 100:.1f} ({d:+.1f} points){within}")
        best = max(((m, a) for m_k, a in table["avg"].items() for m in [m_k.split("|")[0]]
                    if m_k.endswith(f"|{k}")), key=lambda x: x[1]["mean"], default=None)
        if best:
            out.append(f"k={k}: best average: {LABELS.get(best[0], best[0])} {best[1]['mean'] * 100:.1f}")
    return out


def render_report(summary: dict, name: str) -> str:
    s = summary["settings"]
    table = summary["table"]
    lines = [f"# Few-shot benchmark `{name}`", "",
             f"tasks {s['tasks']}, k={s['shots']}, seeds {s['seeds']}, methods {s['methods']}; "
             f"wall {summary['wall_s']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in summary['phase_wall_s'].items())}), "
             f"{len(summary['runs'])} runs", "",
             "Test score (x100), mean ± std over seeds, lr picked per cell by validation:", "",
             format_table(table), "", "Compact (means):", "", "```", format_compact(table).rstrip(), "```", "",
             "Verdict:", ""]
    lines += [f"- {v}" for v in verdict(table)]
    lines += ["", "Chosen learning rates (cells per lr):", ""]
    picks: dict[str, dict] = {}
    for r in summary["selected"]:
        picks.setdefault(r["method"], {}).setdefault(str(r["lr"]), 0)
        picks[r["method"]][str(r["lr"])] += 1
    lines += [f"- {LABELS.get(m, m)}: " + ", ".join(f"lr {lr}: {n}" for lr, n in sorted(v.items()))
              for m, v in picks.items()]
    spot = [r for r in summary["selected"] if r["method"] == "spot"]
    if spot:
        lines += ["", "SPoT source picked: " + ", ".join(f"{r['task']}/k{r['k']}/s{r['seed']}<-{r['spot_source']}"
                                                         for r in spot)]
    src = [r for r in summary["runs"] if r["method"] == "pt" and r["k"] == summary["source_shots"]]
    if summary.get("banks"):
        lines += ["", f"Source banks (single-task PT prompts, k={summary['source_shots']}): "
                  + ", ".join(summary["banks"].values())]
    est = summary.get("full_estimate")
    if est:
        lines += ["", f"Full-mode estimate (6 tasks, k=16/32, 3 seeds, 3 lrs, 20 epochs, max_length 128, max_test 1000): "
                  f"{est['jobs']} jobs, about {est['est_s_sequential'] / 3600:.1f} h sequential on this machine "
                  f"(/ N with --parallel N on N free cores; test-size x{est['test_ratio']:.1f}, "
                  f"epoch-cost x{est['epoch_ratio']:.1f} vs this run)"]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in summary["notes"]]
    del src
    return "\n".join(lines) + "\n"


# ---- speed / memory / Ray overhead ------------------------------------------------------------------
class FixedPrompt(EmptyPrompt):
    """A promoted prompt: one stored tensor `[L, d]` fed as a PT prompt (no router, no composition)."""

    def __init__(self, prompt: torch.Tensor, n_tasks: int = 1):
        super().__init__(n_tasks, prompt.shape[-1])
        self.register_buffer("prompt", prompt.detach().clone())

    def forward(self, task_ids, input_embeds=None, input_mask=None):
        b = task_ids.shape[0]
        p = self.prompt.unsqueeze(0).expand(b, -1, -1)
        return p, torch.ones(p.shape[:2], dtype=torch.long, device=p.device), torch.ones(b, 1, device=p.device)


def _speed_cfg(s: BenchSettings, task: str, method: str, n_sources: int, *, epochs: int = 1, max_test: int | None = 200,
               private_len: int | None = None):
    s2 = BenchSettings(**{**asdict(s), "epochs": epochs, "patience": None, "max_test": max_test})
    cfg = run_config(s2, method, [task], 16, 0, 0.1, n_sources=n_sources)
    if private_len is not None:
        cfg.prompt.private_len = private_len
    return cfg


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure_step_ratio(s: BenchSettings, *, task: str = "sst2", n_sources: int = 4, rounds: int = 6,
                       steps: int = 8, log=print) -> dict:
    """Training step (compose + forward + backward + AdamW step) of CrossPT cat vs PT at equal composed
    length, same process, same batches, alternating blocks; median seconds per step."""
    from crosspt.tasks.data import multitask_batches
    from crosspt.run.model import build_model

    L = s.prompt_len
    composed = (n_sources + 1) * L
    variants = {"pt": ("pt", 0, composed), "crosspt_cat": ("crosspt_cat", n_sources, L),
                "attempt_wavg": ("attempt", n_sources, L), "crosspt_wavg": ("crosspt_wavg", n_sources, L)}
    models, opts = {}, {}
    for name, (method, ns, pl) in variants.items():
        cfg = _speed_cfg(s, task, method, ns, private_len=pl)
        tasks, splits = _prepare_cached(cfg)
        models[name] = build_model(cfg, tasks, backbone=_load_backbone(cfg, tasks))
        models[name].train()
        opts[name] = torch.optim.AdamW(models[name].param_groups(0.1, 0.01))
    batches = [models["pt"].backbone.collate(b, train=True)
               for b in multitask_batches({t: sp["train"] for t, sp in splits.items()}, s.batch_size, seed=0)]

    def step(name, batch):
        m, o = models[name], opts[name]
        loss = m(batch)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()

    times = {k: [] for k in models}
    for name in models:                                    # warm-up
        for b in batches[:2]:
            step(name, b)
    order = list(models)
    for r in range(rounds):                                # interleaved per batch, rotating order: load
        for i in range(steps):                             # from other processes hits every variant alike
            b = batches[i % len(batches)]
            k = (r * steps + i) % len(order)
            for name in order[k:] + order[:k]:
                times[name] += _timed(lambda: step(name, b), 1)
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
                            log=print) -> dict:
    """Forward latency (predict) of a promoted CrossPT prompt (collapsed to one tensor [L, d], fed as a PT
    prompt) vs a PT model of the same length holding the same values, same backbone object, same batches;
    the uncollapsed CrossPT model for reference, and whether the promoted prompt predicts exactly what the
    uncollapsed model predicts."""
    from crosspt.tasks.data import eval_batches
    from crosspt.run.model import CrossPTModel, build_model

    L = s.prompt_len
    composed = (n_sources + 1) * L
    cfg_c = _speed_cfg(s, task, "crosspt_cat", n_sources, private_len=L)
    tasks, splits = _prepare_cached(cfg_c)
    cross = build_model(cfg_c, tasks, backbone=_load_backbone(cfg_c, tasks))
    with torch.no_grad():                                  # a trained-looking router: non-uniform weights
        cross.prompt.router.logits.copy_(torch.linspace(-1, 1, cross.prompt.spec.n_candidates).unsqueeze(0))
    cfg_p = _speed_cfg(s, task, "pt", 0, private_len=composed)
    pt = build_model(cfg_p, tasks, backbone=cross.backbone)        # the same frozen backbone object
    collapsed, _ = cross.prompt.collapsed(0)
    # PT carries the same values as its own parameter: the two paths differ only in how the prompt is
    # produced (PT's composition of one private prompt vs a stored tensor), not in what the model computes
    pt.prompt.private.prompts.copy_(collapsed.unsqueeze(0))
    promoted = CrossPTModel(FixedPrompt(collapsed), cross.backbone)
    for m in (cross, pt, promoted):
        m.eval()
    batches = [pt.backbone.collate(b, train=False) for b in eval_batches(splits[task]["test"], s.eval_batch_size)]
    models = {"pt": pt, "promoted": promoted, "crosspt_uncollapsed": cross}
    times = {k: [] for k in models}
    for m in models.values():
        m.predict(batches[0])
    order = list(models)
    for r in range(rounds):
        for i, b in enumerate(batches):
            k = (r * len(batches) + i) % len(order)
            for name in order[k:] + order[:k]:
                times[name] += _timed(lambda: models[name].predict(b), 1)
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


def _rss_child(spec_json: str) -> None:
    """Runs in a fresh interpreter: do one thing, print the peak RSS (MiB) as JSON."""
    import resource

    spec = json.loads(spec_json)
    s = BenchSettings(**spec["settings"])
    if s.threads:
        torch.set_num_threads(int(s.threads))
    what = spec["what"]
    out: dict[str, Any] = {"what": what}
    if what != "import":
        cfg = _speed_cfg(s, spec["task"], spec.get("method", "pt"), spec.get("n_sources", 0),
                         epochs=spec.get("epochs", 2), max_test=spec.get("max_test", 200),
                         private_len=spec.get("private_len"))
        from crosspt.tasks.specs import resolve_tasks

        tasks = resolve_tasks(cfg.tasks)
        if what in ("backbone", "backbone_data"):
            from crosspt.tasks.data import Example
            from crosspt.run.model import CrossPTModel

            bb = _load_backbone(cfg, tasks)
            model = CrossPTModel(EmptyPrompt(1, bb.embed_dim), bb).eval()
            if what == "backbone_data":                      # zero-shot inference over the real test split
                from crosspt.run.loop import LocalSession, evaluate

                _, splits = _prepare_cached(cfg)
                with tempfile.TemporaryDirectory() as d:
                    evaluate(model, {t: sp["test"] for t, sp in splits.items()}, LocalSession(d), s.eval_batch_size)
            else:                                            # one full-width eval batch (max_length tokens)
                long = " ".join(["sentence"] * s.max_length)
                exs = [Example(tasks[0].name, f"x/{i}", (long,) * len(tasks[0].text_fields), 0)
                       for i in range(s.eval_batch_size)]
                with torch.no_grad():
                    model.predict(bb.collate(exs, train=False))
        else:                                                    # a whole trial
            from crosspt.run.loop import LocalSession, run_loop

            with tempfile.TemporaryDirectory() as d:
                r = run_loop(cfg, LocalSession(d))
            out["test_score"] = r["test_score"]
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        status = Path("/proc/self/status").read_text()
        out["vmhwm_mib"] = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) / 1024.0
    except (OSError, StopIteration):
        out["vmhwm_mib"] = None
    print("RSS_JSON " + json.dumps(out))


def measure_rss(s: BenchSettings, *, task: str = "sst2", n_sources: int = 4, epochs: int = 2, log=print) -> dict:
    """Peak RSS (getrusage maxrss) of fresh subprocesses: interpreter+imports, frozen backbone alone (load +
    one full-width no-grad eval batch), backbone + the task's data + zero-shot inference over its test split,
    a PT trial and a CrossPT cat trial."""
    import subprocess
    import sys

    L = s.prompt_len
    specs = {
        "import": {"what": "import"},
        "backbone": {"what": "backbone"},
        "backbone_data": {"what": "backbone_data"},
        "trial_pt": {"what": "trial", "method": "pt", "private_len": (n_sources + 1) * L},
        "trial_crosspt_cat": {"what": "trial", "method": "crosspt_cat", "n_sources": n_sources, "private_len": L},
    }
    out, hwm = {}, {}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # Linux carries ru_maxrss across execve from the process that forked the child (here: this big
    # process), so each measured child is started by a tiny launcher interpreter instead
    launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    for name, spec in specs.items():
        spec = {**spec, "settings": asdict(s), "task": task, "epochs": epochs}
        code = ("import crosspt, torch, transformers\n" if spec["what"] == "import" else "") + \
            f"from crosspt.benchmark import _rss_child; _rss_child({json.dumps(json.dumps(spec))})"
        p = subprocess.run([sys.executable, "-c", launcher, sys.executable, "-c", code], capture_output=True,
                           text=True, env=env, timeout=900)
        line = [x for x in p.stdout.splitlines() if x.startswith("RSS_JSON ")]
        if p.returncode or not line:
            raise RuntimeError(f"RSS child '{name}' failed: {p.stderr[-2000:]}")
        got = json.loads(line[-1][len("RSS_JSON "):])
        out[name], hwm[name] = got["maxrss_mib"], got.get("vmhwm_mib")
        log(f"peak RSS {name}: getrusage maxrss {out[name]:.0f} MiB, VmHWM {hwm[name]} MiB")
    return {"maxrss_mib": out, "vmhwm_mib": hwm, "task": task, "epochs": epochs,
            "ratio_trial_vs_backbone": out["trial_crosspt_cat"] / out["backbone"],
            "ratio_trial_vs_backbone_data": out["trial_crosspt_cat"] / out["backbone_data"],
            "ratio_crosspt_trial_vs_pt_trial": out["trial_crosspt_cat"] / out["trial_pt"]}


def _init_ray_local() -> float:
    """Join $RAY_ADDRESS, else start a private local Ray on loopback only (never attach to someone
    else's); seconds taken."""
    from crosspt.run.trainer import init_ray

    t = time.time()
    if os.environ.get("RAY_ADDRESS"):
        init_ray(log_to_driver=False)
    else:
        init_ray(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    return time.time() - t


def measure_ray_overhead(s: BenchSettings, out_dir: Path, *, task: str = "rte", n_trials: int = 3,
                         epochs: int = 12, lrs: Sequence[float] = (0.3, 0.1, 0.03, 0.01, 0.003), log=print) -> dict:
    """N short trials through crosspt.search.run_search (random searcher, FIFO, one trial at a time) vs the
    same configurations through run_loop in a plain loop; in_process true and false."""
    from crosspt.search.driver import run_search
    from crosspt.config.space import SearchSpace
    from crosspt.run.loop import LocalSession, run_loop

    cpus = s.threads or os.cpu_count() or 1          # Ray gives a trial OMP_NUM_THREADS = its CPUs
    torch.set_num_threads(cpus)
    points = [{"optim.prompt_lr": float(lrs[i % len(lrs)])} for i in range(n_trials)]

    def space(in_process: bool, name: str) -> SearchSpace:
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
            "budget": {"num_samples": n_trials},
            "scheduler": {"type": "fifo"},
            "search": {"algorithm": "random", "seed": 0, "points": points},
            "resources": {"max_concurrent_trials": 1},
        })

    sp = space(True, "plain")

    def plain_loop(tag):
        t = time.time()
        rows = []
        for p in points:
            cfg = sp.config_for(p)
            with tempfile.TemporaryDirectory() as d:
                tt = time.time()
                r = run_loop(cfg, LocalSession(d))
            rows.append({"lr": p["optim.prompt_lr"], "best_val_score": r["best_val_score"],
                         "test_score": r["test_score"], "wall_s": time.time() - tt})
        wall = time.time() - t
        per_trial = ", ".join(f"{x['wall_s']:.1f}s" for x in rows)
        log(f"plain loop ({tag}): {n_trials} trials in {wall:.1f}s ({per_trial}), torch threads {torch.get_num_threads()}")
        return rows, wall

    # the plain loop brackets the two searches (before and after) so that a change in the machine's load
    # from other processes during the measurement shows up instead of biasing the ratio
    plain, plain_before = plain_loop("before the searches")
    init_s = _init_ray_local()
    log(f"ray init: {init_s:.1f}s")
    root = Path(out_dir) / "ray_overhead"
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    root.mkdir(parents=True, exist_ok=True)
    res = {"task": task, "trials": n_trials, "epochs": epochs, "cpus_per_trial": cpus, "plain": plain,
           "ray_init_s": init_s, "concurrency": 1}
    walls = {}
    for in_process in (False, True):
        key = "in_process" if in_process else "worker_group"
        t = time.time()
        summ = run_search(space(in_process, f"overhead-{key}"), data_dir=s.data_dir, tracking_uri=uri,
                          storage_path=str(root / "ray_results"), overwrite=True, verbose=0)
        wall = time.time() - t
        walls[key] = wall
        rows = sorted(summ["trials"], key=lambda x: x["params"].get("optim.prompt_lr", 0))
        res[key] = {"wall_s": wall, "failed": summ["num_failed"],
                    "trials": [{"lr": x["params"].get("optim.prompt_lr"), "best_val_score": x.get("best_val_score"),
                                "test_score": x.get("test_score")} for x in rows]}
        log(f"run_search in_process={in_process}: {wall:.1f}s")
    plain_after_rows, plain_after = plain_loop("after the searches")
    plain_s = (plain_before + plain_after) / 2
    res.update({"plain_before_s": plain_before, "plain_after_s": plain_after, "plain_s": plain_s,
                "plain_after": plain_after_rows})
    for key, wall in walls.items():
        res[key]["ratio_vs_plain"] = wall / plain_s
        res[key]["ratio_vs_plain_before"] = wall / plain_before
        res[key]["ratio_vs_plain_after"] = wall / plain_after
        log(f"{key}: ratio vs mean plain {wall / plain_s:.3f} (vs before {wall / plain_before:.3f}, "
            f"vs after {wall / plain_after:.3f})")
    ps = sorted(plain, key=lambda x: x["lr"])

    def same(a, b):
        return [(x["lr"], x["best_val_score"], x["test_score"]) for x in a] == \
            [(x["lr"], x["best_val_score"], x["test_score"]) for x in b]

    res["identical_in_process_vs_worker_group"] = same(res["in_process"]["trials"], res["worker_group"]["trials"])
    res["identical_in_process_vs_plain"] = same(res["in_process"]["trials"], ps)
    res["identical_worker_group_vs_plain"] = same(res["worker_group"]["trials"], ps)
    import ray

    ray.shutdown()
    return res


SPEED_PARTS = ("step", "inference", "rss", "ray")


def run_speed(s: BenchSettings, out_dir: str | Path, *, ray_trials: int = 3, ray_epochs: int = 12,
              skip_ray: bool = False, parts: Sequence[str] = SPEED_PARTS, log=print) -> dict:
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if s.threads:
        torch.set_num_threads(int(s.threads))
    res: dict[str, Any] = {"settings": asdict(s), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if "step" in parts:
        res["step"] = measure_step_ratio(s, log=log)
    if "inference" in parts:
        res["inference"] = measure_inference_ratio(s, log=log)
    if "rss" in parts:
        res["rss"] = measure_rss(s, log=log)
    if "ray" in parts and not skip_ray:
        res["ray"] = measure_ray_overhead(s, out_dir, n_trials=ray_trials, epochs=ray_epochs, log=log)
    res["wall_s"] = time.time() - t0
    return res


def render_speed(res: dict) -> str:
    st, inf, rss = res.get("step"), res.get("inference"), res.get("rss")
    lines = ["# Speed and memory (same process, same batches)", "",
             f"machine: {res['cpus']} CPUs, torch threads {res['torch_threads']}; backbone {res['settings']['backbone']}, "
             f"batch {res['settings']['batch_size']} (train) / {res['settings']['eval_batch_size']} (predict)", "",
             "| measurement | value | target |", "|---|---|---|"]
    if st:
        ms, cl = st["median_step_s"], st["composed_len"]
        lines += [
             f"| train step PT (L={cl['pt']}) | {ms['pt'] * 1e3:.1f} ms | |",
             f"| train step CrossPT cat (4x{res['settings']['prompt_len']} + {res['settings']['prompt_len']} = "
             f"{cl['crosspt_cat']}) | {ms['crosspt_cat'] * 1e3:.1f} ms | |",
             f"| **step ratio CrossPT cat / PT (equal composed length)** | **{st['ratio_crosspt_cat_vs_pt']:.3f}** | <= 1.10 |",
             f"| step ratio ATTEMPT-style wavg (L={cl['attempt_wavg']}) / PT (L={cl['pt']}) | "
             f"{st['ratio_attempt_wavg_vs_pt']:.3f} | (info: shorter prompt) |",
             f"| step ratio CrossPT wavg (L={cl['crosspt_wavg']}) / PT (L={cl['pt']}) | "
             f"{st['ratio_crosspt_wavg_vs_pt']:.3f} | (info: shorter prompt) |"]
    if inf:
        lines += [
             f"| predict PT (L={inf['composed_len']}, batch {inf['batch_size']}) | {inf['median_batch_s']['pt'] * 1e3:.1f} ms | |",
             f"| predict promoted (collapsed {inf['collapsed_shape']}) | {inf['median_batch_s']['promoted'] * 1e3:.1f} ms | |",
             f"| **inference ratio promoted / PT** | **{inf['ratio_promoted_vs_pt']:.3f}** | <= 1.02 |",
             f"| inference ratio uncollapsed CrossPT / PT | {inf['ratio_uncollapsed_vs_pt']:.3f} | (info) |",
             f"| promoted predictions identical to uncollapsed | {inf['promoted_predictions_identical']} | True |",
             f"| (timed samples per variant: train {st['steps_each'] if st else '-'}, predict "
             f"{inf['samples_each']}) | | |"]
    m, h = (rss or {}).get("maxrss_mib", {}), (rss or {}).get("vmhwm_mib") or {}

    def both(k):
        return f"{m[k]:.0f} MiB" + (f" (VmHWM {h[k]:.0f})" if h.get(k) else "")

    lines += [] if not rss else [f"| peak RSS interpreter + imports | {both('import')} | |",
              f"| peak RSS frozen backbone alone (load + 1 no-grad batch of {res['settings']['eval_batch_size']} x "
              f"{res['settings']['max_length']} tokens) | {both('backbone')} | |",
              f"| peak RSS backbone + {rss['task']} data + zero-shot inference over the test split | "
              f"{both('backbone_data')} | |",
              f"| peak RSS PT trial ({rss['epochs']} epochs) | {both('trial_pt')} | |",
              f"| peak RSS CrossPT cat trial ({rss['epochs']} epochs) | {both('trial_crosspt_cat')} | |",
              f"| **RSS ratio trial / backbone alone** | **{rss['ratio_trial_vs_backbone']:.3f}** | <= 1.20 |",
              f"| RSS ratio trial / (backbone + data + zero-shot inference) | {rss['ratio_trial_vs_backbone_data']:.3f} | (info) |",
              f"| RSS ratio CrossPT trial / PT trial | {rss['ratio_crosspt_trial_vs_pt_trial']:.3f} | (info) |"]
    ray = res.get("ray")
    if ray:
        per_trial = ", ".join(f"{x['wall_s']:.1f}" for x in ray["plain"])
        per_after = ", ".join(f"{x['wall_s']:.1f}" for x in ray.get("plain_after", []))
        wg, ip = ray["worker_group"], ray["in_process"]
        lines += [f"| plain loop before the searches: {ray['trials']} trials x {ray['epochs']} epochs ({ray['task']}) | "
                  f"{ray['plain_before_s']:.1f} s (per trial {per_trial} s) | trials >= 30 s |",
                  f"| plain loop after the searches | {ray['plain_after_s']:.1f} s (per trial {per_after} s) | |",
                  f"| ray.init (not counted below) | {ray['ray_init_s']:.1f} s | |",
                  f"| run_search, in_process=false (worker group per trial) — before | {wg['wall_s']:.1f} s | |",
                  f"| **Ray overhead ratio, in_process=false** (vs mean plain; vs before / after) | "
                  f"**{wg['ratio_vs_plain']:.3f}** ({wg['ratio_vs_plain_before']:.3f} / {wg['ratio_vs_plain_after']:.3f}) | <= 1.15 |",
                  f"| run_search, in_process=true (loop inside the Tune trial) — after | {ip['wall_s']:.1f} s | |",
                  f"| **Ray overhead ratio, in_process=true** (vs mean plain; vs before / after) | "
                  f"**{ip['ratio_vs_plain']:.3f}** ({ip['ratio_vs_plain_before']:.3f} / {ip['ratio_vs_plain_after']:.3f}) | <= 1.15 |",
                  f"| identical val/test scores in-process vs worker group | {ray['identical_in_process_vs_worker_group']} | True |",
                  f"| identical val/test scores in-process vs plain loop | {ray['identical_in_process_vs_plain']} | (info) |"]
        lines += ["", "Per-trial scores (lr: best val / test):", ""]
        for key in ("plain", "plain_after", "in_process", "worker_group"):
            rows = ray[key] if key.startswith("plain") else ray[key]["trials"]
            lines.append(f"- {key}: " + "; ".join(f"{x['lr']}: {x['best_val_score']:.4f} / {x['test_score']:.4f}"
                                                 for x in sorted(rows, key=lambda x: x["lr"])))
        lines += ["", "run_search includes its MLflow logging (sqlite) and Tune bookkeeping; trials run one at a "
                  f"time with {ray['cpus_per_trial']} CPUs each (the plain loop uses the same threads)."]
    lines += ["", f"wall {res['wall_s']:.0f}s"]
    return "\n".join(lines) + "\n"

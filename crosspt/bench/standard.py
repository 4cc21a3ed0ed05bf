"""The standard benchmark: does cross-task transfer help, and where? (`jobs/benchmark_fewshot.py --standard`)

Stages, each a list of jobs run sequentially or on `parallel` Ray actors (crosspt.bench.harness.execute),
in this order because each needs what the one before made:

    sources    single-task PT of every source-pool task on `source_rows` of its train split (one bank,
               shared by every method, seed and target; a target's own task is left out of its bank);
               the zero-shot score of every target and pool task
    probe      untrained: what each prompt a method starts from scores on each target's test split
               (empty, random PT prompts short and long, CrossPT cat/wavg at their initial weights, the
               same cat tokens at full scale, each source alone) -- the "before training" diagnosis
    lr_grid    single-task cells at k = `lr_shots` for PT (short), PT (long), CrossPT cat, CrossPT wavg,
               and the multi-task cells (all targets jointly) for multi-task PT and CrossPT
    reuse      single-task cells at the other k, with the lr each (method, target, seed) picked on
               validation at `lr_shots`; the transfer matrix (SPoT-style: each source prompt initialises
               PT on each target, with PT's validation-picked lr)

A *cell* job trains one (method, target or target set, k, seed) at every lr of its grid on the train
split, picks the lr by best validation score (ties: the earlier lr), and only then scores the picked model
on the test split: test is read once per cell, and never to choose anything.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Callable

import torch

from crosspt.bench.methods import Method, load_backbone_for, run_config
from crosspt.bench.settings import BenchSettings

Log = Callable[[str], None]


class Arm(StrEnum):
    """A row of the standard benchmark: a method in a regime (single-task unless it says multi)."""
    PT = "pt"                        # vanilla PT, `prompt_len` tokens
    PT_LONG = "pt_long"              # vanilla PT at the composed length of CrossPT cat for that target
    CAT = "crosspt_cat"
    WAVG = "crosspt_wavg"
    PT_MULTI = "pt_multi"            # one prompt shared by all targets, trained jointly
    CAT_MULTI = "crosspt_cat_multi"  # all targets jointly: fine-tuned shared sources, per-task private + router
    SPOT = "spot"                    # the transfer matrix: PT initialised from one given source prompt
    SOURCE = "source"                # a source prompt's own pre-training (many rows, one lr)
    ZERO_SHOT = "zero_shot"


LABELS = {Arm.PT: "PT", Arm.PT_LONG: "PT long", Arm.CAT: "CrossPT cat", Arm.WAVG: "CrossPT wavg",
          Arm.PT_MULTI: "PT multi-task", Arm.CAT_MULTI: "CrossPT cat multi-task", Arm.SPOT: "SPoT-style",
          Arm.SOURCE: "source PT", Arm.ZERO_SHOT: "Zero-shot"}
SINGLE = (Arm.PT, Arm.PT_LONG, Arm.CAT, Arm.WAVG)
MULTI = (Arm.PT_MULTI, Arm.CAT_MULTI)
# what each arm is: the Method whose prompt section it starts from (crosspt.bench.methods)
_BASE = {Arm.PT: Method.PT, Arm.PT_LONG: Method.PT, Arm.SPOT: Method.PT, Arm.SOURCE: Method.PT,
         Arm.PT_MULTI: Method.PT, Arm.CAT: Method.CROSSPT_CAT, Arm.CAT_MULTI: Method.CROSSPT_CAT,
         Arm.WAVG: Method.CROSSPT_WAVG}


@dataclass
class StandardSettings:
    """What the standard benchmark covers beyond the shared per-run budget (`bench`)."""
    bench: BenchSettings
    source_rows: int = 1500          # train rows per source task (drawn seeded from its train split)
    source_val: int = 200            # validation rows per source task (disjoint)
    source_epochs: int = 2
    source_lr: float = 0.3
    source_batch: int = 16
    source_seed: int = 0
    lr_shots: int = 16               # the k whose cells search the lr grid; other k reuse the picks
    multi_shots: list[int] = field(default_factory=lambda: [16])
    transfer_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    probe_seed: int = 0
    probe: bool = True               # the untrained probe stage
    arms: list[str] = field(default_factory=lambda: [str(a) for a in SINGLE])   # the single-task arms run
    # router rules run again beside the default one for CrossPT cat and wavg (cells marked with a variant
    # `normalization <rule>`: a before/after comparison on the same seeds, banks and lr grid)
    normalizations: list[str] = field(default_factory=list)

    def check(self) -> None:
        from crosspt.errors import ConfigError

        b = self.bench
        b.check()
        if self.lr_shots not in b.shots:
            raise ConfigError(f"lr_shots {self.lr_shots} is not one of the shots {b.shots}")
        for name, vals in (("multi_shots", self.multi_shots), ("transfer_seeds", self.transfer_seeds)):
            bad = [v for v in vals if v not in (b.shots if name == "multi_shots" else b.seeds)]
            if bad:
                raise ConfigError(f"{name} {bad} are not among the benchmark's "
                                  f"{'shots' if name == 'multi_shots' else 'seeds'}")
        if not [t for t in b.source_tasks if t not in b.tasks] and self.multi_shots:
            raise ConfigError("the multi-task regime needs a source task that is not a target "
                              f"(targets {b.tasks}, source pool {b.source_tasks})")
        bad = [a for a in self.arms if a not in [str(x) for x in SINGLE]]
        if bad:
            raise ConfigError(f"arms {bad} are not single-task arms ({', '.join(str(x) for x in SINGLE)})")
        from crosspt.method.composition import Normalization

        bad = [n for n in self.normalizations if n not in [x.value for x in Normalization]]
        if bad:
            raise ConfigError(f"normalizations {bad}: choose from {', '.join(x.value for x in Normalization)}")

    def single_arms(self) -> list[Arm]:
        return [a for a in SINGLE if str(a) in self.arms]

    def variants(self, arm: Arm) -> list[tuple[str | None, dict | None]]:
        """(variant name, run-config overrides) of each cell an arm runs per (target, k, seed): the
        default rules, then CrossPT again under each of `normalizations`."""
        out: list[tuple[str | None, dict | None]] = [(None, None)]
        if arm in (Arm.CAT, Arm.WAVG):
            out += [(normalization_variant(n), {"prompt": {"normalization": n}}) for n in self.normalizations]
        return out


def normalization_variant(rule: str) -> str:
    """The variant name of a cell run under router rule `rule` instead of the default."""
    return f"normalization {rule}"


# ---- jobs ---------------------------------------------------------------------------------------------
def cell_job(st: StandardSettings, arm: Arm, tasks: list[str], k: int, seed: int, lrs: list[float], **kw) -> dict:
    return {"kind": "cell", "method": str(arm), "task": "+".join(tasks), "tasks": list(tasks), "k": k,
            "seed": seed, "lrs": list(lrs), "settings": asdict(st.bench), "std": _std_fields(st), **kw}


def _std_fields(st: StandardSettings) -> dict:
    return {k: v for k, v in asdict(st).items() if k != "bench"}


def _overrides(job: dict, s: BenchSettings) -> dict:
    """The sections of the run config an arm changes from its base method's."""
    arm, L = Arm(job["method"]), s.prompt_len
    if arm is Arm.SOURCE:
        sd = job["std"]
        return {"data": {"shots": sd["source_rows"], "shots_per": "task", "val_shots": sd["source_val"]},
                "train": {"epochs": sd["source_epochs"], "batch_size": sd["source_batch"], "patience": None,
                          "checkpoint_every": sd["source_epochs"]}}
    if arm is Arm.PT_LONG:
        return {"prompt": {"private_len": job["prompt_len"]}}
    if arm is Arm.PT_MULTI:      # one learnable candidate shared by every task, no private prompts
        return {"prompt": {"n_sources": 1, "source_len": L, "private_len": 0, "learn_sources": True,
                           "composition": "cat"}}
    if arm is Arm.CAT_MULTI:
        return {"prompt": {"learn_sources": True}}
    return {}


def config_for(job: dict, lr: float):
    """The run config of a job at `lr`: the arm's overrides, then the job's own `variant` overrides
    (`{section: {key: value}}`, the ablations of `standard_run.ablate`)."""
    s = BenchSettings(**job["settings"])
    arm = Arm(job["method"])
    n = 1 if arm is Arm.PT_MULTI else \
        len(job.get("bank_tasks") or []) if _BASE[arm] in (Method.CROSSPT_CAT, Method.CROSSPT_WAVG) else 0
    over = _overrides(job, s)
    for section, values in (job.get("variant") or {}).items():
        over[section] = {**over.get(section, {}), **values}
    return run_config(s, _BASE[arm], job["tasks"], job["k"], job["seed"], lr, n_sources=n, overrides=over)


def at_vocabulary_norm(bank: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
    """`bank` `[n, L, d]` with every token rescaled to the mean L2 norm of the vocabulary's rows `[V, d]`
    (directions kept): trained prompts end far off the embedding scale (see benchmarks/standard.md)."""
    target = word_embeddings.float().norm(dim=-1).mean()
    return bank / bank.norm(dim=-1, keepdim=True).clamp_min(1e-12) * target


def build_arm(job: dict, cfg, tasks, backbone):
    """A fresh model of the job's arm on an already loaded (frozen, shared) backbone."""
    from crosspt.method.prompts import init_prompt
    from crosspt.run.model import build_model

    arm = Arm(job["method"])
    torch.manual_seed(cfg.seed)
    if arm is Arm.PT_MULTI:
        # the shared prompt starts like PT's (rows of the vocabulary, the same draw as a PT run's)
        pt_cfg = config_for({**job, "method": str(Arm.PT)}, cfg.optim.prompt_lr)
        start = build_model(pt_cfg, tasks[:1], backbone=backbone).prompt.private.prompts[:1].detach().clone()
        return build_model(cfg, tasks, bank=start, backbone=backbone)
    bank = job.get("bank") if cfg.prompt.n_sources else None
    if bank is not None and job.get("bank_norm") == "vocab":
        bank = at_vocabulary_norm(bank, backbone.word_embeddings().weight.detach())
    model = build_model(cfg, tasks, bank=bank, backbone=backbone)
    if arm is Arm.SPOT:
        with torch.no_grad():
            p = model.prompt.private.prompts
            p.copy_(init_prompt(tuple(p.shape), "source", source=job["source"]))
    return model


def _router_trace_session(output_dir: str, model):
    """A LocalSession that also keeps the router's evaluation weights `[n_tasks, n_cand]` at every epoch
    report. The last report comes after the loop restored the best epoch's state, so its entry is marked
    `restored_best`."""
    from crosspt.run.loop import LocalSession

    class RouterTrace(LocalSession):
        def __init__(self):
            super().__init__(output_dir, keep=1)
            self.trace = [{"epoch": -1, "weights": model.prompt.task_weights().tolist()}]

        def report(self, metrics, checkpoint_dir):
            self.trace.append({"epoch": metrics.get("epoch"), "val": metrics.get("val_score"),
                               "restored_best": bool(metrics.get("final_epoch")),
                               "weights": model.prompt.task_weights().tolist()})
            return super().report(metrics, checkpoint_dir)

    return RouterTrace()


def _train_on_val(model, cfg, splits: dict) -> tuple[dict, list]:
    """run_loop with the test split replaced by the validation split: what it reports as test is
    discarded, so picking the lr never reads the real test split. Also returns the router's weights
    per epoch (`_router_trace_session`)."""
    from crosspt.run.loop import run_loop

    blind = {t: {**sp, "test": sp["val"]} for t, sp in splits.items()}
    with tempfile.TemporaryDirectory(prefix="crosspt_std_", ignore_cleanup_errors=True) as d:
        session = _router_trace_session(d, model)
        return run_loop(cfg, session, model=model, splits=blind), session.trace


def _test_of(model, tasks, splits: dict, s: BenchSettings) -> tuple[float, dict]:
    from crosspt.run.loop import LocalSession, evaluate, score_of

    with tempfile.TemporaryDirectory(prefix="crosspt_std_", ignore_cleanup_errors=True) as d:
        test = evaluate(model, {t: sp["test"] for t, sp in splits.items()}, LocalSession(d), s.eval_batch_size,
                        with_generation=s.generate and model.generates)
    return score_of(test, tasks), test


def run_cell(job: dict, cache) -> dict:
    """Train the cell at each lr, pick by validation, score the pick on test -> a plain record."""
    s = BenchSettings(**job["settings"])
    if s.threads:
        torch.set_num_threads(int(s.threads))
    t0 = time.time()
    cfg0 = config_for(job, job["lrs"][0])
    tasks, splits = cache.get(cfg0)
    trials, best = [], None
    for lr in job["lrs"]:
        started = time.time()
        cfg = config_for(job, lr)
        # a backbone of its own per lr: its per-task scoring heads train with the prompt, so a shared one
        # would start each lr from the previous lr's heads and score the kept model with the last one's
        model = build_arm(job, cfg, tasks, load_backbone_for(cfg, tasks))
        res, trace = _train_on_val(model, cfg, splits)
        trials.append({"lr": lr, "val": float(res["best_val_score"]), "best_epoch": res["best_epoch"],
                       "epochs_run": res["epochs_run"], "router_weights": res.get("router_weights"),
                       "wall_s": time.time() - started, "epoch_s": [h["epoch_s"] for h in res["history"]
                                                                    if "epoch_s" in h],
                       **({"router_trace": trace} if cfg.prompt.n_sources else {})})
        if best is None or trials[-1]["val"] > best[1]["val"]:
            best = (model, trials[-1])
        del model
    model, pick = best
    score, test = _test_of(model, tasks, splits, s)
    rec = {"kind": "cell", "method": job["method"], "task": job["task"], "tasks": job["tasks"], "k": job["k"],
           "seed": job["seed"], "lr": pick["lr"], "val": pick["val"], "test": float(score),
           "test_metrics": test, "best_epoch": pick["best_epoch"], "epochs_run": pick["epochs_run"],
           "router_weights": pick["router_weights"], "router_trace": pick.get("router_trace"), "trials": trials, "wall_s": time.time() - t0,
           "bank_tasks": list(job.get("bank_tasks") or []), "source": job.get("source_name"),
           "variant": job.get("variant"), "variant_name": job.get("variant_name"),
           "prompt_tokens": model.prompt.spec.composed_len,
           "n_train": {t: len(sp["train"]) for t, sp in splits.items()},
           "n_test": {t: len(sp["test"]) for t, sp in splits.items()},
           "sample_ids": {t: sorted(e.uid for e in sp["train"])[:8] for t, sp in splits.items()}}
    if Arm(job["method"]) is Arm.SOURCE:
        rec["prompt"] = model.prompt.private.prompts[0].detach().cpu().clone()
    return rec


# ---- the untrained probe -------------------------------------------------------------------------------
def zero_shot_job(st: StandardSettings, task: str) -> dict:
    """The empty prompt on a task's test split (the same rows at every k and seed: one job per task)."""
    return {"kind": "zero_shot", "method": str(Arm.ZERO_SHOT), "task": task, "tasks": [task], "k": st.lr_shots,
            "seed": st.source_seed, "lr": None, "settings": asdict(st.bench), "std": _std_fields(st)}


def probe_job(st: StandardSettings, target: str, bank: torch.Tensor, names: list[str]) -> dict:
    return {"kind": "probe", "method": "probe", "task": target, "tasks": [target], "k": st.lr_shots,
            "seed": st.probe_seed, "lr": None, "bank": bank, "bank_tasks": names,
            "settings": asdict(st.bench), "std": _std_fields(st)}


def run_probe(job: dict, cache) -> dict:
    """Test scores of untrained prompts on one target: each variant is what some method starts from."""
    from crosspt.bench.prompts import EmptyPrompt
    from crosspt.run.model import CrossPTModel

    s = BenchSettings(**job["settings"])
    if s.threads:
        torch.set_num_threads(int(s.threads))
    t0 = time.time()
    bank, names, L = job["bank"], job["bank_tasks"], s.prompt_len
    long_len = (len(names) + 1) * L
    base = {**job, "lrs": [s.lrs[0]]}
    pt_cfg = config_for({**base, "method": str(Arm.PT)}, s.lrs[0])
    tasks, splits = cache.get(pt_cfg)
    backbone = load_backbone_for(pt_cfg, tasks)

    def arm_model(arm: Arm, **extra):
        j = {**base, "method": str(arm), **extra}
        return build_arm(j, config_for(j, s.lrs[0]), tasks, backbone)

    scores: dict[str, float] = {}
    scores["empty prompt (zero-shot)"] = _test_of(CrossPTModel(EmptyPrompt(1, backbone.embed_dim), backbone),
                                                  tasks, splits, s)[0]
    scores[f"PT init, {L} tokens"] = _test_of(arm_model(Arm.PT), tasks, splits, s)[0]
    scores[f"PT long init, {long_len} tokens"] = _test_of(arm_model(Arm.PT_LONG, prompt_len=long_len),
                                                         tasks, splits, s)[0]
    cat = arm_model(Arm.CAT, bank=bank)
    w = cat.prompt.task_weights()[0].tolist()
    scores[f"CrossPT cat init ({len(names)}x{L} + {L}, weights {w[0]:.2f} each)"] = _test_of(cat, tasks, splits, s)[0]
    scores[f"CrossPT wavg init ({L} tokens)"] = _test_of(arm_model(Arm.WAVG, bank=bank), tasks, splits, s)[0]
    # the same cat tokens, every candidate at weight 1: is it the scale of the weighted tokens?
    full = arm_model(Arm.PT_LONG, prompt_len=long_len)
    with torch.no_grad():
        full.prompt.private.prompts.copy_(torch.cat([bank.flatten(0, 1), cat.prompt.private.prompts[0]], 0)[None])
    scores[f"sources + private concatenated at full scale ({long_len} tokens)"] = _test_of(full, tasks, splits, s)[0]
    # the private prompt alone at the weight it has inside cat: the source tokens taken out
    alone = arm_model(Arm.PT)
    with torch.no_grad():
        alone.prompt.private.prompts.copy_(cat.prompt.private.prompts * w[-1])
    scores[f"cat's private prompt alone, scaled by its weight {w[-1]:.2f} ({L} tokens)"] = \
        _test_of(alone, tasks, splits, s)[0]
    scores.update(_before_cls_scores(backbone, {f"PT init, {L} tokens, before [CLS]": arm_model(Arm.PT),
                                                "CrossPT cat init, before [CLS]": cat}, tasks, splits, s))
    for name, src in zip(names, bank):
        scores[f"source {name} alone ({L} tokens)"] = _test_of(arm_model(Arm.SPOT, source=src), tasks, splits, s)[0]
    return {"kind": "probe", "method": "probe", "task": job["task"], "k": job["k"], "seed": job["seed"], "lr": None,
            "val": float("nan"), "test": scores["empty prompt (zero-shot)"], "scores": scores,
            "epochs_run": 0, "wall_s": time.time() - t0}


def _before_cls_scores(backbone, models: dict, tasks, splits: dict, s: BenchSettings) -> dict[str, float]:
    """The same models with the prompt placed before [CLS] (PEFT's placement) instead of after the input;
    encoder backbones only (others have no such option: nothing is scored)."""
    from crosspt.backbones.encoder import PromptPosition

    if not hasattr(backbone, "prompt_position"):
        return {}
    was, out = backbone.prompt_position, {}
    try:
        backbone.prompt_position = PromptPosition.BEFORE_CLS
        for name, model in models.items():
            out[name] = _test_of(model, tasks, splits, s)[0]
    finally:
        backbone.prompt_position = was
    return out


def run_zero_shot(job: dict, cache) -> dict:
    from crosspt.bench.prompts import EmptyPrompt
    from crosspt.run.model import CrossPTModel

    s = BenchSettings(**job["settings"])
    if s.threads:
        torch.set_num_threads(int(s.threads))
    t0 = time.time()
    cfg = config_for({**job, "method": str(Arm.PT)}, s.lrs[0])
    tasks, splits = cache.get(cfg)
    backbone = load_backbone_for(cfg, tasks)
    score, test = _test_of(CrossPTModel(EmptyPrompt(1, backbone.embed_dim), backbone), tasks, splits, s)
    return {"kind": "zero_shot", "method": str(Arm.ZERO_SHOT), "task": job["task"], "k": job["k"],
            "seed": job["seed"], "lr": None, "val": float("nan"), "test": float(score), "test_metrics": test,
            "epochs_run": 0, "wall_s": time.time() - t0}


RUNNERS = {"cell": run_cell, "probe": run_probe, "zero_shot": run_zero_shot}

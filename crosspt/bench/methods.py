"""Every benchmark baseline as a configuration of the same model: one `MethodSpec` per `Method`.

A spec says what differs between the rows of the table, and nothing else does:
- the run config's `prompt` section (`MethodSpec.prompt_section`): PT-shaped (one private prompt of
  `prompt_len` tokens, no sources) or composed (the leave-one-out source bank + a private prompt, a
  composition and a router);
- how its prompt module is built (`MethodSpec.build`): our `CrossPTPrompt` through `build_model`, an empty
  prompt, or PEFT's prompt embedding (crosspt.bench.prompts) in front of the same backbone;
- when it can run (`MethodSpec.stage`): what it waits for from an earlier phase of the benchmark.
The fairness every row gets from the one `BenchSettings`: the same frozen backbone, k-shot samples, seeds,
epochs, patience and batch size, the same learning-rate grid over the method's OWN prompt lr (picked by
validation score), and the same fixed router lr for every method with a router.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from crosspt.backbones.base import Backbone
    from crosspt.bench.settings import BenchSettings
    from crosspt.config.schema import RunConfig
    from crosspt.run.model import CrossPTModel
    from crosspt.tasks.specs import TaskSpec


class Method(StrEnum):
    ZERO_SHOT = "zero_shot"
    PT = "pt"
    PEFT_PT = "peft_pt"
    SPOT = "spot"
    ATTEMPT = "attempt"
    MPT = "mpt"
    CROSSPT_CAT = "crosspt_cat"
    CROSSPT_WAVG = "crosspt_wavg"
    MPT_SOURCE = "mpt_source"      # MPT's source stage: jobs of their own, not a row of the table


class Stage(IntEnum):
    """What a method waits for; the benchmark runs one phase per stage, in this order."""
    ALONE = 1          # nothing but the target's data
    SOURCES = 2        # the seed's source bank (phase-1 PT prompts of the source pool, target left out)
    SOURCE_STAGE = 3   # its own best source stage from phase 2 (MPT's target stage)


Builder = Callable[[dict, "RunConfig", "list[TaskSpec]", "Backbone"], "CrossPTModel"]


@dataclass(frozen=True)
class MethodSpec:
    method: Method
    label: str                       # its row in the tables
    stage: Stage
    build: Builder                   # (job, config, tasks, loaded backbone) -> the model it trains
    composition: str | None = None   # "cat" | "wavg" over bank + private; None: a PT-shaped prompt
    router: str | None = None        # "task" | "attention", with a composition
    trains: bool = True              # False: evaluated as built (zero-shot)
    picks_source: bool = False       # chooses one source of the bank before its run (SPoT)
    keep: Callable[["CrossPTModel"], dict] | None = None   # what its record carries to a later phase
    source_stage: Method | None = None   # the phase-2 method whose best run this one starts from

    def prompt_section(self, prompt_len: int, n_sources: int, init: str = "vocab") -> dict:
        """The run config's `prompt` section. Every prompt is `prompt_len` tokens long (PT, each source,
        the private prompt, PEFT's virtual tokens), initialised by `init` (`PromptInit`; every method the same)."""
        if self.composition is None:
            return {"n_sources": 0, "private_len": prompt_len, "init": init}
        return {"n_sources": n_sources, "source_len": prompt_len, "private_len": prompt_len, "init": init,
                "composition": self.composition, "router": self.router}


# ---- how each method's model is built (job, cfg, tasks, backbone) -> CrossPTModel -------------------
def _zero_shot(job, cfg, tasks, backbone):
    from crosspt.bench.prompts import EmptyPrompt
    from crosspt.run.model import CrossPTModel

    return CrossPTModel(EmptyPrompt(len(tasks), backbone.embed_dim), backbone)


def _ours(job, cfg, tasks, backbone):
    """Our prompt module from the config; with sources it composes the job's leave-one-out bank."""
    from crosspt.run.model import build_model

    return build_model(cfg, tasks, bank=job.get("bank") if cfg.prompt.n_sources else None, backbone=backbone)


def _spot(job, cfg, tasks, backbone):
    """PT whose private prompt starts as a copy of the chosen source prompt: what `prompt.init=source`
    does with a 1-source bank; the source itself is not composed."""
    from crosspt.method.prompts import init_prompt

    model = _ours(job, cfg, tasks, backbone)
    with torch.no_grad():
        p = model.prompt.private.prompts
        p.copy_(init_prompt(tuple(p.shape), "source", source=job["source"]))
    return model


def _peft(kind, cfg, tasks, backbone, init_state=None):
    """PEFT's prompt embedding of `private_len` virtual tokens in front of the backbone."""
    from crosspt.bench.prompts import attach_peft
    from crosspt.run.model import CrossPTModel

    prompt, backbone = attach_peft(backbone, kind, cfg.prompt.private_len, n_tasks=len(tasks),
                                   init_state=init_state)
    return CrossPTModel(prompt, backbone)


def _peft_pt(job, cfg, tasks, backbone):
    """PEFT's PromptTuning (SAMPLE_VOCAB init), an outside reference for the PT row."""
    from crosspt.bench.prompts import PeftKind

    return _peft(PeftKind.PT, cfg, tasks, backbone)


def _mpt_source(job, cfg, tasks, backbone):
    """MPT's source stage: PEFT's MultitaskPromptTuning trained multi-task on the leave-one-out source
    tasks, its shared prompt started from the same pre-trained source prompts every other method composes
    (their mean; MPT distils its shared prompt from such single-task teachers, Wang et al. 2023), so MPT
    is not handicapped by a near-zero random start the others do not have."""
    from crosspt.bench.prompts import PeftKind, init_mpt_shared_prompt

    model = _peft(PeftKind.MPT, cfg, tasks, backbone)
    if job.get("bank") is not None:
        init_mpt_shared_prompt(model.prompt, job["bank"])
    return model


def _mpt_target(job, cfg, tasks, backbone):
    """MPT's target stage: initialised AVERAGE_SOURCE_TASKS from the best source stage's tensors."""
    from crosspt.bench.prompts import PeftKind, mpt_state_file

    with mpt_state_file(job["mpt_state"]) as path:
        return _peft(PeftKind.MPT, cfg, tasks, backbone, init_state=path)


def _keep_prompt(model) -> dict:
    """PT's best-epoch prompt `[L, d]`: the sources of the banks are these."""
    return {"prompt": model.prompt.private.prompts[0].detach().cpu().clone()}


def _keep_mpt_state(model) -> dict:
    from crosspt.bench.prompts import mpt_state

    return {"mpt_state": mpt_state(model)}


SPECS: dict[Method, MethodSpec] = {spec.method: spec for spec in (
    MethodSpec(Method.ZERO_SHOT, "Zero-shot", Stage.ALONE, _zero_shot, trains=False),
    MethodSpec(Method.PT, "PT (ours)", Stage.ALONE, _ours, keep=_keep_prompt),
    MethodSpec(Method.PEFT_PT, "PT (PEFT)", Stage.ALONE, _peft_pt),
    MethodSpec(Method.SPOT, "SPoT", Stage.SOURCES, _spot, picks_source=True),
    # ATTEMPT: an input-conditioned attention router over the sources + private, weighted average
    MethodSpec(Method.ATTEMPT, "ATTEMPT-style", Stage.SOURCES, _ours, composition="wavg", router="attention"),
    MethodSpec(Method.MPT, "MPT (PEFT)", Stage.SOURCE_STAGE, _mpt_target, source_stage=Method.MPT_SOURCE),
    MethodSpec(Method.CROSSPT_CAT, "CrossPT cat", Stage.SOURCES, _ours, composition="cat", router="task"),
    MethodSpec(Method.CROSSPT_WAVG, "CrossPT wavg", Stage.SOURCES, _ours, composition="wavg", router="task"),
    MethodSpec(Method.MPT_SOURCE, "MPT source stage", Stage.SOURCES, _mpt_source, keep=_keep_mpt_state),
)}
METHODS = tuple(m for m in Method if m is not Method.MPT_SOURCE)      # the rows of the table, in order
LABELS = {m: spec.label for m, spec in SPECS.items()}
CROSSPT_METHODS = (Method.CROSSPT_CAT, Method.CROSSPT_WAVG)            # what the verdict compares with PT
TRAINED = tuple(m for m in METHODS if SPECS[m].trains)
NEEDS_SOURCES = tuple(m for m in METHODS if SPECS[m].stage >= Stage.SOURCES)
SOURCE_STAGES = frozenset(spec.source_stage for spec in SPECS.values() if spec.source_stage)


def spec_of(method: str) -> MethodSpec:
    return SPECS[Method(method)]


def selected(methods: Iterable[str], stage: Stage) -> list[MethodSpec]:
    """The specs of `methods` that run at `stage`, in table order."""
    chosen = set(methods)
    return [SPECS[m] for m in METHODS if m in chosen and SPECS[m].stage is stage]


def run_config(s: BenchSettings, method: str, tasks: Sequence[str], k: int, seed: int, lr: float,
               n_sources: int = 0, overrides: dict | None = None):
    """The RunConfig of one job: the benchmark's shared budget plus the method's prompt section;
    `overrides` `{section: {key: value}}` replace keys of a section (the standard benchmark's source
    pre-training budget, its long PT prompt, its multi-task shared prompt)."""
    from crosspt.config.schema import build_config

    tree = {"name": f"bench-{method}-{'+'.join(tasks)}-k{k}-s{seed}", "seed": seed, "tasks": list(tasks),
            "backbone": {"name": s.backbone, "max_length": s.max_length},
            "data": {"data_dir": s.data_dir, "shots": k, "max_test": s.max_test},
            "prompt": spec_of(method).prompt_section(s.prompt_len, n_sources, s.prompt_init),
            "optim": {"prompt_lr": lr, "router_lr": s.router_lr},
            "train": {"epochs": s.epochs, "batch_size": s.batch_size, "eval_batch_size": s.eval_batch_size,
                      "patience": s.patience, "checkpoint_every": s.epochs}}
    for section, values in (overrides or {}).items():
        tree[section] = {**tree[section], **values}
    return build_config(tree, f"benchmark {method}")


def load_backbone_for(cfg, tasks):
    """The frozen backbone a config names (every method loads it the same way)."""
    from crosspt.backbones.loader import load_for_config

    return load_for_config(cfg, tasks)


def build_bench_model(job: dict, cfg, tasks):
    """The model a job trains (or evaluates), from its method's spec."""
    torch.manual_seed(cfg.seed)
    backbone = load_backbone_for(cfg, tasks)
    # seeded again: PEFT's SAMPLE_VOCAB / RANDOM inits draw from the global RNG, and whatever loading the
    # backbone drew must not shift them (build_model seeds itself the same way)
    torch.manual_seed(cfg.seed)
    return spec_of(job["method"]).build(job, cfg, tasks, backbone)

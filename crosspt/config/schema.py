"""One typed, validated schema for a run, shared by train, search, promote and predict.

Loaded from YAML, overridden by dotted `key=value` pairs; unknown keys and wrong types are errors that
name the key. Search spaces (crosspt.search_space) extend this schema with distributions over its keys.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crosspt.backbones.base import Family, Placement
from crosspt.backbones.chat import Template
from crosspt.backbones.encoder import PairEncoding
from crosspt.errors import ConfigError
from crosspt.method.composition import Composition, Normalization, Schedule
from crosspt.method.prompts import PromptInit, RouterKind
from crosspt.tasks.data import ASSESS_AUTO, ASSESS_MAX_ROWS, ShotsPer, TrainPool
from crosspt.tasks.specs import LabelSemantics


class Strict(BaseModel):
    """Base of every config model (run schema and search space): unknown keys are errors, assignments
    are validated, and an option (an Enum of the module that implements it) is stored, defaults included,
    as its plain string value, so dumps, hashes and MLflow params read exactly as the YAML does."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True,
                              use_enum_values=True)


class BackboneConfig(Strict):
    name: str = "minilm"                # hub id, local path, "minilm" (offline all-MiniLM-L6-v2) or "smollm2"
    family: Family = Family.AUTO
    pair_encoding: PairEncoding = PairEncoding.AUTO     # encoder family only
    max_length: int = Field(128, ge=8, le=4096)
    # auto: bf16 weights and autocast on a GPU that supports bf16, else fp32 (fp32 on CPU); applied in
    # run/precision.py and registry/, above config: defined here
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # decoder family only: the tokenizer's chat template (auto: where it has one) or the plain text format
    template: Template = Template.AUTO


class DataConfig(Strict):
    data_dir: str | None = None         # local folder with glue_data/ and superglue/; None: env or hub
    shots: int = Field(16, ge=1)        # k examples per class (or per task, see shots_per)
    shots_per: ShotsPer = ShotsPer.CLASS
    val_shots: int | None = Field(None, ge=1)   # validation carved from train; default = shots
    max_test: int | None = Field(None, ge=1)    # cap on the official dev split used as test
    # which half of each train split k-shot samples come from: targets validate on rows no source prompt
    # was pre-trained on (crosspt.tasks.data.TrainPool; source pre-training sets `source`)
    train_pool: TrainPool = TrainPool.TARGET
    # rows per target task of the assessment split: scored once on the selected state at the end of a run, never
    # trained, stopped early, selected or promoted on (crosspt.tasks.data.assessment_reserve). 0: off (the k-shot
    # rows as without it; `crosspt train`'s default); `auto`: 300, fewer on a small task (a search's default)
    assess_rows: int | Literal["auto"] = 0
    task_files: list[str] = []          # user task definitions (YAML), registered before use


    @field_validator("assess_rows", mode="before")
    @classmethod
    def _assess_rows_range(cls, v):
        # before pydantic's own checks: a union's errors would name its branches, and `true` would pass as 1
        if v != ASSESS_AUTO and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= ASSESS_MAX_ROWS):
            raise ValueError(f"must be 0 (off), 1..{ASSESS_MAX_ROWS} or '{ASSESS_AUTO}', got {v!r}")
        return v


class TemperatureConfig(Strict):
    # exp | linear: from start to floor over training progress (the floor on the last step);
    # step: max(floor, start * exp(-rate * step)), the only schedule that reads `rate`
    schedule: Schedule = Schedule.EXP
    start: float = Field(5.0, gt=0)
    floor: float = Field(0.1, gt=0)
    rate: float = Field(1e-3, ge=0)

    @model_validator(mode="after")
    def _floor_below_start(self):
        if self.floor > self.start:
            raise ValueError(f"temperature.floor ({self.floor}) must not exceed temperature.start ({self.start})")
        return self


class PromptConfig(Strict):
    n_sources: int = Field(0, ge=0)
    source_len: int = Field(16, ge=1)
    private_len: int = Field(16, ge=0)
    composition: Composition = Composition.CAT
    top_k: int | None = Field(None, ge=1)
    # training draws vs evaluation weights (crosspt.method.composition: dirichlet | noisy_topk | reference |
    # gate_softmax)
    normalization: Normalization = Normalization.DIRICHLET
    router: RouterKind = RouterKind.TASK
    router_bias: float = 0.0            # initial router logit of the private prompt (sources start at 0)
    temperature: TemperatureConfig = TemperatureConfig()
    # auto: the backbone family's choice (encoder: neutral; seq2seq: vocab, Lester et al.; decoder: text)
    init: PromptInit = PromptInit.AUTO
    # init 'text': one text for every task, tiled to the prompt's length; None: each task's instruction,
    # where the decoder's chat template writes it before the prompt the prompt takes the place of its last
    # private_len tokens (so the untrained prompt reads as zero-shot), elsewhere tiled
    init_text: str | None = None
    learn_sources: bool = False
    # safetensors file or models:/NAME@alias; `random`: untrained random sources, the explicit ablation
    # (n_sources > 0 needs one of these: `source_bank_problem`); None: no bank
    source_bank: str | None = None
    # implemented by crosspt.run.artifacts.select_sources (a layer above config: defined here)
    source_selection: Literal["order", "similar"] = "order"
    include_own_source: bool = True     # false: a target task's own source prompt is left out of the bank
    prefix: bool = True                 # prepend "task: " to inputs
    placement: Placement = Placement.AUTO   # before | after the input (seq2seq); auto: the family's place
    label_semantics: LabelSemantics = LabelSemantics.NATURAL

    @property
    def n_candidates(self) -> int:
        return self.n_sources + (1 if self.private_len > 0 else 0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.n_candidates == 0:
            raise ValueError("prompt.private_len is 0 and prompt.n_sources is 0: no prompt to train")
        if self.top_k is not None and self.top_k > self.n_candidates:
            raise ValueError(f"prompt.top_k ({self.top_k}) exceeds the number of candidate prompts "
                             f"({self.n_candidates} = n_sources + private)")
        if self.init == PromptInit.TEXT and self.init_text is not None and not self.init_text.strip():
            raise ValueError("prompt.init is 'text' but prompt.init_text is empty (leave it unset to start "
                             "from each task's instruction)")
        if self.init == PromptInit.SOURCE and self.n_sources == 0:
            raise ValueError("prompt.init is 'source' but prompt.n_sources is 0")
        if self.init == PromptInit.OWN_SOURCE and (not self.source_bank or self.source_bank == RANDOM_BANK):
            raise ValueError("prompt.init is 'own_source' but prompt.source_bank names no trained bank")
        if self.router == RouterKind.ATTENTION and (self.top_k is not None or self.router_bias):
            raise ValueError("prompt.router 'attention' is ATTEMPT as published (softmax over every candidate): "
                             "it takes no prompt.top_k and no prompt.router_bias; use 'attention_gated'")
        return self


RANDOM_BANK = "random"      # `prompt.source_bank: random`: frozen random source prompts, on purpose


def source_bank_problem(cfg: "RunConfig") -> str | None:
    """Why `cfg` cannot run as written: source prompts without a bank would be frozen random prompts, a
    silent ablation. Not a schema validator because the benchmark builds models from banks it holds in
    memory; the search (every sampled configuration), `crosspt train` and the training loop ask it."""
    p = cfg.prompt
    if p.n_sources > 0 and not p.source_bank:
        return (f"prompt.n_sources is {p.n_sources} but prompt.source_bank is not set: the sources would be "
                f"untrained random prompts; name a bank (crosspt pretrain-sources) or set "
                f"prompt.source_bank: {RANDOM_BANK} for that ablation")
    return None


class OptimConfig(Strict):
    prompt_lr: float = Field(0.03, gt=0)
    router_lr: float = Field(0.01, gt=0)
    source_lr: float | None = Field(None, gt=0)   # learned source prompts; default prompt_lr
    head_lr: float | None = Field(None, gt=0)  # backbone-side heads (encoder class vectors); default prompt_lr
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)


class TrainConfig(Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)           # global batch size (split over workers)
    eval_batch_size: int = Field(64, ge=1)
    patience: int | None = Field(5, ge=1)      # early stopping on the validation metric (epochs)
    checkpoint_every: int = Field(1, ge=1)     # epochs
    eval_initial: bool = True                  # validate the untrained prompt too (best epoch may be -1)
    # seq2seq/decoder: also score the best state's test split by greedy generation (`gen_*` metrics), a
    # second, costlier pass; search trials leave it off unless the space's base turns it on
    generated_metrics: bool = True


class ScalingConfig(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    # GPUs each worker (or in-process trial) reserves; default 1 with use_gpu. A fraction lets several
    # trials share one GPU (0.25: four T5-base trials on one device); above 1 it must be whole
    gpus_per_worker: float | None = Field(None, gt=0)
    in_process: bool = True                    # 1 worker: run the loop in the caller (no worker group)

    @model_validator(mode="after")
    def _gpu_share(self):
        g = self.gpus_per_worker
        if g is not None and not self.use_gpu:
            raise ValueError(f"scaling.gpus_per_worker ({g}) is set but scaling.use_gpu is false")
        if g is not None and g > 1 and not float(g).is_integer():
            raise ValueError(f"scaling.gpus_per_worker ({g}): a share above one GPU must be a whole number")
        return self

    @property
    def gpus(self) -> float:
        """GPUs reserved per worker: 0 without use_gpu."""
        return (self.gpus_per_worker or 1.0) if self.use_gpu else 0.0

    def worker_resources(self) -> dict[str, float]:
        """One worker's Ray resource bundle (`{"CPU": c, "GPU": g}`, no GPU key without use_gpu)."""
        return {"CPU": float(self.cpus_per_worker), **({"GPU": self.gpus} if self.use_gpu else {})}


class TrackingConfig(Strict):
    tracking_uri: str | None = None            # default: env MLFLOW_TRACKING_URI, else sqlite in cwd
    experiment: str = "crosspt"
    # a sqlite tracking_uri on a multi-node Ray cluster is refused (each node would write its own file)
    # unless every node mounts that path from shared storage: say so here
    shared_store: bool = False


class RunConfig(Strict):
    name: str = "crosspt"
    seed: int = 0                              # fixes k-shot samples, initialisation, batch order
    tasks: list[str] = Field(default_factory=lambda: ["sst2"], min_length=1)
    backbone: BackboneConfig = BackboneConfig()
    data: DataConfig = DataConfig()
    prompt: PromptConfig = PromptConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _unique_tasks(self):
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks contains duplicates: {self.tasks}")
        if self.optim.source_lr is not None and not (self.prompt.learn_sources and self.prompt.n_sources):
            raise ValueError("optim.source_lr is set but no source prompt is learned "
                             "(prompt.learn_sources with prompt.n_sources > 0)")
        return self


# ---------------------------------------------------------------------------------------------
def _format_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown config key"
    extra = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    return f"{where}: '{key}': {msg}{extra}"


def parse_value(text: str) -> Any:
    """A `--set` value as YAML scalar/list (`0.1`, `true`, `[a, b]`, `null`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{key}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str] | dict | None) -> dict:
    if not overrides:
        return tree
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    for key, value in items:
        set_dotted(tree, key, value)
    return tree


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(tree).__name__}")
    return tree


# Per-backbone values for keys a config leaves unset (`apply_preset`); a config that names a key keeps its
# value. The schema's defaults were tuned on MiniLM (validation rows = shots, patience 5, lr 0.03); on SmolLM2 they
# stopped on the noise of 32 validation rows before the prompt had learned anything (issue 33; README, "Backbone
# presets", lists the values and benchmarks/decoder.md what they gave). SmolLM2's lr fits its default start, the
# prompt in the instruction's place (= the zero-shot conversation): chosen by mean best validation accuracy over
# seeds 0-4 on SST-2 at 16 shots from 0.0003 / 0.001 / 0.003 / 0.01 / 0.03 / 0.1 (0.70 / 0.83 / 0.84 / 0.81 / 0.75
# / 0.70); AdamW's early steps are about lr per coordinate, and at 0.1 they undo a start whose embeddings have
# std 0.14 in the first epoch.
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2": {"data.val_shots": 32, "train.epochs": 8, "train.patience": 3, "optim.prompt_lr": 0.003},
}


def preset_of(backbone_name: str) -> dict[str, Any]:
    """The preset of a backbone name (its aliases included), {} for a backbone without one."""
    from crosspt.backbones import smollm2

    key = str(backbone_name).strip().lower()
    return BACKBONE_PRESETS["smollm2"] if key in smollm2.ALIASES else BACKBONE_PRESETS.get(key, {})


def _has_dotted(tree: dict, key: str) -> bool:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def apply_preset(tree: dict) -> dict:
    """`tree` with its backbone's preset (`BACKBONE_PRESETS`) filled in where it sets no value; in place."""
    backbone = tree.get("backbone")
    name = backbone.get("name") if isinstance(backbone, dict) else None
    for key, value in (preset_of(name) if isinstance(name, str) else {}).items():
        if not _has_dotted(tree, key):
            set_dotted(tree, key, value)
    return tree


def build_config(tree: dict, where: str = "config") -> RunConfig:
    """A validated RunConfig from a tree of keys (its backbone's preset filling the keys it leaves unset)."""
    try:
        return RunConfig.model_validate(apply_preset(copy.deepcopy(tree)) if isinstance(tree, dict) else tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, where)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """YAML file (optional) + dotted overrides -> validated RunConfig."""
    tree = read_yaml(path) if path else {}
    apply_overrides(tree, overrides)
    return build_config(tree, str(path) if path else "config")


def config_to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# Keys that do not change what is learned: excluded from the hash that identifies a configuration.
# Where and on how much of a GPU a run is placed is not part of it either (and keeps older hashes).
_HASH_EXCLUDED = ("name", "tracking", "data.data_dir", "scaling.in_process", "scaling.gpus_per_worker",
                  "train.generated_metrics")
# Keys added after the first release, with the value that means what a config without them meant then: a
# key at that value is left out of the hash, so a run, checkpoint or bundle from before keeps its hash once
# `upgrade_stored_tree` has read it. Any other value (today's defaults included) is hashed.
_HASH_LEGACY = {"prompt.normalization": "gate_softmax", "prompt.temperature.schedule": "step",
                "prompt.router_bias": 0.0, "prompt.include_own_source": True, "prompt.placement": "auto",
                "optim.source_lr": None, "data.train_pool": "all", "data.assess_rows": 0,
                "backbone.template": "plain"}
# Values renamed since: hashed under the name they had, so the old meaning keeps its old hash and the new
# meaning of the old name gets a new one (`attention` was the gated router; it is ATTEMPT's now).
_HASH_RENAMED = {"prompt.router": {"attention_gated": "attention", "attention": "attention_attempt"},
                 # before `random` existed, no bank meant a random one: the explicit value hashes as that did
                 "prompt.source_bank": {RANDOM_BANK: None}}


def upgrade_stored_tree(tree: dict | None) -> dict:
    """A config tree written by an earlier crosspt (a promoted bundle's or a run's `config.yaml`) in today's
    schema, meaning what it meant then. Before `prompt.normalization` existed the router trained on a softmax
    of its gates and evaluated every candidate (`gate_softmax`), `router: attention` was the gated variant
    (`attention_gated`) and the temperature decayed per step (`schedule: step`). Without this an old bundle
    would load with today's defaults: other evaluation weights (top-k now applies), or a router whose
    parameters do not fit. Only for stored trees: a new config without the key means today's default.
    Before `data.train_pool` a run's validation sample came from the whole train split (`all`). Before
    `backbone.template` a decoder read the plain format (`plain`)."""
    tree = dict(tree or {})
    backbone = tree.get("backbone")
    if isinstance(backbone, dict) and "template" not in backbone:
        tree["backbone"] = dict(backbone, template="plain")
    data = tree.get("data")
    if isinstance(data, dict) and "train_pool" not in data:
        tree["data"] = dict(data, train_pool="all")
    prompt = tree.get("prompt")
    if not isinstance(prompt, dict) or "normalization" in prompt:
        return tree
    prompt = dict(prompt, normalization="gate_softmax")
    if prompt.get("router") == "attention":
        prompt["router"] = "attention_gated"
    temp = prompt.get("temperature")
    if isinstance(temp, dict) and "schedule" not in temp:
        prompt["temperature"] = dict(temp, schedule="step")
    tree["prompt"] = prompt
    return tree


def config_hash(cfg: RunConfig) -> str:
    """Short stable hash of everything that determines the result (not where data/logs live)."""
    flat = flatten(config_to_dict(cfg))
    flat = {k: _HASH_RENAMED.get(k, {}).get(v, v) for k, v in flat.items()
            if not any(k == e or k.startswith(e + ".") for e in _HASH_EXCLUDED)
            and not (k in _HASH_LEGACY and v == _HASH_LEGACY[k])}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> flat {"a.b": scalar}; lists become comma-joined strings (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(str(x) for x in v)
        else:
            out[key] = v
    return out

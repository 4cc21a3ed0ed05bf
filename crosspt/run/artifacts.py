"""Prompt artifacts: safetensors files plus a metadata block, never pickle.

A prompt artifact holds every learned tensor of a run (bank, private prompts, router, heads) and,
for each task, its collapsed evaluation prompt — enough to rebuild every task's prompt without the
search. Loading checks the metadata against what the caller expects and refuses a mismatch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from crosspt.errors import ArtifactError

FORMAT = "crosspt-prompts/1"
BANK_FORMAT = "crosspt-bank/1"


def _meta_to_str(meta: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _meta_from_str(meta: dict[str, str]) -> dict[str, Any]:
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata=_meta_to_str(meta))
    return path


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _meta_from_str(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None
    return tensors, meta


def same_backbone(a: Any, b: Any) -> bool:
    """Backbone names as written in a config: equal, the same local folder, or a hub id and a local
    folder of the same name (`google/t5-base-lm-adapt` vs `/models/t5-base-lm-adapt`)."""
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.is_dir() and pb.is_dir():
        return pa.resolve() == pb.resolve()
    return (pa.is_dir() or pb.is_dir()) and pa.name == pb.name


def check_meta(meta: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    """Refuse an artifact whose metadata disagrees with the config that loads it."""
    for key, want in expected.items():
        if want is None:
            continue
        have = meta.get(key)
        if have != want and not (key == "backbone" and same_backbone(have, want)):
            raise ArtifactError(f"{path}: {key} is {have!r} in the artifact but {want!r} in the config")


# ---- source-prompt banks ------------------------------------------------------------------------
def save_bank(path: str | Path, prompts: torch.Tensor, *, backbone: str, tasks: list[str],
              metrics: dict | None = None, extra: dict | None = None) -> Path:
    """A bank of source prompts `[n_sources, L, d]`, one per source task (in `tasks` order)."""
    if prompts.dim() != 3 or prompts.shape[0] != len(tasks):
        raise ArtifactError(f"bank tensor {tuple(prompts.shape)} does not match {len(tasks)} source tasks")
    meta = {"format": BANK_FORMAT, "backbone": backbone, "tasks": list(tasks), "n_sources": prompts.shape[0],
            "source_len": prompts.shape[1], "dim": prompts.shape[2], "metrics": metrics or {}, **(extra or {})}
    return save_tensors(path, {"bank": prompts}, meta)


def load_bank(path: str | Path, *, backbone: str | None = None, dim: int | None = None,
              source_len: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    tensors, meta = load_tensors(path)
    if meta.get("format") != BANK_FORMAT or "bank" not in tensors:
        raise ArtifactError(f"{path} is not a crosspt source-prompt bank (format {meta.get('format')!r})")
    check_meta(meta, {"backbone": backbone, "dim": dim, "source_len": source_len}, path)
    return tensors["bank"], meta


def select_sources(bank: torch.Tensor, meta: dict, n: int, *, rule: str = "order",
                   target_tasks: list[str] | None = None, exclude: list[str] | None = None,
                   similarity: dict[str, dict[str, float]] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Choose `n` source prompts from a bank.

    order: the bank's order; similar: highest mean cosine between a source prompt and the other
    sources of the targets' own tasks when present (or `similarity[target][source]` when given).
    `exclude` removes sources (e.g. the target task itself, for leave-one-out benchmarks)."""
    names = list(meta["tasks"])
    keep = [i for i, t in enumerate(names) if t not in set(exclude or [])]
    if n > len(keep):
        raise ArtifactError(f"asked for {n} source prompts but the bank has {len(keep)} usable "
                            f"({', '.join(names[i] for i in keep)})")
    if rule == "order":
        chosen = keep[:n]
    elif rule == "similar":
        targets = target_tasks or []
        if similarity:
            score = {i: sum(similarity.get(t, {}).get(names[i], 0.0) for t in targets) for i in keep}
        else:
            flat = torch.nn.functional.normalize(bank.flatten(1).float(), dim=-1)
            anchors = [names.index(t) for t in targets if t in names]
            ref = flat[anchors].mean(0) if anchors else flat.mean(0)
            score = {i: float(flat[i] @ ref) for i in keep}
        chosen = sorted(keep, key=lambda i: -score[i])[:n]
    else:
        raise ArtifactError(f"unknown source selection rule '{rule}' (order or similar)")
    return bank[chosen].clone(), [names[i] for i in chosen]


# ---- a run's prompts ----------------------------------------------------------------------------
def save_prompt_artifact(path: str | Path, model, *, config_hash: str, backbone: str,
                         extra: dict | None = None) -> Path:
    """Every learned tensor of a run plus each task's collapsed evaluation prompt."""
    tensors = dict(model.trainable_state())
    tasks = [t.name for t in model.tasks]
    collapsible = not model.prompt.needs_input()
    if collapsible:
        for i, name in enumerate(tasks):
            tensors[f"composed.{name}"] = model.prompt.collapsed(i)[0]
    tensors["router_weights"] = model.prompt.task_weights()
    spec = model.prompt.spec
    meta = {"format": FORMAT, "backbone": backbone, "tasks": tasks, "dim": spec.dim, "config_hash": config_hash,
            "n_sources": spec.n_sources, "source_len": spec.source_len, "private_len": spec.private_len,
            "composition": spec.composition, "router": spec.router, "collapsible": collapsible,
            # how many of the chat head's last tokens the prompts were trained in place of (`CrossPTModel`)
            "replaces_head": model.replaces_head,
            **(extra or {})}
    return save_tensors(path, tensors, meta)


def load_prompt_artifact(path: str | Path, *, backbone: str | None = None, dim: int | None = None,
                         config_hash: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a crosspt prompt artifact (format {meta.get('format')!r})")
    check_meta(meta, {"backbone": backbone, "dim": dim, "config_hash": config_hash}, path)
    return tensors, meta

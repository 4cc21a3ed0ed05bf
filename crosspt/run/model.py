"""A CrossPT model = composed soft prompt (crosspt.prompts) + frozen backbone (crosspt.backbones).

`forward(batch)` returns the training loss so DDP can wrap the whole thing; `predict(batch)` returns
per-example predictions. Built from the one config schema by `build_model`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from crosspt.backbones.base import PROMPT_REPLACES_HEAD, PROMPT_SHARED_BY_TASK, Backbone
from crosspt.config.schema import RunConfig
from crosspt.method.prompts import CrossPTPrompt, PromptSpec
from crosspt.tasks.specs import TaskSpec, instruction_text


class CrossPTModel(nn.Module):
    def __init__(self, prompt: CrossPTPrompt, backbone: Backbone, replaces_head: int = 0):
        """`replaces_head`: how many last tokens of the text the backbone writes before the prompt (the
        decoder's chat head) the prompt takes the place of (`PROMPT_REPLACES_HEAD`; `build_model` decides)."""
        super().__init__()
        self.prompt = prompt
        self.backbone = backbone
        self.replaces_head = int(replaces_head)
        # decided once: a composition that can never mask a prompt token hands the backbone no mask, and
        # the backbone has nothing to compact (asking each batch's mask would be a host sync per step)
        self.full_mask = composes_full_mask(prompt)

    @property
    def tasks(self) -> list[TaskSpec]:
        return self.backbone.tasks

    def compose(self, batch: dict):
        """(prompt `[B, L, d]`, mask `[B, L]`, router weights `[B, n_cand]`) for a batch."""
        ids = batch["task_ids"]
        if self.prompt.needs_input():
            embeds, mask = self.backbone.input_embeds(batch)
            return self.prompt(ids, embeds, mask)
        return self.prompt(ids)

    def backbone_batch(self, batch: dict) -> dict:
        """`batch` with what the backbone must know of this model's prompt besides its values: how many of the
        head's last tokens it takes the place of (`PROMPT_REPLACES_HEAD`)."""
        return {**batch, PROMPT_REPLACES_HEAD: self.replaces_head}

    def forward(self, batch: dict) -> torch.Tensor:
        prompt, mask, _ = self.compose(batch)
        # the backbone may run a task's prompt once for all its rows when they share it (the decoder's prompt
        # pass): said from the host, so that finding equal rows needs no read of the device
        batch = {**self.backbone_batch(batch), PROMPT_SHARED_BY_TASK: self.prompt.shared_by_task()}
        return self.backbone.loss(prompt, None if self.full_mask else mask, batch)

    @torch.no_grad()
    def predict(self, batch: dict, generate: bool = False) -> torch.Tensor:
        """Predictions `[B]`: ranked over the label words, or (`generate`, families that generate) decoded."""
        prompt, mask, _ = self.compose(batch)
        mask = None if self.full_mask else mask
        batch = self.backbone_batch(batch)
        if generate:
            return self.backbone.predict(prompt, mask, batch, generate=True)
        return self.backbone.predict(prompt, mask, batch)

    @torch.no_grad()
    def predict_ranked_and_generated(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(ranked `[B]`, generated `[B]`) predictions of a generating backbone, sharing what the two can share."""
        prompt, mask, _ = self.compose(batch)
        return self.backbone.predict_ranked_and_generated(prompt, mask, self.backbone_batch(batch))

    @property
    def generates(self) -> bool:
        """Whether the backbone can also decode its answer (seq2seq, decoder), not only rank the labels."""
        from crosspt.backbones.base import RankBackbone

        return isinstance(self.backbone, RankBackbone)

    def param_groups(self, prompt_lr: float, router_lr: float, head_lr: float | None = None,
                     weight_decay: float = 0.0, source_lr: float | None = None) -> list[dict]:
        """Optimizer groups by module: prompts, learned sources (with `source_lr`), router, and the
        backbone-side heads (if any)."""
        # the benchmark's prompt modules (crosspt.bench.harness) have no sources and take no source_lr
        extra = {} if source_lr is None else {"source_lr": source_lr}
        groups = self.prompt.param_groups(prompt_lr, router_lr, weight_decay, **extra)
        heads = [p for p in self.backbone.parameters() if p.requires_grad]
        if heads:
            groups.append({"params": heads, "lr": head_lr or prompt_lr, "weight_decay": 0.0, "name": "heads"})
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything that is learned (prompts, router, heads) — what a checkpoint must hold."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        keep |= {n for n, _ in self.prompt.named_buffers(prefix="prompt")}
        state = self.state_dict()
        # the source bank is part of the prompt state even when frozen (needed to rebuild the prompt)
        return {k: v.detach().cpu().clone() for k, v in state.items()
                if k in keep or k.startswith("prompt.")}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.trainable_state()) - set(state)
        if missing:
            raise KeyError(f"checkpoint lacks {sorted(missing)[:5]}")
        self.load_state_dict(state, strict=False)


def composes_full_mask(prompt: nn.Module) -> bool:
    """Whether every composed prompt of `prompt` keeps all its tokens: one candidate (a task's private
    prompt, weight exactly 1, nothing to pad or drop). Several candidates can drop one (top-k, a weight that
    underflows to 0) or pad a shorter one, and prompt modules without a `spec` are not known: False."""
    spec = getattr(prompt, "spec", None)
    return spec is not None and spec.n_sources == 0 and spec.private_len > 0


def prompt_spec(cfg: RunConfig, n_tasks: int, dim: int, init: str | None = None) -> PromptSpec:
    p = cfg.prompt
    return PromptSpec(n_tasks=n_tasks, dim=dim, n_sources=p.n_sources, source_len=p.source_len,
                      private_len=p.private_len, composition=p.composition, top_k=p.top_k, router=p.router,
                      temp_start=p.temperature.start, temp_floor=p.temperature.floor,
                      temp_rate=p.temperature.rate, temp_schedule=p.temperature.schedule,
                      normalization=p.normalization, router_bias=p.router_bias,
                      learn_sources=p.learn_sources, init=init or p.init)


def resolve_init(cfg: RunConfig, backbone: Backbone) -> str:
    """`prompt.init`, with "auto" replaced by the backbone family's choice (`Backbone.default_init`)."""
    return backbone.default_init if cfg.prompt.init == "auto" else cfg.prompt.init


def build_model(cfg: RunConfig, tasks: Sequence[TaskSpec], *, bank: torch.Tensor | None = None,
                backbone: Backbone | None = None, own_sources: torch.Tensor | None = None) -> CrossPTModel:
    """Backbone (loaded unless given) + a freshly initialised prompt module, seeded by cfg.seed.

    `own_sources` `[n_tasks, L_s, d]`: each task's own source prompt (`prompt.init: own_source`)."""
    from crosspt.backbones.loader import load_for_config

    if backbone is None:
        backbone = load_for_config(cfg, tasks)
    emb = backbone.word_embeddings().weight.detach()
    init = resolve_init(cfg, backbone)
    text_ids, replaces = None, 0
    if init == "text" and cfg.prompt.init_text is not None:
        text_ids = backbone.tokenizer(cfg.prompt.init_text, add_special_tokens=False)["input_ids"]
    elif init == "text":         # each task's prompt starts as its own instruction (Lester et al.'s text init)
        # where the backbone writes the instruction before the prompt (the decoder's chat head), the prompt takes
        # the place of the head's last tokens instead of repeating them: untrained, it reads as zero-shot
        text_ids = backbone.head_tail_ids(cfg.prompt.private_len)
        if text_ids is not None:
            replaces = cfg.prompt.private_len
        else:
            text_ids = [backbone.tokenizer(instruction_text(t, cfg.prompt.label_semantics),
                                           add_special_tokens=False)["input_ids"] for t in tasks]
    elif init == "neutral":
        text_ids = backbone.neutral_init_ids()
    if init == "own_source" and own_sources is None:
        # rebuilt only to load a trained state (the pyfunc bundle): the initial values are overwritten
        own_sources = torch.zeros(len(tasks), cfg.prompt.source_len, backbone.embed_dim)
    torch.manual_seed(cfg.seed)
    prompt = CrossPTPrompt(prompt_spec(cfg, len(tasks), backbone.embed_dim, init=init), bank=bank,
                           word_embeddings=emb, init_text_ids=text_ids, seed=cfg.seed,
                           init_vocab_ids=backbone.init_vocab_ids() if init == "vocab" else None,
                           own_sources=own_sources)
    return CrossPTModel(prompt, backbone, replaces_head=replaces)

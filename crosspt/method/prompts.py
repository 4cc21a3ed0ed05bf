"""Parameters of the CrossPT method: source-prompt bank, private prompts, routers.

Per-task parameters live in ONE tensor indexed by task id (private prompts `[n_tasks, L_p, d]`,
router logits `[n_tasks, n_cand]`), so every batch touches the same parameters and DDP needs no
`find_unused_parameters`. The maths is in `crosspt.method.composition`; these modules only own state.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from crosspt.method import composition as C


class PromptInit(str, Enum):
    """How a private prompt starts (config `prompt.init`); see `init_prompt`."""
    AUTO = "auto"          # the backbone family's choice (`Backbone.default_init`), resolved before init_prompt
    RANDOM = "random"
    VOCAB = "vocab"
    NEUTRAL = "neutral"
    TEXT = "text"
    SOURCE = "source"


class RouterKind(str, Enum):
    """Which router scores the candidates (config `prompt.router`)."""
    TASK = "task"              # `TaskRouter`: one logit vector per task
    ATTENTION = "attention"    # `AttentionRouter`: conditioned on the input (ATTEMPT)


_ATTENTION_HIDDEN = 64     # bottleneck width of the attention router


@dataclass(frozen=True)
class PromptSpec:
    """Everything the prompt module needs to be rebuilt (also stored beside saved prompts)."""
    n_tasks: int
    dim: int
    n_sources: int = 0
    source_len: int = 16
    private_len: int = 16
    composition: str = C.Composition.CAT.value     # a `Composition` value
    top_k: int | None = None
    router: str = RouterKind.TASK.value             # a `RouterKind` value
    temp_start: float = 5.0
    temp_floor: float = 0.1
    temp_rate: float = 1e-3
    learn_sources: bool = False
    init: str = PromptInit.RANDOM.value             # a `PromptInit` value other than "auto"

    @property
    def n_candidates(self) -> int:
        return self.n_sources + (1 if self.private_len > 0 else 0)

    @property
    def composed_len(self) -> int:
        return C.composed_length(self.composition, self.n_sources, self.source_len, self.private_len)


def init_prompt(shape: tuple[int, ...], how: str, *, word_embeddings: torch.Tensor | None = None,
                text_ids: list[int] | None = None, source: torch.Tensor | None = None,
                generator: torch.Generator | None = None, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Initial values for a prompt tensor `[..., L, d]`.

    random: normal with the vocabulary's embedding std (keeps the prompt on the scale the frozen model
    expects); vocab: rows sampled from `vocab_ids` (the backbone's 5000 first ordinary word tokens,
    `Backbone.init_vocab_ids`), else the 5000 first rows (Lester et al.); text: the
    embedding of a text, tiled to length; neutral: the same with the backbone's neutral token ids
    (`Backbone.neutral_init_ids`); source: a copy of a (source) prompt, tiled/truncated."""
    length, dim = shape[-2], shape[-1]
    n = 1
    for s in shape[:-2]:
        n *= s
    if how == PromptInit.RANDOM:
        std = float(word_embeddings.float().std()) if word_embeddings is not None else 0.5
        return torch.randn(shape, generator=generator) * std
    if how == PromptInit.VOCAB:
        if word_embeddings is None:
            raise ValueError("init 'vocab' needs the backbone's word embeddings")
        pool = vocab_ids if vocab_ids is not None and len(vocab_ids) else \
            torch.arange(min(5000, word_embeddings.shape[0]))
        idx = pool[torch.randint(0, len(pool), (n * length,), generator=generator)]
        return word_embeddings[idx].detach().float().reshape(shape).clone()
    if how in (PromptInit.TEXT, PromptInit.NEUTRAL):
        if word_embeddings is None or not text_ids:
            raise ValueError(f"init '{how}' needs token ids (init_text) and the backbone's word embeddings")
        ids = torch.tensor(text_ids)
        rows = word_embeddings[ids.repeat(length // len(ids) + 1)[:length]].detach().float()
        return rows.expand(*shape[:-2], length, dim).clone()
    if how == PromptInit.SOURCE:
        if source is None or source.numel() == 0:
            raise ValueError("init 'source' needs a non-empty source-prompt bank")
        src = source.detach().float()
        rows = src.repeat(length // src.shape[0] + 1, 1)[:length]
        return rows.expand(*shape[:-2], length, dim).clone()
    choices = ", ".join(i.value for i in PromptInit if i is not PromptInit.AUTO)
    raise ValueError(f"unknown prompt init '{how}' (choose from {choices})")


class SourceBank(nn.Module):
    """The bank of source prompts `[n_sources, L_s, d]`, frozen or fine-tuned."""

    def __init__(self, prompts: torch.Tensor, learn: bool):
        super().__init__()
        self.prompts = nn.Parameter(prompts.float(), requires_grad=learn)


class PrivatePrompts(nn.Module):
    """Each task's own prompt, all tasks in one tensor `[n_tasks, L_p, d]` (L_p may be 0)."""

    def __init__(self, prompts: torch.Tensor):
        super().__init__()
        self.prompts = nn.Parameter(prompts.float())


class TaskRouter(nn.Module):
    """Per-task logits over the candidates `[n_tasks, n_cand]` (sources first, private last)."""

    def __init__(self, n_tasks: int, n_cand: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_tasks, n_cand))   # uniform weights at step 0

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Logits `[B, n_cand]` of the tasks `task_ids` `[B]`."""
        return self.logits[task_ids]


class AttentionRouter(nn.Module):
    """ATTEMPT-style input-conditioned router: masked-mean pooled input -> bottleneck -> attention.

    Scores each candidate by the dot product of the projected input with the candidate's max-pooled
    prompt; a per-task bias (one tensor) keeps the task identity in the decision."""

    def __init__(self, n_tasks: int, n_cand: int, dim: int, hidden: int = _ATTENTION_HIDDEN):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.task_bias = nn.Parameter(torch.zeros(n_tasks, n_cand))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, task_ids: torch.Tensor, cand_keys: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Logits `[B, n_cand]` from task ids `[B]`, candidate keys `[B, n_cand, d]` and the pooled input
        `[B, d]`."""
        h = self.norm(pooled + self.up(torch.relu(self.down(pooled))))       # [B, d]
        keys = self.norm(cand_keys)                                          # [B, n_cand, d]
        scores = torch.einsum("bd,bnd->bn", h, keys) / keys.shape[-1] ** 0.5
        return scores + self.task_bias[task_ids]


def masked_mean(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `embeds` `[B, T, d]` over the positions `mask` `[B, T]` keeps: `[B, d]`."""
    m = mask.unsqueeze(-1).to(embeds.dtype)
    return (embeds * m).sum(1) / m.sum(1).clamp_min(1.0)


class CrossPTPrompt(nn.Module):
    """Source bank + private prompts + router -> one composed soft prompt per example.

    With `n_sources == 0` this is vanilla prompt tuning (one private prompt per task, weight 1)."""

    def __init__(self, spec: PromptSpec, *, bank: torch.Tensor | None = None,
                 word_embeddings: torch.Tensor | None = None, init_text_ids: list[int] | None = None,
                 init_vocab_ids: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        if spec.n_candidates == 0:
            raise ValueError("a prompt needs at least one candidate: n_sources > 0 or private_len > 0")
        if spec.composition not in C.COMPOSERS:
            raise ValueError(f"unknown composition '{spec.composition}' "
                             f"({' or '.join(c.value for c in C.Composition)})")
        if spec.top_k is not None and not 1 <= spec.top_k <= spec.n_candidates:
            raise ValueError(f"top_k={spec.top_k} must be between 1 and the number of candidates "
                             f"({spec.n_candidates})")
        self.spec = spec
        gen = torch.Generator().manual_seed(seed)
        if bank is None:
            bank = init_prompt((spec.n_sources, spec.source_len, spec.dim), "random",
                               word_embeddings=word_embeddings, generator=gen)
        if tuple(bank.shape) != (spec.n_sources, spec.source_len, spec.dim):
            raise ValueError(f"source bank has shape {tuple(bank.shape)}, config expects "
                             f"({spec.n_sources}, {spec.source_len}, {spec.dim})")
        self.bank = SourceBank(bank, learn=spec.learn_sources and spec.n_sources > 0)
        source_for_init = bank.mean(0) if spec.n_sources else None
        private = init_prompt((spec.n_tasks, spec.private_len, spec.dim), spec.init,
                              word_embeddings=word_embeddings, text_ids=init_text_ids,
                              source=source_for_init, generator=gen, vocab_ids=init_vocab_ids) \
            if spec.private_len else \
            torch.zeros(spec.n_tasks, 0, spec.dim)
        self.private = PrivatePrompts(private)
        if not spec.private_len:
            self.private.prompts.requires_grad_(False)
        if spec.router == RouterKind.TASK:
            self.router = TaskRouter(spec.n_tasks, spec.n_candidates)
        elif spec.router == RouterKind.ATTENTION:
            self.router = AttentionRouter(spec.n_tasks, spec.n_candidates, spec.dim)
        else:
            raise ValueError(f"unknown router '{spec.router}' ({' or '.join(r.value for r in RouterKind)})")
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        s = self.spec
        return C.annealed_temperature(int(self.step), s.temp_start, s.temp_floor, s.temp_rate)

    def set_step(self, step: int) -> None:
        self.step.fill_(step)

    def candidate_keys(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Max-pooled candidate prompts per example `[B, n_cand, d]` (attention router keys)."""
        keys = []
        if self.spec.n_sources:
            keys.append(self.bank.prompts.max(dim=1).values.unsqueeze(0).expand(len(task_ids), -1, -1))
        if self.spec.private_len:
            keys.append(self.private.prompts[task_ids].max(dim=1).values.unsqueeze(1))
        return torch.cat(keys, dim=1)

    def route(self, task_ids: torch.Tensor, input_embeds: torch.Tensor | None = None,
              input_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Router logits per example `[B, n_cand]` for task ids `[B]`; the attention router also reads the
        input embeddings `[B, T, d]` and their mask `[B, T]`."""
        if isinstance(self.router, AttentionRouter):
            if input_embeds is None:
                raise ValueError("the attention router needs the input embeddings")
            pooled = masked_mean(input_embeds.float(), input_mask)
            return self.router(task_ids, self.candidate_keys(task_ids), pooled)
        return self.router(task_ids)

    def forward(self, task_ids: torch.Tensor, input_embeds: torch.Tensor | None = None,
                input_mask: torch.Tensor | None = None):
        """-> (prompt `[B, L, d]`, mask `[B, L]`, weights `[B, n_cand]`)."""
        logits = self.route(task_ids, input_embeds, input_mask)
        return C.compose(self.bank.prompts, self.private.prompts, None, task_ids,
                         composition=self.spec.composition, temperature=self.temperature,
                         top_k=self.spec.top_k, training=self.training, example_logits=logits)

    # ------------------------------------------------------------------------------------------
    def needs_input(self) -> bool:
        return isinstance(self.router, AttentionRouter)

    def task_weights(self) -> torch.Tensor:
        """Deterministic (evaluation) weights `[n_tasks, n_cand]` of the task router (for heatmaps)."""
        if isinstance(self.router, TaskRouter):
            return C.eval_weights(self.router.logits.detach())
        return C.eval_weights(self.router.task_bias.detach())

    @torch.no_grad()
    def collapsed(self, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's evaluation prompt as one tensor `[L, d]` and mask `[L]` (task router only:
        at evaluation its weights are a constant per task, so the composition collapses)."""
        if self.needs_input():
            raise ValueError("an input-conditioned (attention) router does not collapse to one prompt")
        ids = torch.tensor([task_id])
        was = self.training
        self.eval()
        prompt, mask, _ = self(ids)
        self.train(was)
        keep = mask[0].bool()
        return prompt[0][keep].clone(), mask[0][keep].clone()

    def param_groups(self, prompt_lr: float, router_lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups chosen by module: prompts (bank if learned, private) vs router."""
        prompts = [p for m in (self.bank, self.private) for p in m.parameters() if p.requires_grad and p.numel()]
        router = [p for p in self.router.parameters() if p.requires_grad]
        groups = []
        if prompts:
            groups.append({"params": prompts, "lr": prompt_lr, "weight_decay": weight_decay, "name": "prompts"})
        if router:
            groups.append({"params": router, "lr": router_lr, "weight_decay": 0.0, "name": "router"})
        return groups

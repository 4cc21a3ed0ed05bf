"""Parameters of the CrossPT method: source-prompt bank, private prompts, routers.

Per-task parameters live in ONE tensor indexed by task id (private prompts `[n_tasks, L_p, d]`,
router logits `[n_tasks, n_cand]`), so every batch touches the same parameters and DDP needs no
`find_unused_parameters`. The maths is in `crosspt.method.composition`; these modules only own state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from crosspt.method import composition as C


class PromptInit(str, Enum):
    """How a private prompt starts (config `prompt.init`); see `init_prompt`."""
    AUTO = "auto"          # the backbone family's choice (`Backbone.default_init`), resolved before init_prompt
    RANDOM = "random"
    VOCAB = "vocab"
    NEUTRAL = "neutral"
    TEXT = "text"              # prompt.init_text, else each task's instruction (`instruction_init`; under a
    #                            decoder's chat template, the instruction's last tokens, which the prompt replaces)
    SOURCE = "source"          # the mean of the selected source prompts
    OWN_SOURCE = "own_source"  # each task's own pre-trained source prompt (from the bank, by task name)


class RouterKind(str, Enum):
    """Which router scores the candidates (config `prompt.router`)."""
    TASK = "task"                          # `TaskRouter`: one logit vector per task
    ATTENTION = "attention"                # `AttemptRouter`: ATTEMPT (Asai et al. 2022) as published
    ATTENTION_GATED = "attention_gated"    # `GatedAttentionRouter`: input-conditioned logits through
    #                                        the CrossPT normalisation (gates, top-k); `attention` before


_GATED_HIDDEN = 64         # bottleneck width of the gated attention router
_ATTEMPT_HIDDEN = 100      # ATTEMPT's sub-network width (modeling_t5.py line 933)


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
    temp_rate: float = 1e-3                         # read by the `step` schedule only
    temp_schedule: str = C.Schedule.EXP.value       # a `Schedule` value
    normalization: str = C.Normalization.DIRICHLET.value    # a `Normalization` value
    router_bias: float = 0.0                        # initial logit of the private prompt (others 0)
    learn_sources: bool = False
    init: str = PromptInit.RANDOM.value             # a `PromptInit` value other than "auto"

    @property
    def n_candidates(self) -> int:
        return self.n_sources + (1 if self.private_len > 0 else 0)

    @property
    def composed_len(self) -> int:
        return C.composed_length(self.composition, self.n_sources, self.source_len, self.private_len)


def _tiled(word_embeddings: torch.Tensor, ids: list[int], length: int) -> torch.Tensor:
    """Embeddings `[length, d]` of the token ids `ids`, repeated and truncated to `length` rows."""
    t = torch.tensor(ids, dtype=torch.long)
    return word_embeddings[t.repeat(length // len(t) + 1)[:length]].detach().float()


def instruction_init(shape: tuple[int, int, int], word_embeddings: torch.Tensor,
                     task_ids: list[list[int]]) -> torch.Tensor:
    """Lester et al.'s text init with a text per task: task i's prompt `[L, d]` starts as the embeddings of
    its own token ids `task_ids[i]` (its instruction), repeated or truncated to L -> `[n_tasks, L, d]`."""
    n, length, _ = shape
    if len(task_ids) != n or not all(task_ids):
        raise ValueError(f"init 'text' needs non-empty token ids for each of the {n} tasks")
    return torch.stack([_tiled(word_embeddings, ids, length) for ids in task_ids]).reshape(shape).clone()


def init_prompt(shape: tuple[int, ...], how: str, *, word_embeddings: torch.Tensor | None = None,
                text_ids: list[int] | list[list[int]] | None = None, source: torch.Tensor | None = None,
                generator: torch.Generator | None = None, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Initial values for a prompt tensor `[..., L, d]`.

    random: normal with the vocabulary's embedding std (keeps the prompt on the scale the frozen model
    expects); vocab: rows sampled from `vocab_ids` (the backbone's 5000 first ordinary word tokens,
    `Backbone.init_vocab_ids`), else the 5000 first rows (Lester et al.); text: the
    embedding of a text, tiled to length (`text_ids` a list per task: `instruction_init`); neutral: the same with the backbone's neutral token ids
    (`Backbone.neutral_init_ids`); source: a copy of a (source) prompt `[L_s, d]`, tiled/truncated;
    own_source: per task, a copy of that task's own source prompt (`source` `[n_tasks, L_s, d]`)."""
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
        if isinstance(text_ids[0], (list, tuple)):
            return instruction_init(shape, word_embeddings, [list(i) for i in text_ids])
        return _tiled(word_embeddings, list(text_ids), length).expand(*shape[:-2], length, dim).clone()
    if how == PromptInit.SOURCE:
        if source is None or source.numel() == 0:
            raise ValueError("init 'source' needs a non-empty source-prompt bank")
        src = source.detach().float()
        rows = src.repeat(length // src.shape[0] + 1, 1)[:length]
        return rows.expand(*shape[:-2], length, dim).clone()
    if how == PromptInit.OWN_SOURCE:
        if source is None or source.dim() != 3 or source.shape[0] != n:
            raise ValueError(f"init 'own_source' needs one source prompt per task ({n}), "
                             f"got {None if source is None else tuple(source.shape)}")
        src = source.detach().float()
        return src.repeat(1, length // src.shape[1] + 1, 1)[:, :length].reshape(shape).clone()
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


def initial_logits(n_tasks: int, n_cand: int, private_bias: float, has_private: bool) -> torch.Tensor:
    """Router logits at step 0 `[n_tasks, n_cand]`: 0 for every source, `private_bias` for the private
    prompt (the last candidate): a positive bias starts each task leaning on its own prompt."""
    logits = torch.zeros(n_tasks, n_cand)
    if has_private:
        logits[:, -1] = private_bias
    return logits


class TaskRouter(nn.Module):
    """Per-task logits over the candidates `[n_tasks, n_cand]` (sources first, private last)."""

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(initial.clone())        # `initial_logits`: uniform unless biased

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Logits `[B, n_cand]` of the tasks `task_ids` `[B]`."""
        return self.logits[task_ids]


class GatedAttentionRouter(nn.Module):
    """Input-conditioned logits for the CrossPT normalisation (`attention_gated`; before ATTEMPT was
    reproduced as published this was the `attention` router): masked-mean pooled input -> ReLU
    bottleneck + residual -> LayerNorm, dot product with the LayerNormed max-pooled candidates over
    sqrt(d), plus a per-task bias (one tensor) that keeps the task identity in the decision. The logits
    then go through the same gates and top-k as the task router's."""

    def __init__(self, initial: torch.Tensor, dim: int, hidden: int = _GATED_HIDDEN):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.task_bias = nn.Parameter(initial.clone())     # `initial_logits` `[n_tasks, n_cand]`
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, task_ids: torch.Tensor, cand_keys: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Logits `[B, n_cand]` from task ids `[B]`, candidate keys `[B, n_cand, d]` and the pooled input
        `[B, d]`."""
        h = self.norm(pooled + self.up(torch.relu(self.down(pooled))))       # [B, d]
        keys = self.norm(cand_keys)                                          # [B, n_cand, d]
        scores = torch.einsum("bd,bnd->bn", h, keys) / keys.shape[-1] ** 0.5
        return scores + self.task_bias[task_ids]


class AttemptRouter(nn.Module):
    """ATTEMPT's attention (Asai et al. 2022; AkariAsai/ATTEMPT@b5121e5,
    attempt/third_party/models/t5/modeling_t5.py): the input max-pooled over its tokens (line 1072),
    each candidate max-pooled over its length (line 1086), a SiLU sub-network without biases, hidden 100
    (lines 933-936), LayerNorm (line 1111), dot product over the temperature d * e (lines 919-920, the
    value of its learned temperature at initialisation; lines 1113-1114). `crosspt.method.composition.
    attempt_weights` takes the plain softmax and adds the target prompt. No per-task logits: the task
    enters through its own prompt, a candidate like the sources. One deviation: padding positions are
    left out of the input max-pool (ATTEMPT pools them too)."""

    def __init__(self, dim: int, hidden: int = _ATTEMPT_HIDDEN):
        super().__init__()
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.temperature = dim * math.e

    def forward(self, cand_keys: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Attention scores `[B, n_cand]` from candidate keys `[B, n_cand, d]` (max-pooled prompts) and
        the max-pooled input `[B, d]`."""
        h = self.norm(self.up(F.silu(self.down(pooled))))                    # [B, d]
        return torch.einsum("bd,bnd->bn", h, cand_keys) / self.temperature


def masked_max(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of `embeds` `[B, T, d]` over the positions `mask` `[B, T]` keeps: `[B, d]`."""
    keep = mask.bool().unsqueeze(-1)
    return embeds.masked_fill(~keep, torch.finfo(embeds.dtype).min).max(dim=1).values


def masked_mean(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `embeds` `[B, T, d]` over the positions `mask` `[B, T]` keeps: `[B, d]`."""
    m = mask.unsqueeze(-1).to(embeds.dtype)
    return (embeds * m).sum(1) / m.sum(1).clamp_min(1.0)


class CrossPTPrompt(nn.Module):
    """Source bank + private prompts + router -> one composed soft prompt per example.

    With `n_sources == 0` this is vanilla prompt tuning (one private prompt per task, weight 1).
    `own_sources` `[n_tasks, L_s, d]`: each task's own pre-trained source prompt, read by
    `init == "own_source"` only."""

    def __init__(self, spec: PromptSpec, *, bank: torch.Tensor | None = None,
                 word_embeddings: torch.Tensor | None = None, init_text_ids: list[int] | list[list[int]] | None = None,
                 init_vocab_ids: torch.Tensor | None = None, seed: int = 0,
                 own_sources: torch.Tensor | None = None):
        super().__init__()
        check_spec(spec)
        self.spec = spec
        gen = torch.Generator().manual_seed(seed)
        if bank is None:
            bank = init_prompt((spec.n_sources, spec.source_len, spec.dim), "random",
                               word_embeddings=word_embeddings, generator=gen)
        if tuple(bank.shape) != (spec.n_sources, spec.source_len, spec.dim):
            raise ValueError(f"source bank has shape {tuple(bank.shape)}, config expects "
                             f"({spec.n_sources}, {spec.source_len}, {spec.dim})")
        self.bank = SourceBank(bank, learn=spec.learn_sources and spec.n_sources > 0)
        source_for_init = own_sources if spec.init == PromptInit.OWN_SOURCE else \
            (bank.mean(0) if spec.n_sources else None)
        private = init_prompt((spec.n_tasks, spec.private_len, spec.dim), spec.init,
                              word_embeddings=word_embeddings, text_ids=init_text_ids,
                              source=source_for_init, generator=gen, vocab_ids=init_vocab_ids) \
            if spec.private_len else \
            torch.zeros(spec.n_tasks, 0, spec.dim)
        self.private = PrivatePrompts(private)
        if not spec.private_len:
            self.private.prompts.requires_grad_(False)
        self.router = build_router(spec)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # the host's copy of `step` (`set_step`): the temperature is computed from it as a Python float,
        # never by reading the buffer, which on a GPU would stall the host once per training step
        self._host_step: int | None = None
        # planned training steps (`plan_steps`): what `exp`/`linear` temperatures measure progress
        # against; a plain attribute, not a buffer, so checkpoints keep their keys (the loop re-plans)
        self.total_steps: int | None = None

    # ------------------------------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        s = self.spec
        step = self._host_step if self._host_step is not None else int(self.step)
        progress = step / self.total_steps if self.total_steps else None
        return C.scheduled_temperature(s.temp_schedule, start=s.temp_start, floor=s.temp_floor,
                                       rate=s.temp_rate, step=step, progress=progress)

    def set_step(self, step: int) -> None:
        self.step.fill_(step)
        self._host_step = int(step)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_step = None            # a loaded `step` buffer is the truth until the next `set_step`

    def plan_steps(self, total_steps: int) -> None:
        """The number of optimizer steps the run plans (epochs x steps per epoch): progress =
        step / total_steps, so the temperature reaches its floor on the last step."""
        self.total_steps = max(1, int(total_steps))

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
        """Router logits (ATTEMPT: attention scores) per example `[B, n_cand]` for task ids `[B]`; the
        attention routers also read the input embeddings `[B, T, d]` and their mask `[B, T]`."""
        if not self.needs_input():
            return self.router(task_ids)
        if input_embeds is None:
            raise ValueError("the attention router needs the input embeddings")
        keys = self.candidate_keys(task_ids)
        if isinstance(self.router, AttemptRouter):
            return self.router(keys, masked_max(input_embeds.float(), input_mask))
        return self.router(task_ids, keys, masked_mean(input_embeds.float(), input_mask))

    def forward(self, task_ids: torch.Tensor, input_embeds: torch.Tensor | None = None,
                input_mask: torch.Tensor | None = None):
        """-> (prompt `[B, L, d]`, mask `[B, L]`, weights `[B, n_cand]`)."""
        logits = self.route(task_ids, input_embeds, input_mask)
        s = self.spec
        if isinstance(self.router, AttemptRouter):
            weights, applied = C.attempt_weights(logits, has_target=s.private_len > 0)
            prompt, mask = C.compose_weighted(self.bank.prompts, self.private.prompts, task_ids, applied,
                                              s.composition)
            return prompt, mask, weights
        return C.compose(self.bank.prompts, self.private.prompts, None, task_ids,
                         composition=s.composition, temperature=self.temperature, top_k=s.top_k,
                         training=self.training, example_logits=logits, normalization=s.normalization)

    # ------------------------------------------------------------------------------------------
    def needs_input(self) -> bool:
        return isinstance(self.router, (GatedAttentionRouter, AttemptRouter))

    def shared_by_task(self) -> bool:
        """Whether every row of one task gets the same prompt in the current mode, known on the host: no
        input-dependent router, and one candidate (nothing to weigh) or evaluation (the deterministic rule).
        Training with two or more candidates draws each row's weights on its own."""
        return not self.needs_input() and (self.spec.n_candidates <= 1 or not self.training)

    def task_weights(self) -> torch.Tensor:
        """Deterministic (evaluation) weights `[n_tasks, n_cand]` of the per-task logits (for heatmaps):
        the task router's, the gated attention router's task bias; ATTEMPT has no per-task part (its
        weights depend on the input only): uniform."""
        s = self.spec
        if isinstance(self.router, TaskRouter):
            return C.eval_weights(self.router.logits.detach(), s.top_k, s.normalization)
        if isinstance(self.router, GatedAttentionRouter):
            return C.eval_weights(self.router.task_bias.detach(), s.top_k, s.normalization)
        return torch.full((s.n_tasks, s.n_candidates), 1.0 / s.n_candidates)

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

    def param_groups(self, prompt_lr: float, router_lr: float, weight_decay: float = 0.0,
                     source_lr: float | None = None) -> list[dict]:
        """Optimizer groups chosen by module: prompts (private, and the bank if learned) vs router; with
        `source_lr` a learned bank gets its own group ("sources") at that rate."""
        bank = [p for p in self.bank.parameters() if p.requires_grad and p.numel()]
        private = [p for p in self.private.parameters() if p.requires_grad and p.numel()]
        router = [p for p in self.router.parameters() if p.requires_grad]
        prompts = private if source_lr is not None else bank + private
        groups = []
        if prompts:
            groups.append({"params": prompts, "lr": prompt_lr, "weight_decay": weight_decay, "name": "prompts"})
        if bank and source_lr is not None:
            groups.append({"params": bank, "lr": source_lr, "weight_decay": weight_decay, "name": "sources"})
        if router:
            groups.append({"params": router, "lr": router_lr, "weight_decay": 0.0, "name": "router"})
        return groups


def check_spec(spec: PromptSpec) -> None:
    """ValueError naming the first impossible combination in `spec`."""
    if spec.n_candidates == 0:
        raise ValueError("a prompt needs at least one candidate: n_sources > 0 or private_len > 0")
    if spec.composition not in C.COMPOSERS:
        raise ValueError(f"unknown composition '{spec.composition}' "
                         f"({' or '.join(c.value for c in C.Composition)})")
    if spec.top_k is not None and not 1 <= spec.top_k <= spec.n_candidates:
        raise ValueError(f"top_k={spec.top_k} must be between 1 and the number of candidates "
                         f"({spec.n_candidates})")
    if spec.router == RouterKind.ATTENTION and (spec.top_k is not None or spec.router_bias):
        raise ValueError("router 'attention' is ATTEMPT as published: a plain softmax over every candidate, "
                         "no top_k and no router_bias (use router 'attention_gated' for those)")


def build_router(spec: PromptSpec) -> nn.Module:
    """The router module `spec.router` names, its per-task logits started by `initial_logits`."""
    initial = initial_logits(spec.n_tasks, spec.n_candidates, spec.router_bias, spec.private_len > 0)
    if spec.router == RouterKind.TASK:
        return TaskRouter(initial)
    if spec.router == RouterKind.ATTENTION_GATED:
        return GatedAttentionRouter(initial, spec.dim)
    if spec.router == RouterKind.ATTENTION:
        return AttemptRouter(spec.dim)
    raise ValueError(f"unknown router '{spec.router}' ({' or '.join(r.value for r in RouterKind)})")

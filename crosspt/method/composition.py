"""CrossPT composition as small pure functions over tensors.

Nothing here knows about models, tokenizers or files: gates, top-k, normalisation and the two ways
(`cat`, `wavg`) of turning weighted candidate prompts into one soft prompt per example. The modules in
`crosspt.method.prompts` hold the parameters and call these.

Shapes: candidates `[n_cand, L, d]` (sources first, then the task's private prompt per example),
weights `[B, n_cand]`.

Normalisation, training vs evaluation
    Training (`train_weights`) samples one relaxed-Bernoulli gate in (0, 1) per candidate, keeps the
    top-k gates and takes a softmax over the kept ones: the gate noise explores candidate subsets, the
    softmax makes the kept weights sum to 1, so a composed prompt stays on the scale of one prompt
    whatever k is, and dropped candidates get exactly 0 (masked out of `cat`, absent from `wavg`).
    Evaluation (`eval_weights`) is its deterministic counterpart: no noise and no top-k, a plain
    softmax of the router logits, again summing to 1 (so with `top_k` set, evaluation still gives every
    candidate a non-zero weight). Being noise-free, a task router's evaluation
    weights are a constant per task, which is what lets the composed prompt collapse to one `[L, d]`
    tensor (`CrossPTPrompt.collapsed`, the pyfunc bundle, the PEFT export). As the temperature anneals
    the training gates sharpen towards 0/1, and the logits that rank them are the ones evaluation uses.
"""
from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F
from torch.distributions import RelaxedBernoulli


class Composition(str, Enum):
    """How the weighted candidates become one soft prompt (config `prompt.composition`)."""
    CAT = "cat"        # concatenate the weighted candidates: `[B, n_cand * L, d]`
    WAVG = "wavg"      # weighted average of the candidates: `[B, L, d]`


def annealed_temperature(step: int, start: float, floor: float, rate: float) -> float:
    """Exponential decay from `start` towards `floor`: tau = max(floor, start * exp(-rate * step)).

    Early in training the gates are soft (explore all candidates); later they sharpen towards a
    near-binary choice (see "Normalisation, training vs evaluation" above)."""
    return max(floor, start * math.exp(-rate * step))


def relaxed_bernoulli_gates(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reparameterised binary-concrete sample in (0, 1) per candidate, `[..., n_cand]` like `logits`
    (differentiable in `logits`)."""
    return RelaxedBernoulli(temperature=torch.tensor(temperature, device=logits.device,
                                                     dtype=logits.dtype), logits=logits).rsample()


def topk_mask(scores: torch.Tensor, k: int | None) -> torch.Tensor:
    """Boolean mask `[..., n]` keeping the k largest of `scores` `[..., n]` along the last dim (all when k
    is None or >= n)."""
    n = scores.shape[-1]
    if k is None or k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax of `scores` `[..., n]` over the entries `keep` `[..., n]` marks; dropped entries get exactly 0."""
    return F.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)


def train_weights(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Training-time router weights `[B, n_cand]` from `logits` `[B, n_cand]`: relaxed-Bernoulli gates ->
    keep top-k -> softmax over the kept (see the module docstring for why)."""
    gates = relaxed_bernoulli_gates(logits, temperature)
    return masked_softmax(gates, topk_mask(gates, top_k))


def eval_weights(logits: torch.Tensor) -> torch.Tensor:
    """Evaluation-time router weights `[B, n_cand]` from `logits` `[B, n_cand]`: deterministic softmax of
    the logits (no noise, no top-k), the counterpart of `train_weights`."""
    return F.softmax(logits, dim=-1)


def pad_candidates(sources: torch.Tensor, private: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-example candidates `[B, n_cand, L, d]` padded to a common length, with validity `[n_cand, L]`.

    `sources` is `[n_src, L_s, d]` (shared by every example), `private` `[B, L_p, d]` (the task's own,
    gathered per example; L_p may be 0, in which case it is not a candidate at all)."""
    batch = private.shape[0]
    pieces, valid = [], []
    length = max(sources.shape[1] if sources.shape[0] else 0, private.shape[1])
    dim = private.shape[-1]
    if sources.shape[0]:
        src = F.pad(sources, (0, 0, 0, length - sources.shape[1]))
        pieces.append(src.unsqueeze(0).expand(batch, -1, -1, -1))
        v = torch.zeros(sources.shape[0], length, dtype=torch.bool, device=sources.device)
        v[:, : sources.shape[1]] = True
        valid.append(v)
    if private.shape[1]:
        pieces.append(F.pad(private, (0, 0, 0, length - private.shape[1])).unsqueeze(1))
        v = torch.zeros(1, length, dtype=torch.bool, device=private.device)
        v[:, : private.shape[1]] = True
        valid.append(v)
    if not pieces:
        return private.new_zeros(batch, 0, 0, dim), torch.zeros(0, 0, dtype=torch.bool)
    return torch.cat(pieces, dim=1), torch.cat(valid, dim=0)


def compose_cat(cands: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate weighted candidates `cands` `[B, n_cand, L, d]` (validity `valid` `[n_cand, L]`,
    weights `[B, n_cand]`) into a prompt `[B, n_cand * L, d]` and its mask `[B, n_cand * L]`.

    A candidate whose weight is exactly 0 (dropped by top-k) is masked out, so it is neither attended
    nor does it take part in the gradient; padding positions are masked too."""
    b, n, length, d = cands.shape
    prompt = (cands * weights[:, :, None, None]).reshape(b, n * length, d)
    mask = (valid.unsqueeze(0) & (weights > 0)[:, :, None]).reshape(b, n * length)
    return prompt, mask.long()


def compose_wavg(cands: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted average of candidates `cands` `[B, n_cand, L, d]` (validity `valid` `[n_cand, L]`, weights
    `[B, n_cand]`): prompt `[B, L, d]` and mask `[B, L]`; a position is valid if any weighted candidate
    covers it."""
    prompt = torch.einsum("bn,bnld->bld", weights, cands)
    mask = (valid.unsqueeze(0) & (weights > 0)[:, :, None]).any(dim=1)
    return prompt, mask.long()


COMPOSERS = {Composition.CAT: compose_cat, Composition.WAVG: compose_wavg}


def composed_length(composition: str, n_sources: int, source_len: int, private_len: int) -> int:
    """Length of the composed prompt for a configuration (what is prepended to the input)."""
    n_cand = n_sources + (1 if private_len > 0 else 0)
    length = max(source_len if n_sources else 0, private_len)
    return n_cand * length if composition == Composition.CAT else (length if n_cand else 0)


def compose(bank: torch.Tensor, private: torch.Tensor, logits: torch.Tensor, task_ids: torch.Tensor, *,
            composition: str = Composition.CAT, temperature: float | None = None, top_k: int | None = None,
            training: bool = False, example_logits: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole method in one call: (bank, private, router logits, task ids) -> (prompt, mask, weights).

    `bank` `[n_src, L_s, d]`, `private` `[n_tasks, L_p, d]`, `logits` `[n_tasks, n_cand]`.
    `example_logits` `[B, n_cand]` overrides the per-task logits (input-conditioned routers).
    Training samples gates at `temperature`; evaluation is deterministic."""
    per_example = example_logits if example_logits is not None else logits[task_ids]
    cands, valid = pad_candidates(bank, private[task_ids])
    if cands.shape[1] == 0:
        b, d = task_ids.shape[0], private.shape[-1]
        return (private.new_zeros(b, 0, d), torch.zeros(b, 0, dtype=torch.long, device=private.device),
                private.new_zeros(b, 0))
    if training:
        weights = train_weights(per_example, 1.0 if temperature is None else temperature, top_k)
    else:
        weights = eval_weights(per_example)
    prompt, mask = COMPOSERS[composition](cands, valid, weights)
    return prompt, mask, weights

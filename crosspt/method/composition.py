"""CrossPT composition as small pure functions over tensors.

Nothing here knows about models, tokenizers or files: temperature schedules, router normalisation
(training draws and their evaluation counterpart), top-k, and the two ways (`cat`, `wavg`) of turning
weighted candidate prompts into one soft prompt per example. The modules in `crosspt.method.prompts`
hold the parameters and call these.

Shapes: candidates `[n_cand, L, d]` (sources first, then the task's private prompt per example),
logits and weights `[B, n_cand]`.

Normalisation, training vs evaluation (config `prompt.normalization`, `Normalization`)
    Every rule keeps k candidates (`prompt.top_k`; all when unset) and gives the dropped ones a weight
    of exactly 0 (masked out of `cat`, absent from `wavg`); the kept weights sum to 1, so a composed
    prompt stays on the scale of one prompt whatever k is. Training draws noisy weights (the older
    rules' noise also explores candidate subsets; dirichlet's varies the weights within evaluation's
    subset); evaluation is deterministic, so a task router's evaluation weights
    are a constant per task, which is what lets the composed prompt collapse to one `[L, d]` tensor
    (`CrossPTPrompt.collapsed`, the pyfunc bundle, the PEFT export). Evaluation keeps the same k.

    dirichlet (default). Evaluation: keep the top-k of the logits `l` (`K`; ties go to the earlier
        candidate: bank order, the private prompt last), `w* = softmax(l)` over `K`, 0 elsewhere. Training:
        the same `K`, and `w_K ~ Dirichlet(alpha)`, `alpha = c(tau) * w*_K`, `c(tau) = |K| / tau`, 0
        elsewhere; drawn with `rsample` (implicit reparameterisation: the draw is differentiable in
        `alpha`, so in `l`). Why this rule:
        - Mean: `E[w_i] = alpha_i / sum(alpha) = w*_i` exactly, at every tau and for every logits, so
          what evaluation uses is what training draws on average from the first step (ASHA's early
          rungs score the mixture training was centred on), not only near the floor as with noisy_topk.
        - Gradient: for a loss linear in the weights, `g . w`, `E[grad_l] = grad_l (g . w*)`, the
          evaluation gradient, at every tau: it does not shrink at the start (noisy_topk's is 0.17-0.23x
          the evaluation gradient at tau = 5; benchmarks/router.md, "Issue 21").
        - Noise: `Var(w_i) = w*_i (1 - w*_i) / (c + 1)`; `c = |K| / tau` makes tau the noise level: at
          uniform weights `alpha_i = 1 / tau`, flat on the simplex at tau = 1, sparse above it (tau = 5,
          6 equal logits: E[max w] = 0.66, against noisy_topk's near one-hot 0.90), close around `w*`
          below it (tau = 0.1: sd of a weight ~0.045, noisy_topk's ~0.025); as tau -> 0 every draw
          tends to `w*`.
        - Exactly k: the kept set is `K` in both (Dirichlet draws are > 0), so `E[w_train] = w_eval`
          holds on every candidate. A rule whose training kept a candidate that evaluation drops could
          not have that mean on it; the price is that no draw tries a dropped candidate. Dropped
          candidates still get a gradient: backward treats each dropped weight as its dense softmax
          `p_j = softmax(l)_j` (straight-through; the forward value `p_j - p_j` is exactly 0), so
          `dL/dl_j = p_j (g_j - sum_{m not in K} p_m g_m)` and each kept logit gets
          `-p_i sum_{m not in K} p_m g_m`, `g = dL/dw`. With `wavg`, `g_j = <dL/dprompt, P_j>` is the
          first-order effect of adding candidate j: a dropped candidate that would help rises into
          `K`. With `cat` a dropped candidate's segment is masked (`g_j = 0`); it re-enters only when a
          kept logit sinks below it (the kept logits' gradient sums to 0, so the worst kept one sinks),
          and with `top_k: 1` the kept weight is always 1: a `cat` router with k = 1 does not learn.
        - Ties: at the start all logits are equal (router_bias 0); `K` is then the first k candidates,
          by an explicit stable tie-break (torch.topk breaks ties arbitrarily), the same in both.
    noisy_topk (the default before dirichlet). Training scores `s = l + tau * eps`,
        `eps ~ Logistic(0, 1)` i.i.d. per candidate (`eps = log u - log(1 - u)`, `u ~ U(0, 1)`: the
        log-odds noise of a relaxed-Bernoulli gate, scaled by the annealed temperature `tau`); keep the
        top-k of `s`, softmax of `s` over the kept. Evaluation: the same rule with the noise at 0, i.e. top-k of `l`, softmax of `l` over the
        kept. Why it converges: when the k-th and (k+1)-th logits differ by `delta > 0`, the kept set
        differs from the logits' top-k only if `tau * |eps_i - eps_j| > delta` for some pair, which has
        probability `<= n^2 * 2 exp(-delta / tau)` -> 0; on the kept set, softmax is smooth, so
        `|softmax(l + tau eps) - softmax(l)| <= tau * max|eps|/2` per draw, and because `eps` is symmetric
        with mean 0 the first-order term cancels in the mean: `E[w_train] - w_eval = O(tau^2)` (about
        `tau^2 * pi^2/6 * |d^2 softmax|`, under 0.01 at tau = 0.1 for any logits). As tau anneals to its
        floor every training draw tends to the evaluation weights, not only their mean. Away from the
        floor the mean does not match: the noise is not divided by tau, so at the default start (tau = 5)
        a draw is a near one-hot pick of a random candidate while evaluation is the softmax of the
        logits (max |E[w_train] - w_eval| = 0.39 at logits (2, 0, 0, 0, 0)), and the router's expected
        gradient is 0.17-0.23x the evaluation one (benchmarks/router.md). With top-k and tied logits (every
        router's start) the gap stays at the floor too: training splits the tied k-th place at random,
        evaluation gives it to the candidate torch.topk happens to return (0.08 at (2, 0, 0, 0, 0), k = 2).
    reference. The authors' rule (puraminy/ATTEMPT@441b8ae, attempt/third_party/models/t5/modeling_t5.py:
        lines 1616-1620 sample `RelaxedBernoulli(temperature, logits=router)` in training, lines 1631-1642
        use the raw router logits at evaluation; lines 1678-1683 keep the top-k scores in both;
        `normalize_scores` lines 112-118 (method "soft"), applied to the kept scores at lines 1741-1751,
        divide the gates by their sum (+1e-8) and take a softmax when training, a plain softmax at
        evaluation). Training: gates `g` in (0, 1), top-k of `g`,
        `softmax(g / sum(g_kept))`; evaluation: top-k of `l`, softmax of `l` over the kept. The
        training inputs to the softmax lie in (0, 1], so no training weight exceeds `e / (e + k - 1)`,
        whatever the logits and the temperature: training and evaluation weights differ by design
        (kept for faithful reproduction).
    gate_softmax. This package's rule before the option existed, kept to reproduce earlier results:
        training keeps the top-k relaxed-Bernoulli gates and takes a softmax of the gates (bounded by
        `e / (e + k - 1)` like `reference`); evaluation is a softmax of all the logits, ignoring top-k.

Temperature (config `prompt.temperature`, `Schedule`)
    `exp` and `linear` are defined over training progress `p = step / total_steps` in [0, 1], so tau
    reaches its floor on the last step whatever the data size: `exp` tau = start * (floor/start)^p,
    `linear` tau = start + (floor - start) * p. `step` is the per-step form
    tau = max(floor, start * exp(-rate * step)) (tied to step counts; `rate` is read only by it).
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


class Normalization(str, Enum):
    """How router logits become candidate weights, in training and at evaluation (config
    `prompt.normalization`); the module docstring gives each rule and its maths."""
    DIRICHLET = "dirichlet"          # eval: top-k softmax of logits; training: Dirichlet draw with that mean
    NOISY_TOPK = "noisy_topk"        # logits + tau * logistic noise, top-k, softmax; eval: noise 0
    REFERENCE = "reference"          # the authors': relaxed-Bernoulli gates / their sum, softmax
    GATE_SOFTMAX = "gate_softmax"    # before this option: softmax of gates; eval ignores top-k


class Schedule(str, Enum):
    """How the temperature anneals (config `prompt.temperature.schedule`)."""
    EXP = "exp"          # geometric from start to floor over training progress
    LINEAR = "linear"    # linear from start to floor over training progress
    STEP = "step"        # max(floor, start * exp(-rate * step)): per step, ignores progress


def annealed_temperature(step: int, start: float, floor: float, rate: float) -> float:
    """The `step` schedule: tau = max(floor, start * exp(-rate * step))."""
    return max(floor, start * math.exp(-rate * step))


def scheduled_temperature(schedule: str, *, start: float, floor: float, rate: float, step: int,
                          progress: float | None) -> float:
    """tau at a point of training: `progress` in [0, 1] (fraction of the planned steps; None when no
    plan is known, read as 0: the start temperature) for `exp`/`linear`, `step` for `step`."""
    if schedule == Schedule.STEP:
        return annealed_temperature(step, start, floor, rate)
    p = min(1.0, max(0.0, progress or 0.0))
    if schedule == Schedule.EXP:
        return start * (floor / start) ** p
    if schedule == Schedule.LINEAR:
        return start + (floor - start) * p
    raise ValueError(f"unknown temperature schedule '{schedule}' ({', '.join(s.value for s in Schedule)})")


def relaxed_bernoulli_gates(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reparameterised binary-concrete sample in (0, 1) per candidate, `[..., n_cand]` like `logits`
    (differentiable in `logits`)."""
    return RelaxedBernoulli(temperature=torch.tensor(temperature, device=logits.device,
                                                     dtype=logits.dtype), logits=logits).rsample()


def logistic_noise(like: torch.Tensor) -> torch.Tensor:
    """i.i.d. Logistic(0, 1) noise `log u - log(1 - u)` shaped like `like` `[..., n]`."""
    u = torch.rand_like(like).clamp(torch.finfo(like.dtype).tiny, 1.0 - torch.finfo(like.dtype).eps)
    return torch.log(u) - torch.log1p(-u)


def topk_indices(scores: torch.Tensor, k: int | None) -> torch.Tensor:
    """Indices `[..., k]` of the k largest of `scores` `[..., n]` along the last dim, equal scores to the
    earlier index (a stable sort; torch.topk breaks ties arbitrarily: 5 equal scores, k = 1 keeps index 2);
    all n indices in order when k is None or >= n."""
    n = scores.shape[-1]
    if k is None or k >= n:
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n)
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def topk_mask(scores: torch.Tensor, k: int | None, stable: bool = False) -> torch.Tensor:
    """Boolean mask `[..., n]` keeping the k largest of `scores` `[..., n]` along the last dim (all when k
    is None or >= n). `stable`: ties to the earlier index (`topk_indices`); the older rules keep
    torch.topk's arbitrary tie-break so that their results reproduce."""
    n = scores.shape[-1]
    if k is None or k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    idx = topk_indices(scores, k) if stable else scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax of `scores` `[..., n]` over the entries `keep` `[..., n]` marks; dropped entries get exactly 0."""
    return F.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)


def topk_softmax(scores: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep the top-k of `scores` `[..., n]`, softmax over the kept: weights `[..., n]`."""
    return masked_softmax(scores, topk_mask(scores, top_k))


def dirichlet_concentration(temperature: float, n_kept: int) -> float:
    """`c(tau) = n_kept / tau`: the total concentration of the `dirichlet` rule's draw (module docstring;
    uniform weights give every kept candidate `alpha = 1 / tau`)."""
    return n_kept / temperature


def dirichlet_weights(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """One training draw of the `dirichlet` rule `[B, n_cand]` from `logits` `[B, n_cand]`: on the
    evaluation's kept set, `Dirichlet(c(tau) * w_eval)` (mean exactly `w_eval`, reparameterised); exactly 0
    elsewhere, with the dense softmax's gradient for the dropped (straight-through; module docstring)."""
    if logits.numel() == 0:
        return torch.zeros_like(logits)
    idx = topk_indices(logits, top_k)                                          # [B, k], as eval_weights keeps
    # the evaluation weights on the kept (a softmax over them), the draw's concentration (float32: the
    # sampler and its gradient kernel, also under a bf16 autocast), scattered back to `[B, n]`
    w_kept = F.softmax(logits.gather(-1, idx).float(), dim=-1)                 # [B, k]
    alpha = dirichlet_concentration(temperature, idx.shape[-1]) * w_kept
    # validate_args=False: the argument check reads `(alpha > 0).all()` back to the host every step (alpha > 0
    # holds by construction: a softmax times a positive concentration)
    draw = torch.distributions.Dirichlet(alpha, validate_args=False).rsample().to(logits.dtype)   # [B, k], > 0
    weights = torch.zeros_like(logits).scatter(-1, idx, draw)
    if idx.shape[-1] < logits.shape[-1]:
        dropped = torch.ones_like(logits, dtype=torch.bool).scatter(-1, idx, False)
        dense = F.softmax(logits, dim=-1)
        weights = weights + (dense - dense.detach()) * dropped.to(dense.dtype)    # 0 forward, grad of p_j
    return weights


def train_weights(logits: torch.Tensor, temperature: float, top_k: int | None,
                  normalization: str = Normalization.DIRICHLET) -> torch.Tensor:
    """Training-time router weights `[B, n_cand]` from `logits` `[B, n_cand]` at temperature `temperature`:
    one noisy draw of the `normalization` rule (module docstring), exactly `top_k` non-zero weights."""
    if normalization == Normalization.DIRICHLET:
        return dirichlet_weights(logits, temperature, top_k)
    if normalization == Normalization.NOISY_TOPK:
        return topk_softmax(logits + temperature * logistic_noise(logits), top_k)
    gates = relaxed_bernoulli_gates(logits, temperature)
    keep = topk_mask(gates, top_k)
    if normalization == Normalization.REFERENCE:
        # divide by the kept gates' sum, then softmax (the 1e-8 is the authors' epsilon, a no-op here)
        kept_sum = gates.masked_fill(~keep, 0.0).sum(-1, keepdim=True)
        return masked_softmax(gates / kept_sum + 1e-8, keep)
    if normalization == Normalization.GATE_SOFTMAX:
        return masked_softmax(gates, keep)
    raise ValueError(f"unknown normalization '{normalization}' ({', '.join(n.value for n in Normalization)})")


def eval_weights(logits: torch.Tensor, top_k: int | None = None,
                 normalization: str = Normalization.DIRICHLET) -> torch.Tensor:
    """Evaluation-time router weights `[B, n_cand]` from `logits` `[B, n_cand]`: the deterministic
    counterpart of `train_weights` (top-k of the logits, softmax over the kept; `dirichlet`: ties to the
    earlier candidate; `gate_softmax`: softmax of all the logits, its historical counterpart that ignores
    top-k)."""
    if normalization == Normalization.DIRICHLET:
        return masked_softmax(logits, topk_mask(logits, top_k, stable=True))
    if normalization == Normalization.GATE_SOFTMAX:
        return F.softmax(logits, dim=-1)
    if normalization in (Normalization.NOISY_TOPK, Normalization.REFERENCE):
        return topk_softmax(logits, top_k)
    raise ValueError(f"unknown normalization '{normalization}' ({', '.join(n.value for n in Normalization)})")


def attempt_weights(scores: torch.Tensor, has_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ATTEMPT's mixture (Asai et al. 2022; AkariAsai/ATTEMPT@b5121e5,
    attempt/third_party/models/t5/modeling_t5.py lines 1133-1135 and 1143-1159): a plain softmax of the
    attention `scores` `[B, n_cand]` (no noise, no top-k, the same in training and at evaluation), and
    the target's own prompt added on top of the mixture, `sum_i w_i P_i + P_target`.

    Returns (the router's weights `[B, n_cand]`, summing to 1; the weights the composer applies
    `[B, n_cand]`: the same plus 1 on the target, the last candidate, when `has_target`). With `wavg`
    this is exactly ATTEMPT's prompt; with `cat` the target's segment is scaled by `1 + w_target`."""
    weights = F.softmax(scores, dim=-1)
    if not has_target:
        return weights, weights
    return weights, weights + F.one_hot(torch.tensor(scores.shape[-1] - 1), scores.shape[-1]).to(weights)


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


def compose_weighted(bank: torch.Tensor, private: torch.Tensor, task_ids: torch.Tensor, weights: torch.Tensor,
                     composition: str = Composition.CAT) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates (`bank` `[n_src, L_s, d]`, the examples' rows of `private` `[n_tasks, L_p, d]` for
    `task_ids` `[B]`) weighted by `weights` `[B, n_cand]` -> (prompt `[B, L, d]`, mask `[B, L]`)."""
    cands, valid = pad_candidates(bank, private[task_ids])
    if cands.shape[1] == 0:
        b, d = task_ids.shape[0], private.shape[-1]
        return private.new_zeros(b, 0, d), torch.zeros(b, 0, dtype=torch.long, device=private.device)
    return COMPOSERS[composition](cands, valid, weights)


def compose(bank: torch.Tensor, private: torch.Tensor, logits: torch.Tensor | None, task_ids: torch.Tensor, *,
            composition: str = Composition.CAT, temperature: float | None = None, top_k: int | None = None,
            training: bool = False, example_logits: torch.Tensor | None = None,
            normalization: str = Normalization.DIRICHLET) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole method in one call: (bank, private, router logits, task ids) -> (prompt, mask, weights).

    `bank` `[n_src, L_s, d]`, `private` `[n_tasks, L_p, d]`, `logits` `[n_tasks, n_cand]`.
    `example_logits` `[B, n_cand]` overrides the per-task logits (input-conditioned routers).
    Training draws weights at `temperature` by the `normalization` rule; evaluation is its
    deterministic counterpart (module docstring)."""
    per_example = example_logits if example_logits is not None else logits[task_ids]
    if per_example.shape[-1] == 0:
        weights = per_example
    elif training:
        weights = train_weights(per_example, 1.0 if temperature is None else temperature, top_k, normalization)
    else:
        weights = eval_weights(per_example, top_k, normalization)
    prompt, mask = compose_weighted(bank, private, task_ids, weights, composition)
    return prompt, mask, weights

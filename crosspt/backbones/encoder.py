"""Encoder family (any BERT-family AutoModel; default all-MiniLM-L6-v2, a mean-pooling sentence encoder).

Prompt placement, initialisation and pooling
    The soft prompt goes AFTER the input, past its padding: `[CLS] tokens... [SEP] (pad) [prompt]`,
    with position ids derived from the mask (RoBERTa-style models get their padding offset), so every
    input token keeps the position it has without a prompt and the prompt continues right after
    [SEP]; a masked-out prompt token changes nothing and an all-zero prompt mask reproduces the
    prompt-free encoding. The output is mean-pooled over the real token positions only (prompt
    positions excluded, [CLS]/[SEP] included, as sentence-transformers does) and L2-normalised: the
    prompt steers the token states, the pooled vector stays comparable with prompt-free encodings
    (the class representations below).
    Why there, and why `prompt.init: auto` means "neutral" ([PAD] embeddings) here: a frozen sentence
    encoder is already a strong zero-shot scorer, and a prompt that perturbs it at step 0 starts
    training below it. Measured on MiniLM, 16 prompt tokens, untrained STS-B dev Spearman: all 1500
    rows, prompt after the input: no prompt 0.8672, [PAD] 0.8615, [SEP] 0.8565, "." 0.8579, sampled
    whole words 0.8276; a seeded 500-row subset (no prompt 0.8737): [PAD] after [CLS] 0.8656, after
    the input 0.8740. SST-2/RTE untrained accuracy follows the same order (RTE: 0.5921 vs 0.6137).
    `prompt_position="before_cls"` is the other placement, PEFT's: `[prompt] [CLS] tokens... [SEP]`
    with position and token-type ids left to the model (PeftModelForFeatureExtraction drops both;
    joint-encoded pairs lose their segment ids), so the prompt takes positions 0..L-1 and shifts the
    input; pooling still covers the real tokens only. It exists so that PEFT's prompt tuning can be
    scored through this adapter as an outside reference (crosspt.bench). Nothing built at construction
    depends on the placement (the class representations are prompt-free, and an empty prompt encodes
    the same in both), so it may also be set on a loaded backbone.

Per-task kinds (chosen at construction, one per task)
    "label"  single-text tasks, and pair tasks with pair_encoding="joint" (`[CLS] a [SEP] b [SEP]`):
             logits = exp(logit_scale[t]) * cos(u, class_repr[t, k]), where class_repr is
               natural -> the frozen, prompt-free encoding of the task's label_sentences (label words
                          when it has none), opaque -> of the opaque label words (both cached as a
                          non-persistent buffer), index -> a learned `class_vectors[t, k]`.
    "pair"   classification pair tasks with pair_encoding="bi" (the default, "auto"): both sides are
             prompted and encoded separately, c = cos(u, v).
               2 classes and a `similar_class`: logit[similar] = exp(pair_log_scale[t]) * (c - pair_threshold[t]),
                 the other class 0;
               otherwise (e.g. 3-class NLI): logit[k] = pair_class_scale[t, k] * c + pair_class_bias[t, k]
                 (initialised to the same rule for the similar class, 0 elsewhere).
    "regression" (always bi-encoded; only pair regression tasks are supported):
               pred = reg_scale[t] * (low + (high - low) * c) + reg_bias[t], scale 1 / bias 0 at init
               (STS-B: 5 * cos), loss MSE.
    Joint encoding stays at chance on RTE/MRPC/QNLI with MiniLM, the bi-encoder cosine gives
    62/70/71.5% untrained, hence "auto" = "bi".

All per-task tensors are parameters of this module (not of the frozen `self.model`), indexed by
task id, and listed by `head_parameters()`. Inputs are the raw texts (no task prefix: a sentence
encoder gains nothing from "sst2 sentence:").
"""
from __future__ import annotations

import inspect
import math
from enum import Enum
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crosspt.backbones.base import Backbone, Family, pad_sequences, positions_from_mask
from crosspt.errors import ConfigError
from crosspt.method.prompts import PromptInit
from crosspt.tasks import specs as _tasks
from crosspt.tasks.specs import LabelSemantics


class PairEncoding(str, Enum):
    """How a classification pair task is encoded (config `backbone.pair_encoding`), see the module doc."""
    AUTO = "auto"      # = bi
    BI = "bi"          # each side prompted and encoded on its own, scored by their cosine
    JOINT = "joint"    # `[CLS] a [SEP] b [SEP]` in one sequence, scored against the class representations


class PromptPosition(str, Enum):
    """Where `encode` puts the soft prompt (see the module docstring)."""
    AFTER_INPUT = "after_input"      # ours: after the padded input, mask-derived position ids
    BEFORE_CLS = "before_cls"        # PEFT's: before [CLS], position / token-type ids left to the model


KIND_LABEL, KIND_PAIR, KIND_REG = 0, 1, 2
# models whose absolute positions start at padding_idx + 1
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet", "data2vec-text", "longformer",
                     "xmod", "roberta-prelayernorm", "xlm-roberta-xl", "luke", "ibert"}
_NEG = -1e4


class EncoderBackbone(Backbone):
    family = Family.ENCODER.value
    default_init = PromptInit.NEUTRAL.value      # why: see "Prompt placement" above

    def __init__(self, model, tokenizer, tasks, *, pair_encoding: str = PairEncoding.AUTO.value,
                 logit_scale_init: float = 20.0, pair_threshold_init: float = 0.65,
                 prompt_position: str = PromptPosition.AFTER_INPUT.value, **kw):
        super().__init__(model, tokenizer, tasks, **kw)
        choices = [e.value for e in PairEncoding]
        if pair_encoding not in choices:
            raise ConfigError(f"unknown pair_encoding '{pair_encoding}'; choose from {', '.join(choices)}")
        positions = [e.value for e in PromptPosition]
        if prompt_position not in positions:
            raise ConfigError(f"unknown prompt_position '{prompt_position}'; choose from {', '.join(positions)}")
        self.prompt_position = PromptPosition(prompt_position)
        self.pair_encoding = PairEncoding.BI.value if pair_encoding == PairEncoding.AUTO else pair_encoding
        kinds = []
        for t in self.tasks:
            if t.is_regression:
                if not t.is_pair:
                    raise ConfigError(f"task '{t.name}': the encoder backbone supports regression only "
                                      f"for sentence-pair tasks")
                kinds.append(KIND_REG)
            elif t.is_pair and self.pair_encoding == PairEncoding.BI:
                kinds.append(KIND_PAIR)
            else:
                kinds.append(KIND_LABEL)
        self.register_buffer("task_kind", torch.tensor(kinds, dtype=torch.long), persistent=False)
        self._kinds = list(kinds)          # the same on the host: collate reads it without touching the device
        self.register_buffer("task_num_classes", torch.tensor([t.num_classes for t in self.tasks]),
                             persistent=False)
        cfg = self.model.config
        params = inspect.signature(self.model.forward).parameters
        self._takes_positions = "position_ids" in params
        self._takes_types = "token_type_ids" in params and getattr(cfg, "type_vocab_size", 0) > 0
        self._pos_offset = (cfg.pad_token_id + 1) if cfg.model_type in _OFFSET_POSITIONS else 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        n, K, d = self.num_tasks, self.max_classes, self.embed_dim
        self._heads: list[str] = []
        if KIND_LABEL in kinds:
            self._add_head("logit_scale", torch.full((n,), math.log(logit_scale_init)))
            if self.label_semantics == LabelSemantics.INDEX:
                self._add_head("class_vectors", torch.randn(n, K, d))
            else:
                self.register_buffer("class_reprs", self._class_representations(), persistent=False)
        if KIND_PAIR in kinds:
            s0, t0 = logit_scale_init, pair_threshold_init
            self._add_head("pair_log_scale", torch.full((n,), math.log(s0)))
            self._add_head("pair_threshold", torch.full((n,), float(t0)))
            scale, bias = torch.zeros(n, K), torch.zeros(n, K)
            for i, t in enumerate(self.tasks):
                if t.similar_class is not None and not t.is_regression:
                    scale[i, t.similar_class] = s0
                    bias[i, t.similar_class] = -s0 * t0
            self._add_head("pair_class_scale", scale)
            self._add_head("pair_class_bias", bias)
        if KIND_REG in kinds:
            self._add_head("reg_scale", torch.ones(n))
            self._add_head("reg_bias", torch.zeros(n))
            rng = [t.label_range or (0.0, 5.0) if t.is_regression else (0.0, 1.0) for t in self.tasks]
            self.register_buffer("reg_range", torch.tensor(rng, dtype=torch.float32), persistent=False)
        # 2-class pair tasks with a similar class use the threshold rule
        simple = [k == KIND_PAIR and t.num_classes == 2 and t.similar_class is not None
                  for k, t in zip(kinds, self.tasks)]
        self.register_buffer("pair_simple", torch.tensor(simple, dtype=torch.bool), persistent=False)
        self.register_buffer("similar_class", torch.tensor(
            [t.similar_class if t.similar_class is not None else 0 for t in self.tasks]), persistent=False)

    def _add_head(self, name: str, value: torch.Tensor) -> None:
        self.register_parameter(name, nn.Parameter(value.float()))
        self._heads.append(name)

    def head_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self._heads]

    @property
    def random_heads(self) -> bool:
        return "class_vectors" in self._heads            # `index` label semantics: learned class vectors

    # -- tokenisation -----------------------------------------------------------------------
    def _tok(self, a: str, b: str | None = None) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(a, b, truncation=True, max_length=self.max_length)
        ids = list(enc["input_ids"])
        types = list(enc.get("token_type_ids") or [0] * len(ids))
        return ids, types

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """(ids, token types) rows -> right-padded "input_ids", "attention_mask", "token_type_ids" `[N, T]`."""
        ids, mask = pad_sequences([r[0] for r in rows], self.pad_id)
        types, _ = pad_sequences([r[1] for r in rows], 0)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def _rows(self, examples: Sequence) -> list[tuple]:
        """Each example's tokenised sides, `((ids, types),)` (label kind: one sequence) or
        `((ids, types), (ids, types))` (bi-encoded pair), ids and types `[T]` (cached: `_per_example`)."""
        def encode(todo):
            out = []
            for ex in todo:
                t, texts = self.task_id(ex.task), tuple(ex.texts)
                if len(texts) != len(self.tasks[t].text_fields):
                    raise ValueError(f"task '{self.tasks[t].name}' expects {len(self.tasks[t].text_fields)} "
                                     f"texts, got {len(texts)}")
                sides = [self._tok(*texts)] if self._kinds[t] == KIND_LABEL else \
                    [self._tok(texts[0]), self._tok(texts[1])]
                out.append(tuple((torch.tensor(ids, dtype=torch.long), torch.tensor(types, dtype=torch.long))
                                 for ids, types in sides))
            return out
        return self._per_example(examples, encode)

    def input_length(self, examples: Sequence) -> list[int]:
        return [max(len(ids) for ids, _ in sides) for sides in self._rows(examples)]

    def collate(self, examples: Sequence, *, train: bool) -> dict[str, torch.Tensor]:
        tids = [self.task_id(ex.task) for ex in examples]
        rows = self._rows(examples)
        b_idx = [i for i, sides in enumerate(rows) if len(sides) > 1]
        labels, _ = self._labels_tensor(examples, tids, train=train)
        batch = self._pad([sides[0] for sides in rows])
        b = self._pad([rows[i][1] for i in b_idx]) if b_idx else \
            {k: torch.zeros(0, 0, dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids")}
        batch.update({f"b_{k}": v for k, v in b.items()})
        batch["b_rows"] = torch.tensor(b_idx, dtype=torch.long)
        batch["task_ids"] = torch.tensor(tids, dtype=torch.long)
        batch["labels"] = labels
        # which rows take which scoring path, decided here on the host: found on the device they would be
        # nonzero()/boolean masks, each a host sync in every step (`_row_groups`)
        kinds = [self._kinds[t] for t in tids]

        def rows_of(keep, over=range(len(kinds))):
            return torch.tensor([j for j, i in enumerate(over) if keep(kinds[i])], dtype=torch.long)

        batch.update({"label_rows": rows_of(lambda k: k == KIND_LABEL), "cls_rows": rows_of(lambda k: k != KIND_REG),
                      "reg_rows": rows_of(lambda k: k == KIND_REG),
                      "b_pair": rows_of(lambda k: k == KIND_PAIR, b_idx), "b_reg": rows_of(lambda k: k == KIND_REG, b_idx)})
        return batch

    _GROUPS = ("label_rows", "cls_rows", "reg_rows", "b_pair", "b_reg")

    def _row_groups(self, batch: dict) -> dict[str, torch.Tensor]:
        """Row indices `[n]` of each scoring path: `label_rows`, `cls_rows` (not regression) and `reg_rows` of
        the batch, `b_pair` and `b_reg` among its bi-encoded rows (`b_rows`). From `collate`; found on the
        device (host syncs) only for a batch built some other way."""
        if all(k in batch for k in self._GROUPS):
            return {k: batch[k] for k in self._GROUPS}
        kind = self.task_kind[batch["task_ids"]]
        k_b = kind[batch["b_rows"]]
        return {"label_rows": (kind == KIND_LABEL).nonzero().squeeze(-1),
                "cls_rows": (kind != KIND_REG).nonzero().squeeze(-1), "reg_rows": (kind == KIND_REG).nonzero().squeeze(-1),
                "b_pair": (k_b == KIND_PAIR).nonzero().squeeze(-1), "b_reg": (k_b == KIND_REG).nonzero().squeeze(-1)}

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised mean-pooled encodings `[N, d]` of `input_ids` `[N, T]` (masks `[N, T]`) with the
        prompt `[N, L, d]` (mask `[N, L]`) after the (padded) input, or before [CLS] with
        `prompt_position="before_cls"` (PEFT's placement, for the PEFT baselines)."""
        emb = self.word_embeddings()(input_ids)
        N, L = emb.shape[0], prompt.shape[1]
        am = attention_mask.long()
        if self.prompt_position is PromptPosition.BEFORE_CLS:
            return self._encode_prompt_first(prompt, prompt_mask, emb, am)
        # After the input, not before [CLS]: the input tokens keep their prompt-free positions and the
        # untrained prompt perturbs the frozen encoder least (measurements in the module docstring).
        x = torch.cat([emb, prompt.to(emb.dtype)], dim=1)
        m = torch.cat([am, prompt_mask.long()], dim=1)
        kw = {"inputs_embeds": x, "attention_mask": m}
        if self._takes_positions:
            kw["position_ids"] = positions_from_mask(m) + self._pos_offset
        if self._takes_types:
            tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            zeros = torch.zeros(N, L, dtype=tt.dtype, device=tt.device)
            kw["token_type_ids"] = torch.cat([tt, zeros], dim=1)
        hidden = self.model(**kw).last_hidden_state
        pool = torch.cat([am, torch.zeros(N, L, dtype=am.dtype, device=am.device)], dim=1)
        pool = pool.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * pool).sum(1) / pool.sum(1).clamp(min=1e-6)
        return F.normalize(mean.float(), dim=-1)

    def _encode_prompt_first(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, emb: torch.Tensor,
                             am: torch.Tensor) -> torch.Tensor:
        """`encode` with PEFT's placement: prompt `[N, L, d]` before the input embeddings `[N, T, d]`,
        no position / token-type ids (the model's defaults); mean over the input's real tokens `[N, d]`."""
        L = prompt.shape[1]
        hidden = self.model(inputs_embeds=torch.cat([prompt.to(emb.dtype), emb], dim=1),
                            attention_mask=torch.cat([prompt_mask.long(), am], dim=1)).last_hidden_state
        pool = am.unsqueeze(-1).to(hidden.dtype)
        return F.normalize(((hidden[:, L:] * pool).sum(1) / pool.sum(1).clamp(min=1e-6)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Frozen prompt-free encodings `[N, d]` of plain texts."""
        out = []
        for s in range(0, len(texts), batch_size):
            b = {k: v.to(self.device) for k, v in self._pad([self._tok(t) for t in texts[s:s + batch_size]]).items()}
            empty = torch.zeros(b["input_ids"].shape[0], 0, self.embed_dim, device=self.device, dtype=self.dtype)
            out.append(self.encode(empty, torch.zeros(empty.shape[:2], dtype=torch.long, device=self.device), **b))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def _class_representations(self) -> torch.Tensor:
        """Frozen prompt-free encodings `[n_tasks, K, d]` of each label-kind task's class texts (0 elsewhere)."""
        reprs = torch.zeros(self.num_tasks, self.max_classes, self.embed_dim)
        for i, t in enumerate(self.tasks):
            if int(self.task_kind[i]) != KIND_LABEL:
                continue
            if self.label_semantics == LabelSemantics.NATURAL and t.label_sentences:
                texts = list(t.label_sentences)
            else:
                texts = [_tasks.label_text(t, k, self.label_semantics) for k in range(t.num_classes)]
            reprs[i, :t.num_classes] = self.encode_texts(texts).cpu()
        return reprs

    # -- scoring ----------------------------------------------------------------------------
    def _outputs(self, prompt, prompt_mask, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits `[B, K]` with -1e4 beyond a task's classes, regression preds `[B]` (0 elsewhere))."""
        batch = self._to_device(batch)
        B = batch["input_ids"].shape[0]
        prompt, prompt_mask = self._check_prompt(prompt, prompt_mask, B)
        tids = batch["task_ids"]
        brows = batch["b_rows"]
        nb = brows.numel()
        # one forward for the a-side of every row and the b-side of pair rows
        ids = [batch["input_ids"], batch["b_input_ids"]]
        T = max(t.shape[1] for t in ids)

        def widen(t, v=0):
            return F.pad(t, (0, T - t.shape[1]), value=v)

        u_all = self.encode(
            torch.cat([prompt, prompt[brows]]), torch.cat([prompt_mask, prompt_mask[brows]]),
            torch.cat([widen(batch["input_ids"], self.pad_id), widen(batch["b_input_ids"], self.pad_id)]),
            torch.cat([widen(batch["attention_mask"]), widen(batch["b_attention_mask"])]),
            torch.cat([widen(batch["token_type_ids"]), widen(batch["b_token_type_ids"])]))
        u, v = u_all[:B], u_all[B:]
        K = self.max_classes
        logits = torch.zeros(B, K, device=u.device)
        reg = torch.zeros(B, device=u.device)
        groups = self._row_groups(batch)

        label_rows = groups["label_rows"]
        if label_rows.numel():
            t = tids[label_rows]
            if self.label_semantics == LabelSemantics.INDEX:
                cls = F.normalize(self.class_vectors[t], dim=-1)
            else:
                cls = self.class_reprs[t]
            cos = torch.einsum("bd,bkd->bk", u[label_rows], cls)
            scale = self.logit_scale[t].exp().clamp(max=100.0).unsqueeze(-1)
            logits = logits.index_put((label_rows,), scale * cos)
        if nb:
            c = (u[brows] * v).sum(-1)
            t = tids[brows]
            pair_sel = groups["b_pair"]
            if pair_sel.numel():
                rows, tp, cp = brows[pair_sel], t[pair_sel], c[pair_sel]
                simple_logit = self.pair_log_scale[tp].exp() * (cp - self.pair_threshold[tp])
                # one-hot by comparison: F.one_hot checks its indices' range on the host (a sync) on CPU
                onehot = (torch.arange(K, device=cp.device) == self.similar_class[tp].unsqueeze(-1)).to(cp.dtype)
                simple = onehot * simple_logit.unsqueeze(-1)
                general = self.pair_class_scale[tp] * cp.unsqueeze(-1) + self.pair_class_bias[tp]
                out = torch.where(self.pair_simple[tp].unsqueeze(-1), simple, general)
                logits = logits.index_put((rows,), out)
            reg_sel = groups["b_reg"]
            if reg_sel.numel():
                rows, tr, cr = brows[reg_sel], t[reg_sel], c[reg_sel]
                lo, hi = self.reg_range[tr, 0], self.reg_range[tr, 1]
                pred = self.reg_scale[tr] * (lo + (hi - lo) * cr) + self.reg_bias[tr]
                reg = reg.index_put((rows,), pred)
        classes = torch.arange(K, device=u.device).unsqueeze(0)
        logits = logits.masked_fill(classes >= self.task_num_classes[tids].unsqueeze(-1), _NEG)
        return logits, reg

    def loss(self, prompt, prompt_mask, batch) -> torch.Tensor:
        """Mean over the batch (a scalar) of cross entropy (classification) or squared error (regression)."""
        batch = self._to_device(batch)
        logits, reg = self._outputs(prompt, prompt_mask, batch)
        groups = self._row_groups(batch)
        cls_rows, reg_rows = groups["cls_rows"], groups["reg_rows"]
        labels = batch["labels"]
        per = torch.zeros(labels.shape[0], device=logits.device)
        if cls_rows.numel():
            ce = F.cross_entropy(logits[cls_rows], labels[cls_rows].long(), reduction="none")
            per = per.index_put((cls_rows,), ce)
        if reg_rows.numel():
            per = per.index_put((reg_rows,), (reg[reg_rows] - labels[reg_rows].float()) ** 2)
        return per.mean() + self._head_zero()

    @torch.no_grad()
    def predict(self, prompt, prompt_mask, batch) -> torch.Tensor:
        """Predictions `[B]`: argmax class (long), or float when the batch holds a regression task."""
        batch = self._to_device(batch)
        logits, reg = self._outputs(prompt, prompt_mask, batch)
        if self._row_groups(batch)["reg_rows"].numel():
            is_reg = self.task_kind[batch["task_ids"]] == KIND_REG
            return torch.where(is_reg, reg, logits.argmax(-1).float()).cpu()
        return logits.argmax(-1).cpu()

    @torch.no_grad()
    def pair_cosines(self, prompt, prompt_mask, batch) -> torch.Tensor:
        """cos(u, v) `[len(b_rows)]` of the bi-encoded pair rows (diagnostics, threshold tuning)."""
        batch = self._to_device(batch)
        B = batch["input_ids"].shape[0]
        prompt, prompt_mask = self._check_prompt(prompt, prompt_mask, B)
        r = batch["b_rows"]
        u = self.encode(prompt[r], prompt_mask[r], batch["input_ids"][r], batch["attention_mask"][r],
                        batch["token_type_ids"][r])
        v = self.encode(prompt[r], prompt_mask[r], batch["b_input_ids"], batch["b_attention_mask"],
                        batch["b_token_type_ids"])
        return (u * v).sum(-1).cpu()

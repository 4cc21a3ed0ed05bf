"""The interface every backbone family implements.

A backbone owns a frozen HF model and its tokenizer. It never knows how prompts are composed:
it receives an already-composed soft prompt `[B, L, d]` with its mask `[B, L]`, places it beside the
input embeddings (`RankBackbone` families prepend it; the encoder puts it after the input, see
crosspt.backbones.encoder) and extends the attention mask. Trainable per-task pieces a family needs (encoder
class vectors, regression heads) live here as one tensor indexed by task id; `head_parameters()`
lists them (they are parameters of the backbone, never of `self.model`).

Conventions shared by all families
- `collate(examples)` accepts mixed-task batches; it always returns "task_ids" `LongTensor[B]` and
  "labels": a `LongTensor` of class indices when every example is a classification example, else a
  `FloatTensor` (class indices are exact in float). Unlabelled examples (label None / -1 / nan) are
  allowed only with `train=False` and get -1 (classification) or nan (regression).
- `predict` returns `[B]` predictions with the same dtype convention as "labels".
- `L = 0` prompts (`[B, 0, d]`) are valid everywhere and mean "no prompt".
- A prompt mask entry of 0 removes that prompt token: masked tokens are first moved to the front
  of the prompt (`compact_prompt`, order of the kept ones unchanged), and they are neither attended
  to nor do they shift the positions of the real tokens (position ids follow the mask where the model
  accepts them; relative-position models like T5 see the kept tokens next to the input). So a
  prompt with masked tokens behaves exactly like the prompt with those tokens cut out.
- Every `loss` touches all head parameters (unused ones with weight 0), so DDP needs no
  `find_unused_parameters`.
"""
from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from enum import Enum
from typing import ClassVar, Sequence

import torch
from torch import nn

from crosspt.errors import ConfigError, DataError, UnknownTaskError
from crosspt.method.prompts import PromptInit
from crosspt.tasks import specs as _tasks
from crosspt.tasks.formatting import fit_texts
from crosspt.tasks.specs import LabelSemantics, TaskSpec

# batch key (a host bool) set by the model for the loss: every row of one task carries the same prompt
# (`CrossPTPrompt.shared_by_task`), so a backbone may run it once per task without looking at the values
PROMPT_SHARED_BY_TASK = "prompt_shared_by_task"
# batch key (a host int) set by the model: the soft prompt takes the place of this many last tokens of the text the
# family writes before it (the decoder's chat head: the prompt was initialised from those tokens,
# `Backbone.head_tail_ids`), so they are left out of the head; 0: the whole head stays
PROMPT_REPLACES_HEAD = "prompt_replaces_head"


class Family(str, Enum):
    """A backbone family (config `backbone.family`); `crosspt.backbones.loader.FAMILY_TABLE` maps each
    concrete one to its adapter."""
    AUTO = "auto"          # chosen from the model's config (see crosspt.backbones.loader)
    SEQ2SEQ = "seq2seq"
    ENCODER = "encoder"
    DECODER = "decoder"


class Placement(str, Enum):
    """Where the soft prompt sits beside the input (config `prompt.placement`)."""
    AUTO = "auto"          # the family's own place: before the input (seq2seq, decoder), after it (encoder)
    BEFORE = "before"      # prompt, input (Lester et al.)
    AFTER = "after"        # input, prompt (seq2seq only among the generative families)


def trainable_and_total(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameter elements of `module`; a tensor shared by several
    submodules (tied embeddings) counts once, as `module.parameters()` yields it once."""
    trainable = total = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right",
                  pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad N lists of token ids to ids `[N, T]` and a 0/1 mask `[N, T]` (`side` "left" or "right")."""
    width = max([len(s) for s in seqs] + [pad_to or 0, 0])
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        row = s if torch.is_tensor(s) else torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            ids[i, :len(s)] = row
            mask[i, :len(s)] = 1
        else:
            ids[i, width - len(s):] = row
            mask[i, width - len(s):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.LongTensor:
    """Position ids `[N, S]` for a mask `[N, S]` that skip masked-out tokens: 0, 1, 2, ... over the attended
    tokens only."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def compact_prompt(prompt: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move masked-out tokens of `prompt` `[B, L, d]` (mask `[B, L]`) to the front, keeping the kept tokens'
    order (differentiable): -> (prompt `[B, L, d]`, mask `[B, L]`).

    Always sorts, even a mask of all ones (a stable sort leaves it as it is, to the bit): asking the mask
    first whether it has a zero would be a host sync per call. Callers that know their mask is full pass
    none (`Backbone._check_prompt`)."""
    if prompt.shape[1] == 0:
        return prompt, mask
    order = torch.sort(mask.long(), dim=1, stable=True).indices          # zeros first
    prompt = prompt.gather(1, order.unsqueeze(-1).expand(-1, -1, prompt.shape[-1]))
    return prompt, mask.gather(1, order)


_LEADING_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def _leading_answer(task: TaskSpec, text: str, candidates: Sequence[str]) -> int | float | None:
    """The candidate (class index) or number (regression) that `text` begins with, after leading blanks,
    quotes and punctuation; a candidate must end at a word boundary. None when it begins with neither."""
    t = re.sub(r"^[\s\"'`*:.,;!?()\[\]-]+", "", text or "").lower()
    if task.is_regression:
        m = _LEADING_NUMBER.match(t)
        return float(m.group(0)) if m and math.isfinite(float(m.group(0))) else None
    by_length = sorted(range(len(candidates)), key=lambda i: -len(candidates[i]))
    for i in by_length:
        c = candidates[i].strip().lower()
        if c and t.startswith(c) and (len(t) == len(c) or not (t[len(c)].isalnum() or t[len(c)] == "_")):
            return i
    return None


class Backbone(nn.Module, ABC):
    family: ClassVar[str]                                   # a concrete `Family` value
    default_init: ClassVar[str] = PromptInit.VOCAB.value    # what prompt.init "auto" means for this family

    def __init__(self, model: nn.Module, tokenizer, tasks: Sequence[TaskSpec], *,
                 label_semantics: str = LabelSemantics.NATURAL.value, with_prefix: bool = True, max_length: int = 128,
                 name: str = ""):
        super().__init__()
        _tasks.check_label_semantics(label_semantics)
        if not tasks:
            raise ConfigError("a backbone needs at least one task")
        self.model = model
        self.tokenizer = tokenizer
        self.tasks = list(tasks)          # index == task id
        self.task_index = {t.name: i for i, t in enumerate(self.tasks)}
        if len(self.task_index) != len(self.tasks):
            raise ConfigError("task names must be unique")
        self.label_semantics = label_semantics
        self.with_prefix = with_prefix
        self.max_length = int(max_length)
        self.name = name or getattr(getattr(model, "config", None), "name_or_path", "") or ""
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self._token_cache: dict = {}          # `_per_example`

    # -- shapes -----------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.word_embeddings().embedding_dim

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def max_classes(self) -> int:
        return max(t.num_classes for t in self.tasks)

    @property
    def device(self) -> torch.device:
        return self.word_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.word_embeddings().weight.dtype

    def word_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def neutral_init_ids(self) -> list[int]:
        """The token whose embedding starts a "neutral" prompt: the pad token (else end-of-text).
        Inserted where the model is used to seeing nothing, it changes a frozen encoder's outputs least
        (MiniLM STS-B dev Spearman, 16 such tokens after the input: 0.8615 vs 0.8672 without a prompt
        and 0.8276 with 16 sampled words)."""
        tok = self.tokenizer
        for i in (tok.pad_token_id, tok.eos_token_id, tok.sep_token_id, tok.unk_token_id):
            if i is not None:
                return [int(i)]
        return [0]

    def init_vocab_ids(self, n: int = 5000) -> torch.Tensor:
        """Ids of the first `n` ordinary word tokens, the pool of the "vocab" prompt init.

        Not simply the first n rows: BERT's WordPiece vocabulary starts with ~1000 `[unusedN]` rows that
        were never trained, then single characters and `##` pieces; a prompt sampled from them shifts a
        sentence encoder's outputs far more than real words do (STS-B Spearman 0.874 -> 0.824 on MiniLM
        at 16 tokens). SentencePiece/BPE vocabularies are frequency-ordered, so there this keeps the
        frequent whole words, as Lester et al. intend."""
        tok = self.tokenizer
        special = set(getattr(tok, "all_special_ids", []) or [])
        rows = self.word_embeddings().num_embeddings
        ids = []
        for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(min(rows, len(tok)))))):
            word = (piece or "").lstrip("\u2581\u0120")          # SentencePiece "▁", byte-level BPE "Ġ"
            if i in special or len(word) < 2 or not word.isalpha() or not word.isascii():
                continue
            ids.append(i)
            if len(ids) == n:
                break
        return torch.tensor(ids if len(ids) >= 100 else range(min(n, rows)), dtype=torch.long)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()                 # frozen backbone: no dropout, ever
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable per-task tensors owned by the backbone (none by default)."""
        return []

    @property
    def random_heads(self) -> bool:
        """Whether some head parameter starts from random values (drawn from the global RNG at construction):
        such a backbone cannot be reset to a fresh one's state by copying its initial heads back."""
        return False

    def _head_zero(self) -> torch.Tensor:
        """0 * sum of every head parameter, a scalar `[]`: keeps all of them in the autograd graph (DDP)."""
        z = torch.zeros((), device=self.device)
        for p in self.head_parameters():
            z = z + 0.0 * p.sum()
        return z

    # -- tasks / labels ---------------------------------------------------------------------
    def task_id(self, name: str) -> int:
        try:
            return self.task_index[name]
        except KeyError:
            raise UnknownTaskError(f"task '{name}' is not one of this backbone's tasks "
                                   f"({', '.join(self.task_index)})") from None

    def candidates(self, task: TaskSpec) -> list[str]:
        """Candidate target strings of a task for rank classification (score grid for regression)."""
        if task.is_regression:
            return list(_tasks.regression_grid(task))
        return [_tasks.label_text(task, i, self.label_semantics) for i in range(task.num_classes)]

    def parse_generated(self, task: TaskSpec, text: str) -> float | int:
        """Generated text -> class index / float; unparsable -> -1 (classification) or nan.

        Reads the answer the text STARTS with: a language model that writes the label word often goes on
        ("positive.", "Positive review", "entailment\nThe ..."); the first word(s) are its answer. The exact
        label (case and surrounding space aside) always parses; otherwise the longest candidate that the text
        begins with, up to a word boundary ("not_entailment" before "not"), or for regression the leading
        number."""
        value = _tasks.parse_label_text(task, text, self.label_semantics)
        if value is None:  # tolerate tokenizers whose decode inserts spaces ("3. 8", "not _ x")
            squashed = re.sub(r"\s+", "", text or "").lower()
            if task.is_regression:
                try:
                    value = float(squashed)
                    value = value if math.isfinite(value) else None
                except ValueError:
                    value = None
            else:
                for i, c in enumerate(self.candidates(task)):
                    if squashed == re.sub(r"\s+", "", c).lower():
                        value = i
                        break
        if value is None:
            value = _leading_answer(task, text, self.candidates(task))
        if value is None:
            return float("nan") if task.is_regression else -1
        return float(value) if task.is_regression else int(value)

    @staticmethod
    def _label_ok(task: TaskSpec, label) -> bool:
        if label is None:
            return False
        if task.is_regression:
            return math.isfinite(float(label))
        return 0 <= int(label) < task.num_classes

    def _labels_tensor(self, examples: Sequence, tids: list[int], *, train: bool) -> tuple[torch.Tensor, list[bool]]:
        """("labels" `[B]` (long, or float with a regression task), per-example validity); raises DataError
        for unlabelled training rows."""
        ok = [self._label_ok(self.tasks[t], ex.label) for ex, t in zip(examples, tids)]
        if train and not all(ok):
            bad = next(ex for ex, good in zip(examples, ok) if not good)
            raise DataError(f"training example '{bad.uid}' of task '{bad.task}' has no valid label "
                            f"({bad.label!r})")
        any_reg = any(self.tasks[t].is_regression for t in tids)
        vals = []
        for ex, t, good in zip(examples, tids, ok):
            if good:
                vals.append(float(ex.label) if self.tasks[t].is_regression else int(ex.label))
            else:
                vals.append(float("nan") if self.tasks[t].is_regression else -1)
        dtype = torch.float32 if any_reg else torch.long
        return torch.tensor(vals, dtype=dtype), ok

    def _predictions_tensor(self, values: list, tids: torch.Tensor) -> torch.Tensor:
        """B predictions -> `[B]` (long, or float when any of the tasks `tids` `[B]` is a regression task)."""
        any_reg = any(self.tasks[int(t)].is_regression for t in tids)
        return torch.tensor(values, dtype=torch.float32 if any_reg else torch.long)

    # -- prompt plumbing --------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        dev = self.device
        return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _check_prompt(self, prompt: torch.Tensor, prompt_mask: torch.Tensor | None,
                      batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the prompt `[B, L, d]` and mask `[B, L]`, cast to the model's dtype/device and compact
        (`compact_prompt`); a missing mask means all ones (nothing to compact: the composition decided once
        that it never masks a token, `crosspt.run.model.CrossPTModel`)."""
        if prompt.dim() != 3 or prompt.shape[0] != batch_size or prompt.shape[2] != self.embed_dim:
            raise ValueError(f"prompt must be [B={batch_size}, L, d={self.embed_dim}], got {tuple(prompt.shape)}")
        prompt = prompt.to(device=self.device, dtype=self.dtype)
        if prompt_mask is None:
            return prompt, torch.ones(prompt.shape[:2], dtype=torch.long, device=self.device)
        if tuple(prompt_mask.shape) != tuple(prompt.shape[:2]):
            raise ValueError(f"prompt_mask must be {tuple(prompt.shape[:2])}, got {tuple(prompt_mask.shape)}")
        return compact_prompt(prompt, prompt_mask.to(device=self.device).long())

    # -- data -------------------------------------------------------------------------------
    def _token_ends(self, text: str) -> list[int]:
        """Character end offset of each token of `text` tokenised alone (no special tokens); whitespace
        words where the tokenizer gives no offsets (`fit_texts` re-renders and tightens either way)."""
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return [int(e) for _, e in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, TypeError, KeyError):
            return [m.end() for m in re.finditer(r"\S+", text)]

    def fit_input(self, task: TaskSpec, texts: Sequence[str], render, max_tokens: int | None = None) -> list[int]:
        """Token ids `render(texts)` of an example's formatted input within `max_tokens` (default
        `max_length`): the texts are cut, longest first, never the template (crosspt.tasks.formatting)."""
        texts = tuple(texts)
        if len(texts) != len(task.text_fields):
            raise ValueError(f"task '{task.name}' expects {len(task.text_fields)} texts "
                             f"({', '.join(task.text_fields)}), got {len(texts)}")
        return fit_texts(texts, render, self._token_ends, self.max_length if max_tokens is None else max_tokens,
                         what=f"task '{task.name}'")

    def fitted_ids(self, examples: Sequence, render) -> list[torch.Tensor]:
        """Per example, the token ids `[T_i]` of its formatted input: `render(task, texts)`, the texts cut to
        fit `max_length` (`fit_input`); computed once per example (`_per_example`). The families that feed
        one token sequence (seq2seq, decoder) differ only in `render` (special tokens)."""
        def ids(ex) -> torch.Tensor:
            task = self.tasks[self.task_id(ex.task)]
            return torch.tensor(self.fit_input(task, ex.texts, lambda ts: render(task, ts)), dtype=torch.long)
        return self._per_example(examples, lambda todo: [ids(ex) for ex in todo])

    def _per_example(self, examples: Sequence, encode) -> list:
        """`encode(examples)`'s value for each example (its token ids), computed once per example for the
        life of this backbone: a run tokenises each split once, not every batch of every epoch. Keyed by
        uid and texts (a uid names the same texts within a data folder; the texts guard against another)."""
        cache = self._token_cache
        keys = [(ex.uid, tuple(ex.texts)) for ex in examples]
        todo = list({k: ex for k, ex in zip(keys, examples) if k not in cache}.items())
        if todo:
            for (k, _), value in zip(todo, encode([ex for _, ex in todo])):
                cache[k] = value
        return [cache[k] for k in keys]

    def input_length(self, examples: Sequence) -> list[int]:
        """Per example, how long its input is (what its batch is padded to): characters here; families
        that cache token ids count tokens."""
        return [sum(len(t) for t in ex.texts) for ex in examples]

    def by_length(self, examples: Sequence) -> list:
        """`examples` shortest input first (`input_length`; ties in their given order): evaluation batches
        of like lengths carry little padding."""
        lengths = self.input_length(examples)
        return [examples[i] for i in sorted(range(len(examples)), key=lengths.__getitem__)]

    @abstractmethod
    def collate(self, examples: Sequence, *, train: bool) -> dict[str, torch.Tensor]:
        """Tokenise `crosspt.data.Example`s (mixed tasks allowed) into tensors.

        Always includes "task_ids" `[B]` (long) and "labels" `[B]` (long class index, or float for
        regression tasks)."""

    def input_embeds(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded main input `[B, T, d]` and its mask `[B, T]` (pooled by input-conditioned routers):
        the word embeddings of the collated "input_ids" (the encoder's first text of a bi-encoded pair)."""
        batch = self._to_device(batch)
        return self.word_embeddings()(batch["input_ids"]), batch["attention_mask"]

    # -- scoring ----------------------------------------------------------------------------
    @abstractmethod
    def loss(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean training loss (a scalar) of the batch with the soft prompt `[B, L, d]` (mask `[B, L]`) in place."""

    @abstractmethod
    def predict(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, batch: dict) -> torch.Tensor:
        """Predictions `[B]` with the prompt `[B, L, d]` (mask `[B, L]`) in place: class index (long) per
        example, or a float for regression tasks."""


class RankBackbone(Backbone):
    """A generative family (seq2seq, decoder): the soft prompt is PREPENDED to the embedded input, and
    classification ranks the candidate strings of a task by their log-likelihood (`candidate_scores`),
    or, with `generate=True`, decodes greedily and parses the text (`_generate`)."""

    def _prompted(self, prompt: torch.Tensor, prompt_mask: torch.Tensor | None,
                  batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt `[B, L, d]` (mask `[B, L]`) prepended to the embedded input `[B, T, d]`: embeddings
        `[B, L + T, d]` and mask `[B, L + T]`."""
        prompt, prompt_mask = self._check_prompt(prompt, prompt_mask, batch["input_ids"].shape[0])
        embeds = self.word_embeddings()(batch["input_ids"])
        return torch.cat([prompt, embeds], dim=1), torch.cat([prompt_mask, batch["attention_mask"].long()], dim=1)

    def format_text(self, task: TaskSpec, texts: Sequence[str]) -> str:
        """The text of an example's input as the family feeds it (before truncation)."""
        return _tasks.format_input(task, tuple(texts), self.with_prefix)

    def chat_head(self, task: TaskSpec, replaced: int = 0) -> str:
        """The text the family writes before the soft prompt ("": none; the decoder's chat template has one),
        less its last `replaced` tokens (`PROMPT_REPLACES_HEAD`)."""
        return ""

    def export_head(self, task: TaskSpec, replaced: int = 0) -> torch.Tensor:
        """The embeddings `[H, d]` of `chat_head(task, replaced)`, what a tool that can only prepend a prompt
        (PEFT) must put in front of the soft prompt to read the same sequence (`[0, d]`: nothing)."""
        return self.word_embeddings().weight[:0].detach()

    def head_tail_ids(self, n: int) -> list[list[int]] | None:
        """Per task, the token ids of the last `n` tokens the family writes before the soft prompt: what a
        prompt that takes their place starts as (`PROMPT_REPLACES_HEAD`). None: the family writes nothing
        there (only the decoder's chat template does)."""
        return None

    @abstractmethod
    def _input_ids(self, examples: Sequence) -> list[torch.Tensor]:
        """Per example, the token ids `[T_i]` of its formatted input as the family feeds it (`fitted_ids`
        with the family's special tokens)."""

    def input_length(self, examples: Sequence) -> list[int]:
        return [len(ids) for ids in self._input_ids(examples)]

    @abstractmethod
    def prompted_logits(self, prompt: torch.Tensor, prompt_mask: torch.Tensor | None, batch: dict,
                        **model_kw) -> torch.Tensor:
        """The frozen model's logits with the prompt `[B, L, d]` prepended (comparisons, PEFT export)."""

    @abstractmethod
    def candidate_scores(self, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                         batch: dict) -> list[torch.Tensor]:
        """Per example: summed log-likelihood `[C]` of each candidate string of its task."""

    @abstractmethod
    def _generate(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, batch: dict) -> torch.Tensor:
        """Greedily decoded and parsed predictions `[B]` (see `Backbone.parse_generated`)."""

    @torch.no_grad()
    def predict(self, prompt, prompt_mask, batch, *, generate: bool = False) -> torch.Tensor:
        """Predictions `[B]` for a prompt `[B, L, d]` (mask `[B, L]`): rank classification, or greedy
        decoding with `generate=True`."""
        if generate:
            return self._generate(prompt, prompt_mask, batch)
        return self._rank_predictions(batch["task_ids"], self.candidate_scores(prompt, prompt_mask, batch))

    @torch.no_grad()
    def predict_ranked_and_generated(self, prompt, prompt_mask, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ranked `[B]`, generated `[B]`) predictions for a prompt `[B, L, d]` (mask `[B, L]`); a family that
        can share the prompted input's forward pass between the two overrides this (the decoder)."""
        return self.predict(prompt, prompt_mask, batch), self.predict(prompt, prompt_mask, batch, generate=True)

    # rows * candidates * target length * vocab floats per scoring chunk (~256 MB in fp32)
    SCORE_BUDGET = 64_000_000

    def _scores_by_task(self, task_ids: list[int], floats_per_row, score_rows, *,
                        lengths: list[int] | None = None, max_rows: int | None = None) -> list:
        """Per example: the `[C]` scores of its task's candidates. Rows are grouped by task (one
        candidate set each) and scored in chunks that keep `floats_per_row(task) * rows` within
        SCORE_BUDGET (and at most `max_rows` rows); the family's `score_rows(task, rows) -> [n, C]` does the
        forward passes. With `lengths` (real input tokens per row) a task's rows are taken longest first, so a
        chunk holds rows of similar length and pads little (a family that drops all-padding columns per chunk
        then computes over about the real tokens only)."""
        scores: list[torch.Tensor | None] = [None] * len(task_ids)
        for t in sorted(set(task_ids)):
            rows = [i for i, x in enumerate(task_ids) if x == t]
            if lengths is not None:
                rows.sort(key=lambda i: -lengths[i])
            chunk = max(1, min(max_rows or len(rows), self.SCORE_BUDGET // max(1, floats_per_row(t))))
            for s in range(0, len(rows), chunk):
                part = rows[s:s + chunk]
                per = score_rows(t, torch.tensor(part, device=self.device))
                for k, i in enumerate(part):
                    scores[i] = per[k]
        return scores  # type: ignore[return-value]

    def _rank_predictions(self, task_ids: torch.Tensor, scores: list[torch.Tensor]) -> torch.Tensor:
        """Predictions `[B]` from per-example candidate scores (`[C]` each): the best-scoring candidate's class
        index, or its grid value for regression."""
        values = []
        for t, sc in zip(task_ids.tolist(), scores):
            task = self.tasks[t]
            best = int(sc.argmax())
            values.append(float(self.candidates(task)[best]) if task.is_regression else best)
        return self._predictions_tensor(values, task_ids)

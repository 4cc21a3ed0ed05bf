"""Decoder-only family (any AutoModelForCausalLM: GPT-2, Llama-style such as SmolLM2, ...).

Two ways to write an example (`backbone.template`, crosspt.backbones.chat): `chat`, the tokenizer's own chat
template (the default where it has one: a chat-tuned model is asked the way its users ask it), or `plain`.

Chat, per example: the task's head (the template up to the user turn, then the task's instruction, the same
for every example of a task) + [soft prompt] + `format_input(task, texts)` + the template's end of the user
turn and opening of the assistant's; the label is the assistant's answer, tokenised after that opening, then
the template's end-of-turn token (generation stops there). The head's embeddings go in front of the soft
prompt (`_placed`), so everything below treats [head, soft prompt] as the prompt.

A prompt initialised from the instruction (`prompt.init: text`, the decoder's default) TAKES THE PLACE of the
last L tokens of the head (L = the private prompt's length; SmolLM2's SST-2 instruction and its newline are 16
tokens): it starts as their embeddings (`head_tail_ids`) and they are left out of the head (the model says how
many, `PROMPT_REPLACES_HEAD`). The untrained prompt therefore reads exactly as the zero-shot conversation, and
training starts from the model's zero-shot answer instead of from the instruction written twice.

Plain, per example: `format_input(task, texts)` + ANSWER_CUE ("... sentence: X\\nanswer:"), then the label as the
tokenizer writes it right after the cue, then eos. Byte-level BPE and SentencePiece fold the space before a word
into the word's token (" positive" is one token, "positive" another), so a label is tokenised IN CONTEXT, after
the cue, and split off (`label_ids`). The cue marks where the answer goes: without it a chat-tuned LM continues
the sentence instead of answering (SmolLM2 zero-shot on SST-2 wrote "\\nThe film is a ..." for most rows). The
input is cut to `max_length` by its texts, longest first, never through the cue (crosspt.tasks.formatting).

Sequence layout, per row (chat: the head's ids left-padded to the longest head of the backbone's tasks):

    [chat head H?] [soft prompt L] [left padding] [bos?] [input ... answer:] [label tokens + eos] [right padding]

Inputs are LEFT-padded and label/candidate blocks RIGHT-padded, so every row's label starts at the same
column. Position ids are derived from the attention mask (cumsum - 1), so neither padding nor masked-out prompt
tokens shift the positions of the real tokens.

Shared work is done once, through the model's key/value cache (transformers' `cache`, `past_key_values` before 5):
- The soft prompt comes first, so its keys/values do not depend on the input: rows with the same prompt (one
  task's prompt under PT, or any deterministic router: every evaluation) run it as ONE sequence whose cache is
  indexed out to the rows; in training the gradient of the rows sums back through that index.
- The prompted input runs once per example: ranked scoring repeats its cache over the task's candidates and
  runs only the candidate tokens; generation extends it one token at a time; `predict_ranked_and_generated`
  serves both from the same pass.
- The vocabulary projection runs only where a next token is scored (`logits_to_keep`): the last input
  position (the first label token) and the label positions, never over the input.

Loss: token-mean cross entropy over label tokens only (the closing eos, under chat the end-of-turn token, included).
Predict: rank classification by the summed log-likelihood of each candidate's tokens (see the seq2seq module
for why summed); `generate=True` decodes greedily and parses the answer the text starts with
(`Backbone.parse_generated`).
"""
from __future__ import annotations

import copy
import inspect
from typing import Sequence

import torch
import torch.nn.functional as F

from crosspt.tasks import specs as _tasks
from crosspt.backbones.base import (PROMPT_REPLACES_HEAD, PROMPT_SHARED_BY_TASK, Family, RankBackbone,
                                    pad_sequences, positions_from_mask)
from crosspt.backbones.chat import ChatFormat, Template, resolve_template
from crosspt.errors import ConfigError, DataError
from crosspt.method.prompts import PromptInit

ANSWER_CUE = "\nanswer:"          # appended to every formatted input: where the label goes
_ANCHOR = ANSWER_CUE.strip()       # the label is tokenised after this, then split off
_EXTRA_GEN_TOKENS = 2              # greedy decoding may write this many tokens past the longest candidate
# On CPU, scoring chunks of at most this many rows, taken longest first: rows of similar length pad little (50 SST-2
# dev rows: 56 columns for 31.6 real tokens a row in one chunk). CPU compute is per token, padded or not, and the
# per-call overhead of 16 rows is small next to their forward pass; an accelerator prefers big batches.
_CPU_CHUNK_ROWS = 16


class DecoderBackbone(RankBackbone):
    family = Family.DECODER.value
    # the soft prompt starts as the task's instruction: a chat-tuned model reads it as words it knows
    default_init = PromptInit.TEXT.value

    def __init__(self, model, tokenizer, tasks, *, template: str = Template.AUTO.value, **kw):
        super().__init__(model, tokenizer, tasks, **kw)
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
        self.pad_id = next(i for i in (tok.pad_token_id, self.eos_id, 0) if i is not None)
        self.template = resolve_template(template, tok).value
        # does the tokenizer put a bos in front by itself (Llama) or not (GPT-2)? A chat template writes
        # whatever its model starts with itself
        with_sp = tok("a")["input_ids"]
        without = tok("a", add_special_tokens=False)["input_ids"]
        bos = tok.bos_token_id
        self._bos = [bos] if bos is not None and with_sp[:1] == [bos] and without[:1] != [bos] else []
        self._chat: list[ChatFormat] = []
        self.stop_id = self.eos_id                    # the token that ends an answer
        if self.template == Template.CHAT:
            self._bos = []
            self._chat = [ChatFormat.render(tok, _tasks.instruction_text(t, self.label_semantics))
                          for t in self.tasks]
            end = tok(self._chat[0].answer_end.strip(), add_special_tokens=False)["input_ids"]
            self.stop_id = end[0] if end else self.eos_id
            heads = [tok(c.head, add_special_tokens=False)["input_ids"] for c in self._chat]
            ids, mask = pad_sequences(heads, self.pad_id, side="left")
            # task id -> its head's ids / mask, indexed on the device (no host sync per batch)
            self.register_buffer("_head_ids", ids, persistent=False)
            self.register_buffer("_head_mask", mask, persistent=False)
        params = inspect.signature(self.model.forward).parameters
        self._takes_positions = "position_ids" in params
        self._takes_keep = "logits_to_keep" in params
        self._cache_arg = "cache" if "cache" in params else "past_key_values"   # renamed in transformers 5
        self._label_cache: dict[tuple[str, str], list[int]] = {}
        self._cand_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- tokenisation -----------------------------------------------------------------------
    def format_text(self, task, texts: Sequence[str]) -> str:
        """The text of an example's input after the soft prompt: the task's formatted texts, then the answer
        cue (plain) or the end of the user turn and the assistant's opening (chat)."""
        text = _tasks.format_input(task, tuple(texts), self.with_prefix)
        return text + (self._chat[self.task_id(task.name)].suffix if self._chat else ANSWER_CUE)

    def chat_head(self, task, replaced: int = 0) -> str:
        if not self._chat:
            return ""
        t = self.task_id(task.name)
        if not replaced:
            return self._chat[t].head
        return self.tokenizer.decode(self._head_tokens(t)[:-replaced].tolist())

    def _head_tokens(self, t: int) -> torch.Tensor:
        """Task `t`'s chat head token ids `[H_t]`: its row of the left-padded heads without the padding."""
        return self._head_ids[t][self._head_mask[t].bool()]

    def head_tail_ids(self, n: int) -> list[list[int]] | None:
        if not self._chat or n <= 0:
            return None
        heads = [self._head_tokens(t).tolist() for t in range(len(self.tasks))]
        short = [(t.name, len(h)) for t, h in zip(self.tasks, heads) if len(h) < n]
        if short:
            name, length = short[0]
            raise ConfigError(f"prompt.private_len {n} is longer than task '{name}'s chat head ({length} tokens), "
                              f"which a prompt initialised from the instruction takes the place of: use a shorter "
                              f"prompt, or prompt.init vocab")
        return [h[-n:] for h in heads]

    def label_ids(self, text: str, task_id: int = 0) -> list[int]:
        """Token ids of a label as it reads where the answer goes, plus the token that ends it: after the
        answer cue, space-prefixed, then eos (plain); the assistant's answer, then its end of turn (chat)."""
        anchor, sep = (self._chat[task_id].suffix, "") if self._chat else (_ANCHOR, " ")
        key = (anchor, text)
        if key not in self._label_cache:
            tok = self.tokenizer
            base = tok(anchor, add_special_tokens=False)["input_ids"]
            full = tok(f"{anchor}{sep}{text}", add_special_tokens=False)["input_ids"]
            ids = full[len(base):] if full[:len(base)] == base and len(full) > len(base) else \
                tok(sep + text, add_special_tokens=False)["input_ids"]
            self._label_cache[key] = list(ids) + ([self.stop_id] if self.stop_id is not None else [])
        return self._label_cache[key]

    def _input_ids(self, examples: Sequence) -> list[torch.Tensor]:
        """Per example, bos (if the model uses one) + the tokens of `format_text` `[T_i]`, its texts cut to fit
        `max_length`; computed once per example."""
        return self.fitted_ids(examples, lambda task, ts: self._bos + list(
            self.tokenizer(self.format_text(task, ts), add_special_tokens=False)["input_ids"]))

    def collate(self, examples: Sequence, *, train: bool) -> dict[str, torch.Tensor]:
        tids = [self.task_id(ex.task) for ex in examples]
        input_ids, mask = pad_sequences(self._input_ids(examples), self.pad_id, side="left")
        labels, ok = self._labels_tensor(examples, tids, train=train)
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "task_ids": torch.tensor(tids, dtype=torch.long), "labels": labels}
        if all(ok):
            tgt = [self.label_ids(_tasks.label_text(self.tasks[t], ex.label, self.label_semantics), t)
                   for ex, t in zip(examples, tids)]
            batch["target_ids"], batch["target_mask"] = pad_sequences(tgt, self.pad_id, side="right")
        return batch

    # -- core -------------------------------------------------------------------------------
    def _placed(self, prompt, prompt_mask, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The soft prompt `[B, L, d]` (mask `[B, L]` or None) as the model reads it: checked and compacted
        (`_check_prompt`), and under the chat template behind its task's head, less the head's last
        `batch[PROMPT_REPLACES_HEAD]` = r tokens that the prompt takes the place of: `[B, H - r + L, d]`, mask
        `[B, H - r + L]` (the head's left padding masked out)."""
        prompt, prompt_mask = self._check_prompt(prompt, prompt_mask, batch["input_ids"].shape[0])
        if not self._chat:
            return prompt, prompt_mask
        t = batch["task_ids"]
        # the heads are left-padded: dropping the last r columns drops each task's own last r tokens
        # (`head_tail_ids` refused an r longer than a head when the prompt was built)
        keep = self._head_ids.shape[1] - int(batch.get(PROMPT_REPLACES_HEAD, 0))
        head = self.word_embeddings()(self._head_ids[t, :keep]).to(prompt.dtype)
        return torch.cat([head, prompt], dim=1), torch.cat([self._head_mask[t, :keep], prompt_mask], dim=1)

    def _prompted(self, prompt, prompt_mask, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """[head?, prompt] (`_placed`) before the embedded input: `[B, H + L + T, d]`, mask `[B, H + L + T]`."""
        prompt, prompt_mask = self._placed(prompt, prompt_mask, batch)
        embeds = self.word_embeddings()(batch["input_ids"])
        return torch.cat([prompt, embeds], dim=1), torch.cat([prompt_mask, batch["attention_mask"].long()], dim=1)

    def export_head(self, task, replaced: int = 0) -> torch.Tensor:
        if not self._chat:
            return super().export_head(task)
        ids = self._head_tokens(self.task_id(task.name))
        return self.word_embeddings()(ids[:ids.numel() - replaced]).detach()

    def _run(self, x: torch.Tensor, mask: torch.Tensor, *, cache=None, keep: int = 0, use_cache: bool = False):
        """The model on embeddings `x` `[N, T, d]` placed after what `cache` holds; `mask` `[N, S]` covers both
        (S = cached + T). -> (logits `[N, keep, V]` of the last `keep` positions (0: all T), the cache after
        this call or None). A passed cache is extended in place."""
        kw = {"inputs_embeds": x, "attention_mask": mask, "use_cache": use_cache or cache is not None}
        if cache is not None:
            kw[self._cache_arg] = cache
        if self._takes_positions:
            kw["position_ids"] = positions_from_mask(mask)[:, -x.shape[1]:]
        if self._takes_keep and keep:
            kw["logits_to_keep"] = keep
        out = self.model(**kw)
        logits = out.logits[:, -keep:] if keep else out.logits
        if not kw["use_cache"]:
            return logits, None
        new = getattr(out, "cache", None)
        return logits, new if new is not None else getattr(out, "past_key_values", None)

    def _prompt_cache(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, task_ids: torch.Tensor,
                      shared_by_task: bool = False):
        """Key/value cache over N rows of the soft prompt `[N, L, d]` (mask `[N, L]`, tasks `[N]`); None when L == 0.

        Rows of the SAME task with equal prompt and mask are run once and the cache indexed out to them. The
        gradient of such a group reaches its first row only, as the sum of the group's: the prompt module
        builds a task's rows from the same parameters by the same function, so equal values have equal
        Jacobians and the parameters receive exactly what per-row passes would give them (for PT, a
        `prompts[task_ids]` gather, trivially). Rows of different tasks never merge, even when equal (tasks
        whose prompts start from the same init).

        Not by value while training (grad enabled): finding the equal rows puts their count on the host
        (`unique` and a scalar read: two host syncs per step, the step could not be queued ahead of the
        device). There the caller says whether a task's rows share its prompt (`shared_by_task`, from the
        prompt module: PT, one candidate): then one row per task is found on the device with a static shape
        (n_tasks slots; an absent task's slot runs a spare row nobody reads) and no sync. Otherwise (a router's
        per-example draws make a CrossPT batch's rows differ anyway) every row gets its own pass."""
        N, L = prompt.shape[:2]
        if L == 0:
            return None
        if torch.is_grad_enabled():
            n_tasks = len(self.tasks)
            if not shared_by_task or n_tasks >= N:
                return self._run(prompt, prompt_mask, keep=1, use_cache=True)[1]
            first = torch.full((n_tasks,), N, dtype=torch.long, device=prompt.device).scatter_reduce(
                0, task_ids, torch.arange(N, device=prompt.device), reduce="amin").clamp(max=N - 1)
            cache = self._run(prompt[first], prompt_mask[first], keep=1, use_cache=True)[1]
            cache.batch_select_indices(task_ids)
            return cache
        with torch.no_grad():
            rows = torch.cat([task_ids.view(N, 1).float(), prompt.detach().flatten(1).float(), prompt_mask.float()],
                             dim=1)
            _, inverse = torch.unique(rows, dim=0, return_inverse=True)
        n_distinct = int(inverse.max()) + 1
        if n_distinct == N:
            return self._run(prompt, prompt_mask, keep=1, use_cache=True)[1]
        first = torch.full((n_distinct,), N, dtype=torch.long, device=prompt.device).scatter_reduce(
            0, inverse, torch.arange(N, device=prompt.device), reduce="amin")    # one row per distinct prompt
        cache = self._run(prompt[first], prompt_mask[first], keep=1, use_cache=True)[1]
        cache.batch_select_indices(inverse)
        return cache

    def _prefix(self, prompt, prompt_mask, input_ids, input_mask, task_ids):
        """One pass over the prompted inputs (prompt `[N, L, d]`, ids `[N, T]`, tasks `[N]`): (their cache, mask
        `[N, L + T]`, log-probs `[N, V]` of the token after the input)."""
        cache = self._prompt_cache(prompt, prompt_mask, task_ids)
        m = torch.cat([prompt_mask, input_mask.long()], dim=1)
        logits, cache = self._run(self.word_embeddings()(input_ids), m, cache=cache, keep=1, use_cache=True)
        return cache, m, F.log_softmax(logits[:, -1].float(), dim=-1)

    def _rows_prefix(self, prompt, prompt_mask, batch, r: torch.Tensor):
        """`_prefix` of the batch rows `r`, without the columns that are padding in every one of them."""
        ids, im = batch["input_ids"][r], batch["attention_mask"][r]
        cols = im.any(0)
        return self._prefix(prompt[r], prompt_mask[r], ids[:, cols], im[:, cols], batch["task_ids"][r])

    def prompted_logits(self, prompt, prompt_mask, batch, **model_kw) -> torch.Tensor:
        """Logits `[B, T, V]` over the input positions, with the prompt `[B, L, d]` prepended."""
        batch = self._to_device(batch)
        x, m = self._prompted(prompt, prompt_mask, batch)
        T = batch["input_ids"].shape[1]
        kw = {"inputs_embeds": x, "attention_mask": m, "use_cache": False, **model_kw}
        if self._takes_positions:
            kw["position_ids"] = positions_from_mask(m)
        if self._takes_keep:
            kw["logits_to_keep"] = T
        return self.model(**kw).logits[:, -T:]

    def _label_logprobs(self, prompt, prompt_mask, input_ids, input_mask, label_ids, label_mask, task_ids,
                        shared_by_task: bool = False):
        """Token log-probs `[N, T_l]` (0 at padding) of right-padded labels `[N, T_l]` after the prompted inputs."""
        emb = self.word_embeddings()
        cache = self._prompt_cache(prompt, prompt_mask, task_ids, shared_by_task)
        x = torch.cat([emb(input_ids), emb(label_ids)], dim=1)
        m = torch.cat([prompt_mask, input_mask.long(), label_mask.long()], dim=1)
        T_l = label_ids.shape[1]
        logits, _ = self._run(x, m, cache=cache, keep=T_l + 1)       # position p predicts token p+1
        logp = F.log_softmax(logits[:, :T_l].float(), dim=-1)
        tok = logp.gather(-1, label_ids.unsqueeze(-1)).squeeze(-1)
        return torch.where(label_mask.bool(), tok, torch.zeros_like(tok))

    def loss(self, prompt, prompt_mask, batch) -> torch.Tensor:
        """Token-mean cross entropy (a scalar) over the label tokens, prompt `[B, L, d]` prepended. Rows of one
        task with equal prompts share one pass over the prompt (`_prompt_cache`: their gradient is summed into
        the first of them)."""
        batch = self._to_device(batch)
        if "target_ids" not in batch:
            raise DataError("batch has no targets (unlabelled examples?): collate labelled examples for the loss")
        prompt, prompt_mask = self._placed(prompt, prompt_mask, batch)
        tok = self._label_logprobs(prompt, prompt_mask, batch["input_ids"], batch["attention_mask"],
                                   batch["target_ids"], batch["target_mask"], batch["task_ids"],
                                   bool(batch.get(PROMPT_SHARED_BY_TASK)))
        n = batch["target_mask"].sum().clamp(min=1)
        return -tok.sum() / n + self._head_zero()

    # -- scoring ----------------------------------------------------------------------------
    def _candidates(self, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A task's right-padded candidate label ids `[C, T_c]` and mask `[C, T_c]` (cached)."""
        if task_id not in self._cand_cache:
            ids = [self.label_ids(c, task_id) for c in self.candidates(self.tasks[task_id])]
            self._cand_cache[task_id] = pad_sequences(ids, self.pad_id, side="right")
        ids, mask = self._cand_cache[task_id]
        return ids.to(self.device), mask.to(self.device)

    def _rank_from(self, cache, m: torch.Tensor, first: torch.Tensor, task_id: int) -> torch.Tensor:
        """Summed log-likelihoods `[n, C]` of the task's candidates after a prefix (`_prefix`: its cache over n
        rows, mask `[n, S]`, next-token log-probs `[n, V]`). Consumes the cache (repeated over the candidates)."""
        cand, cmask = self._candidates(task_id)                 # [C, Tc]
        C, Tc = cand.shape
        n = m.shape[0]
        scores = first[:, cand[:, 0]]                           # the first token's log-prob comes with the prefix
        if Tc == 1:
            return scores
        cache.batch_repeat_interleave(C)                        # row k*C + c = candidate c of example k
        x = self.word_embeddings()(cand[:, :-1]).repeat(n, 1, 1)
        mm = torch.cat([m.repeat_interleave(C, dim=0), cmask[:, :-1].repeat(n, 1)], dim=1)
        logits, _ = self._run(x, mm, cache=cache)               # [n*C, Tc-1, V]: position j predicts token j+1
        rest, rmask = cand[:, 1:].repeat(n, 1), cmask[:, 1:].repeat(n, 1).bool()
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, rest.unsqueeze(-1)).squeeze(-1)
        return scores + torch.where(rmask, logp, torch.zeros_like(logp)).sum(-1).view(n, C)

    def _greedy_from(self, cache, m: torch.Tensor, first: torch.Tensor, steps: int) -> list[list[int]]:
        """Greedy continuation (token ids per row, up to eos or `steps` tokens) of a prefix (`_prefix`: cache over
        n rows, mask `[n, S]`, next-token log-probs `[n, V]`). Extends the cache."""
        emb = self.word_embeddings()
        nxt = first.argmax(-1)
        out = [nxt]
        done = nxt == self.stop_id if self.stop_id is not None else torch.zeros_like(nxt, dtype=torch.bool)
        ones = torch.ones(m.shape[0], 1, dtype=m.dtype, device=m.device)
        for _ in range(steps - 1):
            if bool(done.all()):
                break
            m = torch.cat([m, ones], dim=1)
            logits, cache = self._run(emb(nxt).unsqueeze(1), m, cache=cache, keep=1, use_cache=True)
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
            if self.stop_id is not None:
                done |= nxt == self.stop_id
        return torch.stack(out, 1).tolist()

    def _parsed(self, task_id: int, generated: list[list[int]]) -> list[float | int]:
        """Generated token ids per row, cut where the answer ends (eos; chat: the end of the assistant's turn),
        decoded and parsed (`parse_generated`)."""
        values = []
        for ids in generated:
            if self.stop_id is not None and self.stop_id in ids:
                ids = ids[:ids.index(self.stop_id)]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            values.append(self.parse_generated(self.tasks[task_id], text))
        return values

    def _gen_steps(self, task_id: int) -> int:
        return self._candidates(task_id)[0].shape[1] + _EXTRA_GEN_TOKENS

    def _floats_per_row(self, width: int):
        """Floats one row of a task costs in a scoring chunk: candidate logits and the cache repeated over the
        candidates (the prompted input is `width` tokens)."""
        cfg = self.model.config
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 1
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or self.embed_dim // heads
        kv = 2 * layers * kv_heads * head_dim
        vocab = self.model.get_output_embeddings().weight.shape[0]

        def floats(t: int) -> int:
            C, Tc = self._candidates(t)[0].shape
            return C * (Tc * vocab + (width + Tc + _EXTRA_GEN_TOKENS) * kv)
        return floats

    def _by_task(self, prompt, prompt_mask, batch, rows_fn) -> list:
        """`rows_fn(task, prefix) -> per-row values` over the batch grouped by task, in scoring chunks."""
        batch = self._to_device(batch)
        prompt, prompt_mask = self._placed(prompt, prompt_mask, batch)
        width = prompt.shape[1] + batch["input_ids"].shape[1]
        return self._scores_by_task(batch["task_ids"].tolist(), self._floats_per_row(width),
                                    lambda t, r: rows_fn(t, self._rows_prefix(prompt, prompt_mask, batch, r)),
                                    lengths=batch["attention_mask"].sum(1).tolist(),
                                    max_rows=_CPU_CHUNK_ROWS if self.device.type == "cpu" else None)

    @torch.no_grad()
    def candidate_scores(self, prompt, prompt_mask, batch) -> list[torch.Tensor]:
        """Per example: summed log-likelihood `[C]` of each candidate string of its task."""
        return self._by_task(prompt, prompt_mask, batch, lambda t, pre: self._rank_from(*pre, t))

    @torch.no_grad()
    def _generate(self, prompt, prompt_mask, batch) -> torch.Tensor:
        """Greedy decoding after the prompted input, from its cache; parsed predictions `[B]`."""
        values = self._by_task(prompt, prompt_mask, batch,
                               lambda t, pre: self._parsed(t, self._greedy_from(*pre, self._gen_steps(t))))
        return self._predictions_tensor(values, batch["task_ids"])

    @torch.no_grad()
    def predict_ranked_and_generated(self, prompt, prompt_mask, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ranked `[B]`, generated `[B]`) predictions from ONE pass over each prompted input: generation
        continues a copy of the prefix cache that ranking repeats over the candidates."""
        def both(t, pre):
            cache, m, first = pre
            generated = self._parsed(t, self._greedy_from(copy.deepcopy(cache), m, first, self._gen_steps(t)))
            return list(zip(self._rank_from(cache, m, first, t), generated))

        pairs = self._by_task(prompt, prompt_mask, batch, both)
        tids = batch["task_ids"]
        return (self._rank_predictions(tids, [p[0] for p in pairs]),
                self._predictions_tensor([p[1] for p in pairs], tids))

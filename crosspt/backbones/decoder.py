"""Decoder-only family (any AutoModelForCausalLM: GPT-2, Llama-style, ...).

Sequence layout, per row:

    [soft prompt L] [left padding] [bos?] [format_input tokens] [label tokens + eos] [right padding]

Inputs are LEFT-padded and label/candidate blocks RIGHT-padded, so every row's label starts at the
same column `L + T_in`: the logits needed are one contiguous slice at the end (`logits_to_keep`
where the model supports it, so the vocabulary projection runs on the label block only).
Position ids are derived from the attention mask (cumsum - 1), so neither padding nor masked-out
prompt tokens shift the positions of the real tokens.

Loss: token-mean cross entropy over label tokens only (the eos included).
Predict: rank classification by the summed log-likelihood of each candidate's tokens (see the
seq2seq module for why summed), one forward per (example, candidate) pair, chunked;
`generate=True` decodes greedily (no KV cache; labels are a few tokens) and parses the text.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F

from crosspt.tasks import specs as _tasks
from crosspt.backbones.base import Family, RankBackbone, pad_sequences, positions_from_mask
from crosspt.errors import DataError

_ANCHOR = "answer:"


class DecoderBackbone(RankBackbone):
    family = Family.DECODER.value

    def __init__(self, model, tokenizer, tasks, **kw):
        super().__init__(model, tokenizer, tasks, **kw)
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
        self.pad_id = next(i for i in (tok.pad_token_id, self.eos_id, 0) if i is not None)
        # does the tokenizer put a bos in front by itself (Llama) or not (GPT-2)?
        with_sp = tok("a")["input_ids"]
        without = tok("a", add_special_tokens=False)["input_ids"]
        bos = tok.bos_token_id
        self._bos = [bos] if bos is not None and with_sp[:1] == [bos] and without[:1] != [bos] else []
        params = inspect.signature(self.model.forward).parameters
        self._takes_positions = "position_ids" in params
        self._takes_keep = "logits_to_keep" in params
        self._label_cache: dict[str, list[int]] = {}
        self._cand_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- tokenisation -----------------------------------------------------------------------
    def label_ids(self, text: str) -> list[int]:
        """Token ids of a label as it reads after the input (space-prefixed), plus eos."""
        if text not in self._label_cache:
            tok = self.tokenizer
            base = tok(_ANCHOR, add_special_tokens=False)["input_ids"]
            full = tok(f"{_ANCHOR} {text}", add_special_tokens=False)["input_ids"]
            ids = full[len(base):] if full[:len(base)] == base and len(full) > len(base) else \
                tok(" " + text, add_special_tokens=False)["input_ids"]
            self._label_cache[text] = list(ids) + ([self.eos_id] if self.eos_id is not None else [])
        return self._label_cache[text]

    def _input_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._bos + list(ids)[: max(1, self.max_length - len(self._bos))]

    def collate(self, examples: Sequence, *, train: bool) -> dict[str, torch.Tensor]:
        tids = [self.task_id(ex.task) for ex in examples]
        ins = [self._input_ids(_tasks.format_input(self.tasks[t], tuple(ex.texts), self.with_prefix))
               for ex, t in zip(examples, tids)]
        input_ids, mask = pad_sequences(ins, self.pad_id, side="left")
        labels, ok = self._labels_tensor(examples, tids, train=train)
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "task_ids": torch.tensor(tids, dtype=torch.long), "labels": labels}
        if all(ok):
            tgt = [self.label_ids(_tasks.label_text(self.tasks[t], ex.label, self.label_semantics))
                   for ex, t in zip(examples, tids)]
            batch["target_ids"], batch["target_mask"] = pad_sequences(tgt, self.pad_id, side="right")
        return batch

    # -- core -------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, m: torch.Tensor, keep: int, **model_kw) -> torch.Tensor:
        """Logits `[N, keep, V]` of the last `keep` positions of embeddings `x` `[N, S, d]` (mask `m` `[N, S]`)."""
        kw = {"inputs_embeds": x, "attention_mask": m, "use_cache": False, **model_kw}
        if self._takes_positions:
            kw["position_ids"] = positions_from_mask(m)
        if self._takes_keep:
            kw["logits_to_keep"] = keep
        logits = self.model(**kw).logits
        return logits[:, -keep:]

    def prompted_logits(self, prompt, prompt_mask, batch, **model_kw) -> torch.Tensor:
        """Logits `[B, T, V]` over the input positions, with the prompt `[B, L, d]` prepended."""
        batch = self._to_device(batch)
        x, m = self._prompted(prompt, prompt_mask, batch)
        return self._forward(x, m, batch["input_ids"].shape[1], **model_kw)

    def _label_logprobs(self, prompt, prompt_mask, input_ids, input_mask, label_ids, label_mask):
        """Token log-probs `[N, T_l]` (0 at padding) of right-padded labels after the inputs."""
        emb = self.word_embeddings()
        x = torch.cat([prompt, emb(input_ids), emb(label_ids)], dim=1)
        m = torch.cat([prompt_mask, input_mask.long(), label_mask.long()], dim=1)
        T_l = label_ids.shape[1]
        logits = self._forward(x, m, T_l + 1)[:, :T_l]           # position p predicts token p+1
        logp = F.log_softmax(logits.float(), dim=-1)
        tok = logp.gather(-1, label_ids.unsqueeze(-1)).squeeze(-1)
        return tok * label_mask.to(tok.dtype)

    def loss(self, prompt, prompt_mask, batch) -> torch.Tensor:
        """Token-mean cross entropy (a scalar) over the label tokens, prompt `[B, L, d]` prepended."""
        batch = self._to_device(batch)
        if "target_ids" not in batch:
            raise DataError("batch has no targets (unlabelled examples?): collate labelled examples for the loss")
        prompt, prompt_mask = self._check_prompt(prompt, prompt_mask, batch["input_ids"].shape[0])
        tok = self._label_logprobs(prompt, prompt_mask, batch["input_ids"], batch["attention_mask"],
                                   batch["target_ids"], batch["target_mask"])
        n = batch["target_mask"].sum().clamp(min=1)
        return -tok.sum() / n + self._head_zero()

    def _candidates(self, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A task's right-padded candidate label ids `[C, T_c]` and mask `[C, T_c]` (cached)."""
        if task_id not in self._cand_cache:
            ids = [self.label_ids(c) for c in self.candidates(self.tasks[task_id])]
            self._cand_cache[task_id] = pad_sequences(ids, self.pad_id, side="right")
        ids, mask = self._cand_cache[task_id]
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def candidate_scores(self, prompt, prompt_mask, batch) -> list[torch.Tensor]:
        """Per example: summed log-likelihood `[C]` of each candidate string of its task."""
        batch = self._to_device(batch)
        prompt, prompt_mask = self._check_prompt(prompt, prompt_mask, batch["input_ids"].shape[0])
        vocab = self.model.get_output_embeddings().weight.shape[0]

        def score_rows(t: int, r: torch.Tensor) -> torch.Tensor:
            cand, cmask = self._candidates(t)
            C, n = cand.shape[0], len(r)
            ids, im = batch["input_ids"][r], batch["attention_mask"][r]
            keep = im.any(0)                             # drop columns that are padding in every row
            ids, im = ids[:, keep], im[:, keep]
            tok = self._label_logprobs(
                prompt[r].repeat_interleave(C, 0), prompt_mask[r].repeat_interleave(C, 0),
                ids.repeat_interleave(C, 0), im.repeat_interleave(C, 0), cand.repeat(n, 1), cmask.repeat(n, 1))
            return tok.sum(-1).view(n, C)

        def floats_per_row(t: int) -> int:
            C, Tc = self._candidates(t)[0].shape
            return C * (Tc + 1) * vocab

        return self._scores_by_task(batch["task_ids"].tolist(), floats_per_row, score_rows)

    def _generate(self, prompt, prompt_mask, batch) -> torch.Tensor:
        """Greedy decoding after the prompted input `[B, L + T, d]`, up to eos; parsed predictions `[B]`."""
        batch = self._to_device(batch)
        tids = batch["task_ids"].tolist()
        longest = max(self._candidates(t)[0].shape[1] for t in set(tids))
        emb = self.word_embeddings()
        x, m = self._prompted(prompt, prompt_mask, batch)
        B = x.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        out = []
        for _ in range(longest + 1):
            nxt = self._forward(x, m, 1)[:, -1].argmax(-1)
            out.append(nxt)
            if self.eos_id is not None:
                done |= nxt == self.eos_id
            if bool(done.all()):
                break
            x = torch.cat([x, emb(nxt).unsqueeze(1)], dim=1)
            m = torch.cat([m, torch.ones(B, 1, dtype=m.dtype, device=m.device)], dim=1)
        gen = torch.stack(out, 1).tolist()
        values = []
        for t, ids in zip(tids, gen):
            if self.eos_id is not None and self.eos_id in ids:
                ids = ids[:ids.index(self.eos_id)]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            values.append(self.parse_generated(self.tasks[t], text))
        return self._predictions_tensor(values, batch["task_ids"])

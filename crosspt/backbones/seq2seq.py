"""Seq2seq family (T5ForConditionalGeneration and other encoder-decoder LMs).

Input:  `format_input(task, texts, with_prefix)` tokenised (with the tokenizer's eos; cut to `max_length`
        by its texts, longest first, never by its end: crosspt.tasks.formatting), embedded by
        the frozen word embeddings; the soft prompt is prepended (placement `before`, the default) or
        appended after the input's eos (`after`), and the mask extended. After the input, the padding
        of shorter inputs is moved to the front of the whole encoder sequence (`compact_prompt`), so the
        prompt sits right after every example's last real token: T5's relative position buckets then
        see the same input-to-prompt distances whatever the batch's longest input.
Target: `label_text(task, label, semantics)` tokenised (with eos), padding -> -100.
Loss:   the model's teacher-forced token-mean cross entropy.
Predict (rank classification): every candidate string of the example's task (label words, or the
        0.2-step score grid for regression) is scored by its SUMMED token log-likelihood under
        teacher forcing; argmax wins. The encoder runs once per example and its outputs are expanded
        over the candidates. Summed (not mean) log-likelihood is log P(candidate | input), the quantity
        the training loss raises; a per-token mean would favour long candidates whose later tokens are
        nearly free once the first is chosen (e.g. "not_entailment" over "entailment").
        `predict(..., generate=True)` decodes greedily instead and parses the text (-1 / nan when
        the text is no candidate).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from crosspt.tasks import specs as _tasks
from crosspt.backbones.base import Family, Placement, RankBackbone, compact_prompt, pad_sequences
from crosspt.errors import DataError


class Seq2SeqBackbone(RankBackbone):
    family = Family.SEQ2SEQ.value

    def __init__(self, model, tokenizer, tasks, placement: str = Placement.BEFORE.value, **kw):
        super().__init__(model, tokenizer, tasks, **kw)
        if placement not in (Placement.BEFORE, Placement.AFTER):
            raise ValueError(f"seq2seq prompt placement must be 'before' or 'after', got '{placement}'")
        self.placement = placement
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cand_cache: dict[int, tuple[torch.Tensor, list[str]]] = {}
        self._target_cache: dict[str, torch.Tensor] = {}       # target text -> ids `[T]` (`_targets`)

    def _prompted(self, prompt, prompt_mask, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input `[B, L + T, d]` and mask `[B, L + T]`: the prompt `[B, L, d]` (mask `[B, L]`)
        before the embedded input, or after it with all padding moved to the front (module docstring)."""
        if self.placement == Placement.BEFORE:
            return super()._prompted(prompt, prompt_mask, batch)
        prompt, prompt_mask = self._check_prompt(prompt, prompt_mask, batch["input_ids"].shape[0])
        embeds = self.word_embeddings()(batch["input_ids"])
        return compact_prompt(torch.cat([embeds, prompt.to(embeds.dtype)], dim=1),
                              torch.cat([batch["attention_mask"].long(), prompt_mask.long()], dim=1))

    # -- data -------------------------------------------------------------------------------
    def _targets(self, texts: list[str]) -> torch.Tensor:
        """Target token ids `[N, T_t]` of N texts (with eos), padding -> -100 (ignored by the loss); each
        distinct text tokenised once (label words repeat in every batch)."""
        cache = self._target_cache
        todo = sorted({t for t in texts if t not in cache})
        if todo:
            for t, ids in zip(todo, self.tokenizer(todo)["input_ids"]):
                cache[t] = torch.tensor(ids, dtype=torch.long)
        ids, _ = pad_sequences([cache[t] for t in texts], -100, side=self.tokenizer.padding_side)
        return ids

    def _input_ids(self, examples: Sequence) -> list[torch.Tensor]:
        """Each example's token ids `[T_i]` (with the tokenizer's eos) of its formatted input, its texts cut to
        fit `max_length` longest first (the tokenizer's own truncation would cut the end of the string, i.e.
        the second text); computed once per example."""
        return self.fitted_ids(examples, lambda task, ts: list(self.tokenizer(self.format_text(task, ts))["input_ids"]))

    def collate(self, examples: Sequence, *, train: bool) -> dict[str, torch.Tensor]:
        tids = [self.task_id(ex.task) for ex in examples]
        # each example's ids fitted on its own (cached), padded on the right like the tokenizer's batch
        input_ids, mask = pad_sequences(self._input_ids(examples), self.pad_id, side="right")
        labels, ok = self._labels_tensor(examples, tids, train=train)
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "task_ids": torch.tensor(tids, dtype=torch.long), "labels": labels}
        if all(ok):
            batch["target_ids"] = self._targets(
                [_tasks.label_text(self.tasks[t], ex.label, self.label_semantics)
                 for ex, t in zip(examples, tids)])
        return batch

    # -- scoring ----------------------------------------------------------------------------
    def loss(self, prompt, prompt_mask, batch) -> torch.Tensor:
        """Teacher-forced token-mean cross entropy (a scalar) with the prompt `[B, L, d]` prepended."""
        batch = self._to_device(batch)
        if "target_ids" not in batch:
            raise DataError("batch has no targets (unlabelled examples?): collate labelled examples for the loss")
        x, m = self._prompted(prompt, prompt_mask, batch)
        out = self.model(inputs_embeds=x, attention_mask=m, labels=batch["target_ids"])
        return out.loss + self._head_zero()

    def prompted_logits(self, prompt, prompt_mask, batch, **model_kw) -> torch.Tensor:
        """Decoder logits `[B, T_dec, V]` with the prompt `[B, L, d]` prepended to the encoder input;
        `model_kw` carries the decoder side (`decoder_input_ids` `[B, T_dec]`)."""
        batch = self._to_device(batch)
        x, m = self._prompted(prompt, prompt_mask, batch)
        return self.model(inputs_embeds=x, attention_mask=m, **model_kw).logits

    def _candidate_ids(self, task_id: int) -> tuple[torch.Tensor, list[str]]:
        """A task's candidate target ids `[C, T_c]` (pad -100, cached) and the candidate strings."""
        if task_id not in self._cand_cache:
            cands = self.candidates(self.tasks[task_id])
            self._cand_cache[task_id] = (self._targets(cands), cands)
        ids, cands = self._cand_cache[task_id]
        return ids.to(self.device), cands

    def _decoder_inputs(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder input ids `[N, T]` for labels `[N, T]`: shifted right behind the start token, -100 -> pad."""
        if hasattr(self.model, "prepare_decoder_input_ids_from_labels"):
            return self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        start = self.model.config.decoder_start_token_id
        pad = self.model.config.pad_token_id
        shifted = labels.new_full(labels.shape, start)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, pad)

    @torch.no_grad()
    def candidate_scores(self, prompt, prompt_mask, batch) -> list[torch.Tensor]:
        """Per example: summed log-likelihood `[C]` of each candidate string of its task."""
        batch = self._to_device(batch)
        x, m = self._prompted(prompt, prompt_mask, batch)
        hidden = self.model.get_encoder()(inputs_embeds=x, attention_mask=m).last_hidden_state
        vocab = self.model.get_output_embeddings().weight.shape[0]

        def score_rows(t: int, r: torch.Tensor) -> torch.Tensor:
            cand, _ = self._candidate_ids(t)             # [C, Tc], pad = -100
            C, n = cand.shape[0], len(r)
            enc = BaseModelOutput(last_hidden_state=hidden[r].repeat_interleave(C, dim=0))
            labels = cand.repeat(n, 1)                   # row k*C + c = candidate c of example k
            out = self.model(encoder_outputs=enc, attention_mask=m[r].repeat_interleave(C, dim=0),
                             decoder_input_ids=self._decoder_inputs(labels))
            logp = F.log_softmax(out.logits.float(), dim=-1)
            tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return tok.masked_fill(labels == -100, 0.0).sum(-1).view(n, C)

        return self._scores_by_task(batch["task_ids"].tolist(),
                                    lambda t: self._candidate_ids(t)[0].numel() * vocab, score_rows)

    def _generate(self, prompt, prompt_mask, batch) -> torch.Tensor:
        """Greedy `generate` from the prompted encoder input; parsed predictions `[B]`."""
        batch = self._to_device(batch)
        x, m = self._prompted(prompt, prompt_mask, batch)
        tids = batch["task_ids"].tolist()
        longest = max(self._candidate_ids(t)[0].shape[1] for t in set(tids))
        out = self.model.generate(inputs_embeds=x, attention_mask=m, max_new_tokens=longest + 2,
                                  do_sample=False, num_beams=1)
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        values = [self.parse_generated(self.tasks[t], s) for t, s in zip(tids, texts)]
        return self._predictions_tensor(values, batch["task_ids"])

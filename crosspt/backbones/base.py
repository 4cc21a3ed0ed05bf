"""The interface every backbone family implements.

A backbone owns a frozen HF model and its tokenizer. It never knows how prompts are composed:
it receives an already-composed soft prompt `[B, L, d]` with its mask `[B, L]`, prepends it to the
input embeddings and extends the attention mask. Trainable per-task pieces a family needs (encoder
class vectors, regression heads) live here as one tensor indexed by task id.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import torch
from torch import nn

from crosspt.tasks import TaskSpec


class Backbone(nn.Module, ABC):
    family: ClassVar[str]          # "seq2seq" | "encoder" | "decoder"

    def __init__(self, model: nn.Module, tokenizer, tasks: Sequence[TaskSpec], *,
                 label_semantics: str = "natural", with_prefix: bool = True, max_length: int = 128):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.tasks = list(tasks)          # index == task id
        self.label_semantics = label_semantics
        self.with_prefix = with_prefix
        self.max_length = max_length
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    # -- shapes -----------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.word_embeddings().embedding_dim

    def word_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()                 # frozen backbone: no dropout, ever
        return self

    # -- data -------------------------------------------------------------------------------
    @abstractmethod
    def collate(self, examples: Sequence, *, train: bool) -> dict[str, torch.Tensor]:
        """Tokenise `crosspt.data.Example`s (mixed tasks allowed) into tensors.

        Always includes "task_ids" (LongTensor[B]) and "labels" (LongTensor class index, or
        FloatTensor for regression tasks)."""

    @abstractmethod
    def input_embeds(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded main input `[B, T, d]` and its mask `[B, T]` (pooled by input-conditioned routers)."""

    # -- scoring ----------------------------------------------------------------------------
    @abstractmethod
    def loss(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean training loss of the batch with the soft prompt prepended."""

    @abstractmethod
    def predict(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, batch: dict) -> torch.Tensor:
        """Predictions `[B]`: class index (long) per example, or a float for regression tasks."""

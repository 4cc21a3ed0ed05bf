"""Prompt modules the baselines need besides our `CrossPTPrompt`: an empty prompt (zero-shot), a fixed
stored prompt (a promoted CrossPT prompt in the speed mode), and PEFT's own prompt embeddings.

All of them have `CrossPTPrompt`'s interface (`spec`, `forward(task_ids) -> (prompt, mask, weights)`,
`collapsed`, `param_groups`, ...), so `CrossPTModel`, the training loop and the backbones take them
unchanged: a baseline is a different prompt source in front of the same backbone, not a patched model.

Why PEFT's prompt is a prompt source and not a wrapped backbone: PEFT's prompt tuning is an embedding
table of virtual tokens (`PromptEmbedding`, or `MultitaskPromptEmbedding` for MPT) whose output PEFT
concatenates with the input embeddings. Calling that table ourselves keeps PEFT's parametrisation and
initialisation (SAMPLE_VOCAB, MPT's AVERAGE_SOURCE_TASKS) and lets our adapters score the result like
every other row. Where PEFT puts it differs by family: on the seq2seq / decoder families PEFT prepends it
to the input, as our adapters do; on the encoder, PeftModelForFeatureExtraction puts it before [CLS] and
leaves the position ids to the model, which our encoder reproduces with
`prompt_position="before_cls"` (crosspt.backbones.encoder), set by `attach_peft`.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from enum import StrEnum
from typing import Iterator

import torch
from torch import nn

from crosspt.method.prompts import PromptSpec


class PeftKind(StrEnum):
    """Which PEFT prompt-tuning method."""
    PT = "pt"           # PromptTuningConfig, SAMPLE_VOCAB init
    MPT = "mpt"         # MultitaskPromptTuningConfig (RANDOM source stage, AVERAGE_SOURCE_TASKS target stage)


# PEFT's task type for each backbone family: with num_transformer_submodules fixed at 1 it does not change
# the prompt embedding; it keeps the config the one PEFT itself would write for that model class
_PEFT_TASK_TYPE = {"encoder": "FEATURE_EXTRACTION", "seq2seq": "SEQ_2_SEQ_LM", "decoder": "CAUSAL_LM"}


class EmptyPrompt(nn.Module):
    """A length-0 prompt for every task: zero-shot (the frozen backbone with its label semantics only)."""

    temperature = 0.0

    def __init__(self, n_tasks: int, dim: int, length: int = 0):
        super().__init__()
        self.spec = PromptSpec(n_tasks=n_tasks, dim=dim, n_sources=0, private_len=length)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def set_step(self, step: int) -> None:
        self.step.fill_(step)

    def needs_input(self) -> bool:
        return False

    def shared_by_task(self) -> bool:
        """Every row of a task gets the same prompt: these prompts are a function of the task alone."""
        return True

    def forward(self, task_ids, input_embeds=None, input_mask=None):
        """(prompt `[B, 0, d]`, mask `[B, 0]`, weights `[B, 0]`)."""
        b, dev = task_ids.shape[0], self.step.device
        return (torch.zeros(b, 0, self.spec.dim, device=dev), torch.zeros(b, 0, dtype=torch.long, device=dev),
                torch.zeros(b, 0, device=dev))

    def task_weights(self) -> torch.Tensor:
        return torch.zeros(self.spec.n_tasks, 0)

    def collapsed(self, task_id: int):
        return torch.zeros(0, self.spec.dim), torch.zeros(0, dtype=torch.long)

    def param_groups(self, prompt_lr, router_lr, weight_decay=0.0) -> list[dict]:
        return []


class _WholePrompt(EmptyPrompt):
    """A prompt of `length` tokens given whole to every row (one candidate of weight 1, nothing composed)."""

    def tokens(self, task_ids: torch.Tensor) -> torch.Tensor:
        """The prompt `[B, L, d]` of each row."""
        raise NotImplementedError

    def forward(self, task_ids, input_embeds=None, input_mask=None):
        """(prompt `[B, L, d]`, mask `[B, L]` of ones, weights `[B, 1]` of ones)."""
        p = self.tokens(task_ids)
        b = p.shape[0]
        return p, torch.ones(p.shape[:2], dtype=torch.long, device=p.device), torch.ones(b, 1, device=p.device)

    def task_weights(self) -> torch.Tensor:
        return torch.ones(self.spec.n_tasks, 1)

    @torch.no_grad()
    def collapsed(self, task_id: int):
        p, m, _ = self(torch.tensor([task_id], device=self.step.device))
        return p[0].detach().cpu(), m[0].cpu()


class FixedPrompt(_WholePrompt):
    """A promoted prompt: one stored tensor `[L, d]` fed as a PT prompt (no router, no composition)."""

    def __init__(self, prompt: torch.Tensor, n_tasks: int = 1):
        super().__init__(n_tasks, prompt.shape[-1], prompt.shape[0])
        self.register_buffer("prompt", prompt.detach().clone())

    def tokens(self, task_ids):
        return self.prompt.unsqueeze(0).expand(task_ids.shape[0], -1, -1)


class PeftPrompt(_WholePrompt):
    """PEFT's PromptEmbedding / MultitaskPromptEmbedding as a prompt module.

    `prompt_encoder` keeps PEFT's name for it (PeftModel.prompt_encoder), so its parameters read
    `prompt.prompt_encoder.embedding.weight` and, for MPT, `...prefix_task_cols / prefix_task_rows`."""

    def __init__(self, n_tasks: int, dim: int, prompt_encoder: nn.Module, n_virtual: int, multitask: bool):
        super().__init__(n_tasks, dim, n_virtual)
        self.prompt_encoder = prompt_encoder
        self.multitask = multitask
        self.register_buffer("indices", torch.arange(n_virtual), persistent=False)

    def tokens(self, task_ids):
        # what PeftModel.get_prompt does: virtual-token ids 0..L-1 per row, plus the task ids for MPT
        # (which PeftModelForFeatureExtraction.forward would not pass)
        idx = self.indices.unsqueeze(0).expand(task_ids.shape[0], -1)
        return self.prompt_encoder(idx, task_ids) if self.multitask else self.prompt_encoder(idx)

    def param_groups(self, prompt_lr, router_lr, weight_decay=0.0) -> list[dict]:
        return [{"params": [p for p in self.prompt_encoder.parameters() if p.requires_grad], "lr": prompt_lr,
                 "weight_decay": weight_decay, "name": "prompts"}]


def peft_config(kind: PeftKind | str, n_virtual: int, dim: int, *, n_tasks: int = 1,
                task_type: str = "FEATURE_EXTRACTION", init_state: str | None = None):
    """PEFT's PromptTuningConfig (SAMPLE_VOCAB init) or MultitaskPromptTuningConfig (RANDOM for the source
    stage, AVERAGE_SOURCE_TASKS from the safetensors file `init_state` for the target stage)."""
    from peft import MultitaskPromptTuningConfig, PromptTuningConfig

    common = dict(task_type=task_type, num_virtual_tokens=n_virtual, token_dim=dim, num_transformer_submodules=1)
    if PeftKind(kind) is PeftKind.PT:
        return PromptTuningConfig(prompt_tuning_init="SAMPLE_VOCAB", **common)
    if init_state:
        return MultitaskPromptTuningConfig(prompt_tuning_init="AVERAGE_SOURCE_TASKS",
                                           prompt_tuning_init_state_dict_path=init_state, num_tasks=1, **common)
    return MultitaskPromptTuningConfig(prompt_tuning_init="RANDOM", num_tasks=n_tasks, **common)


def attach_peft(backbone, kind: PeftKind | str, n_virtual: int, *, n_tasks: int = 1,
                init_state: str | None = None):
    """PEFT prompt tuning in front of a loaded backbone -> (prompt module, backbone).

    The backbone is the same object, with its prompt placed where PEFT places it (encoder: before
    [CLS]; the other families already prepend)."""
    from peft.tuners.multitask_prompt_tuning.model import MultitaskPromptEmbedding
    from peft.tuners.prompt_tuning import PromptEmbedding

    kind = PeftKind(kind)
    if backbone.family == "encoder":
        from crosspt.backbones.encoder import PromptPosition

        backbone.prompt_position = PromptPosition.BEFORE_CLS
    cfg = peft_config(kind, n_virtual, backbone.embed_dim, n_tasks=n_tasks,
                      task_type=_PEFT_TASK_TYPE[backbone.family], init_state=init_state)
    embedding = MultitaskPromptEmbedding if kind is PeftKind.MPT else PromptEmbedding
    enc = embedding(cfg, backbone.word_embeddings()).float()
    return PeftPrompt(backbone.num_tasks, backbone.embed_dim, enc, n_virtual, kind is PeftKind.MPT), backbone


def init_mpt_shared_prompt(prompt, bank: torch.Tensor) -> None:
    """Set an MPT prompt module's shared prompt `[n_virtual * submodules, d]` to the mean of the source
    prompts `bank` `[n_src, L, d]` (tiled over PEFT's transformer submodules); the task-specific low-rank
    factors keep PEFT's init."""
    weight = prompt.prompt_encoder.embedding.weight
    mean = bank.float().mean(0)
    if weight.shape[0] % mean.shape[0] or weight.shape[1] != mean.shape[1]:
        raise ValueError(f"source prompts {tuple(bank.shape)} do not fit MPT's shared prompt {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_(mean.repeat(weight.shape[0] // mean.shape[0], 1).to(weight.dtype))


def mpt_state(model) -> dict[str, torch.Tensor]:
    """The MPT source-stage tensors in PEFT's own state-dict layout (what its target init loads)."""
    enc = model.prompt.prompt_encoder
    return {"prefix_task_cols": enc.prefix_task_cols.detach().cpu().contiguous(),
            "prefix_task_rows": enc.prefix_task_rows.detach().cpu().contiguous(),
            "prompt_embeddings": enc.embedding.weight.detach().cpu().contiguous()}


@contextmanager
def mpt_state_file(state: dict[str, torch.Tensor]) -> Iterator[str]:
    """`state` in a temporary safetensors file: PEFT's AVERAGE_SOURCE_TASKS init reads a path, not tensors."""
    from safetensors.torch import save_file

    fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="mpt_source_")
    os.close(fd)
    try:
        save_file(state, path)
        yield path
    finally:
        os.unlink(path)

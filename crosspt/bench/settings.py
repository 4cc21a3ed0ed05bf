"""What one benchmark covers (targets, source pool, shots, seeds, lr grid, methods) and the budget every
method shares."""
from __future__ import annotations

from dataclasses import dataclass, field

from crosspt.bench.methods import METHODS, NEEDS_SOURCES

ALL_TASKS = ("sst2", "rte", "mrpc", "cola", "stsb", "qnli")


@dataclass
class BenchSettings:
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))          # targets
    source_tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))   # source pool
    shots: list[int] = field(default_factory=lambda: [16, 32])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lrs: list[float] = field(default_factory=lambda: [0.3, 0.1, 0.03])
    methods: list[str] = field(default_factory=lambda: [str(m) for m in METHODS])   # plain names (JSON, reports)
    backbone: str = "minilm"
    epochs: int = 20
    patience: int | None = 5
    batch_size: int = 8
    eval_batch_size: int = 64
    max_test: int | None = None
    max_length: int = 128
    prompt_len: int = 10               # private length = source length = PEFT virtual tokens
    prompt_init: str = "vocab"         # `prompt.init` of every method's prompts (auto: the backbone's default)
    source_shots: int | None = None    # k per class of the source prompts (default: max(shots))
    router_lr: float = 0.01            # fixed (not searched) for every method with a router
    data_dir: str | None = None
    threads: int | None = None         # torch threads per job (None: torch's default)
    generate: bool = False             # also score test by greedy generation (seq2seq/decoder: gen_* metrics)

    def src_k(self) -> int:
        return self.source_shots or max(self.shots)

    def needs_sources(self) -> bool:
        return any(m in NEEDS_SOURCES for m in self.methods)

    def check(self) -> None:
        from crosspt.errors import ConfigError
        from crosspt.tasks.specs import resolve_tasks

        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown benchmark method(s) {bad}; choose from {', '.join(METHODS)}")
        resolve_tasks(list(self.tasks))
        resolve_tasks(list(self.source_tasks))
        if self.needs_sources():
            for t in self.tasks:
                if not [s for s in self.source_tasks if s != t]:
                    raise ConfigError(f"target '{t}' has no source task left after leaving it out "
                                      f"(source pool: {self.source_tasks})")
        from crosspt.method.prompts import PromptInit

        inits = [i.value for i in PromptInit if i not in (PromptInit.SOURCE, PromptInit.OWN_SOURCE)]
        if self.prompt_init not in inits:
            raise ConfigError(f"prompt_init '{self.prompt_init}' is not a benchmark init; choose from "
                              + ", ".join(inits))
        if not self.lrs or not self.seeds or not self.shots:
            raise ConfigError("lrs, seeds and shots must be non-empty")

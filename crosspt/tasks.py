"""Task registry: what each task reads, how its labels are worded, and how it is scored.

A task is data, not code: `TaskSpec` is a frozen description, and users can add their own
from a small YAML file (see `register_task_file`). Layers above only read these fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field

LABEL_SEMANTICS = ("natural", "opaque", "index")


@dataclass(frozen=True)
class TaskSpec:
    name: str                              # registry key, e.g. "sst2"
    text_fields: tuple[str, ...]           # canonical input fields, e.g. ("sentence1", "sentence2")
    label_names: tuple[str, ...]           # class names in label-index order; () for regression
    label_words: dict[str, tuple[str, ...]] = field(default_factory=dict)  # semantics mode -> word per class
    label_sentences: tuple[str, ...] = ()  # natural-language sentence per class (encoder label scoring)
    prefix: str = ""                       # task prefix, e.g. "rte"
    metric: str = "accuracy"               # accuracy | f1_acc | mcc | pearson_spearman
    is_regression: bool = False
    similar_class: int | None = None       # for pair tasks: the class meaning "the two texts match"
    # where the data lives (filled by the registry; see crosspt.data)
    hub_path: str | None = None            # e.g. "nyu-mll/glue"
    hub_config: str | None = None          # e.g. "sst2"
    local: dict = field(default_factory=dict)  # local-file description, see crosspt.data

    @property
    def num_classes(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

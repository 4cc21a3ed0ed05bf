"""Task registry: what each task reads, how its labels are worded, and how it is scored.

A task is data, not code: `TaskSpec` is a frozen description, and users can add their own
from a small YAML file (see `register_task_file`). Layers above only read these fields.

The `local` dict tells `crosspt.data` how to read a task's files (see `crosspt.data.load_split`):

    dir:          folder of the task; relative to the data dir (built-ins, e.g. "glue_data/RTE")
                  or absolute (user tasks; a relative `dir` in a YAML file is resolved against
                  the YAML file's folder when it is registered)
    format:       "tsv" | "jsonl"
    files:        {"train": [...], "dev": [...]}: candidate files, first existing one wins; an
                  entry is a file name or a dict {"file": name, <any key below to override>}
    header:       TSV has a header row (columns are then named); False: columns are indices
    num_columns:  header-less TSV: exact field count of every row
    columns:      {text_field: column name or index} (default: the field's own name)
    label_column: column name or index of the label (default "label")
    label_map:    {raw label string: class index} (default: a label name, case-insensitive,
                  or the class index written as an integer)
    compose:      {text_field: "python format template over the raw row"}, e.g. WiC's target
                  word appended to sentence2
    encoding:     file encoding ("utf-8-sig" for files that start with a BOM)
"""
from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Iterable

from crosspt.errors import ConfigError, UnknownTaskError


class LabelSemantics(str, Enum):
    """How labels are worded (config `prompt.label_semantics`)."""
    NATURAL = "natural"    # the task's own label words ("positive", "entailment")
    OPAQUE = "opaque"      # meaningless but real words (OPAQUE_WORDS): does the prompt learn the task?
    INDEX = "index"        # no words at all (encoder: learned class vectors)
    NAMES = "names"        # the dataset's label names (`TaskSpec.label_names`, T5's GLUE target strings:
    #                        "entailment" / "not_entailment", "not_equivalent" / "equivalent", ...)


class Metric(str, Enum):
    """How a task is scored (`TaskSpec.metric`); `crosspt.tasks.metrics` implements each."""
    ACCURACY = "accuracy"
    F1_ACC = "f1_acc"                        # mean of binary F1 and accuracy (MRPC, QQP)
    MCC = "mcc"                              # Matthews correlation (CoLA)
    PEARSON_SPEARMAN = "pearson_spearman"    # mean of both correlations (STS-B, regression)


# the modes whose words a task stores (`TaskSpec.label_words`); "names" reads `TaskSpec.label_names`
LABEL_SEMANTICS = tuple(m.value for m in LabelSemantics if m is not LabelSemantics.NAMES)
METRICS = tuple(m.value for m in Metric)

# Real but meaningless words, by class index, identical for every task: the "opaque" mode tests
# whether a prompt learns the task rather than borrowing the label words' meaning.
OPAQUE_WORDS = ("apple", "orange", "banana", "grape", "lemon", "cherry", "peach", "plum",
                "melon", "mango", "pear", "kiwi")


@dataclass(frozen=True)
class TaskSpec:
    name: str                              # registry key, e.g. "sst2"
    text_fields: tuple[str, ...]           # canonical input fields, e.g. ("sentence1", "sentence2")
    label_names: tuple[str, ...]           # class names in label-index order; () for regression
    label_words: dict[str, tuple[str, ...]] = field(default_factory=dict)  # semantics mode -> word per class
    label_sentences: tuple[str, ...] = ()  # natural-language sentence per class (encoder label scoring)
    prefix: str = ""                       # task prefix, e.g. "rte"
    metric: str = Metric.ACCURACY.value    # a `Metric` value
    is_regression: bool = False
    similar_class: int | None = None       # for pair tasks: the class meaning "the two texts match"
    # where the data lives (filled by the registry; see crosspt.data)
    hub_path: str | None = None            # e.g. "nyu-mll/glue"
    hub_config: str | None = None          # e.g. "sst2"
    local: dict = field(default_factory=dict)  # local-file description, see crosspt.data
    # added fields
    label_range: tuple[float, float] | None = None  # regression: (low, high) of the score
    hub_splits: dict = field(default_factory=dict)  # split -> hub split name (default dev -> validation)
    # what a chat-tuned decoder is asked (`instruction_text`); "{choices}" stands for the label words of the
    # run's label semantics ("negative or positive"); "" means DEFAULT_INSTRUCTION
    instruction: str = ""

    def __hash__(self) -> int:
        # the dict fields make the generated hash fail; the name identifies a registered spec
        return hash(self.name)

    @property
    def num_classes(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2


# --------------------------------------------------------------------------------------------
# built-in tasks

def _default_words(label_names: tuple[str, ...], natural: Iterable[str] | None) -> dict[str, tuple[str, ...]]:
    n = len(label_names)
    if n > len(OPAQUE_WORDS):
        raise ConfigError(f"at most {len(OPAQUE_WORDS)} classes are supported, got {n}")
    return {
        "natural": tuple(natural) if natural is not None else tuple(label_names),
        "opaque": OPAQUE_WORDS[:n],
        "index": tuple(str(i) for i in range(n)),
    }


def _glue_local(folder: str, columns: dict, *, label_column="label", header=True, dev="dev.tsv",
                train: list | None = None, **extra) -> dict:
    return {"dir": f"glue_data/{folder}", "format": "tsv", "header": header,
            "files": {"train": train or ["train.tsv"], "dev": [dev]},
            "columns": columns, "label_column": label_column, "encoding": "utf-8", **extra}


def _sg_local(folder: str, **extra) -> dict:
    return {"dir": f"superglue/{folder}", "format": "jsonl",
            "files": {"train": ["train.jsonl"], "dev": ["val.jsonl"]}, "label_column": "label", **extra}


def _cls(name, text_fields, label_names, natural, sentences, *, metric="accuracy", similar=None,
         hub=("nyu-mll/glue", None), local=None, prefix=None, hub_splits=None, instruction="") -> TaskSpec:
    return TaskSpec(
        name=name, text_fields=tuple(text_fields), label_names=tuple(label_names),
        label_words=_default_words(tuple(label_names), natural), label_sentences=tuple(sentences),
        prefix=prefix if prefix is not None else name, metric=metric, similar_class=similar,
        hub_path=hub[0], hub_config=hub[1] or name, local=local or {}, hub_splits=hub_splits or {},
        instruction=instruction)


def _builtin_tasks() -> list[TaskSpec]:
    nli2 = ("entailment", "not_entailment")
    sg = "aps/super_glue"
    return [
        _cls("cola", ("sentence",), ("unacceptable", "acceptable"), ("no", "yes"),
             ("This sentence is not grammatical.", "This sentence is grammatical."), metric="mcc",
             local=_glue_local("CoLA", {"sentence": 3}, label_column=1, header=False, num_columns=4),
             instruction="Is this sentence grammatically acceptable English? Answer {choices}."),
        _cls("sst2", ("sentence",), ("negative", "positive"), ("negative", "positive"),
             ("It was terrible.", "It was great."),
             local=_glue_local("SST-2", {"sentence": "sentence"}),
             instruction="Is the sentiment of this review {choices}? Answer with one word."),
        _cls("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("no", "yes"),
             ("The two sentences mean different things.", "The two sentences mean the same thing."),
             metric="f1_acc", similar=1,
             local=_glue_local("MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"},
                               label_column="Quality", encoding="utf-8-sig"),
             instruction="Do these two sentences mean the same thing? Answer {choices}."),
        _cls("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("no", "yes"),
             ("The two questions ask different things.", "The two questions ask the same thing."),
             metric="f1_acc", similar=1,
             local=_glue_local("QQP", {"question1": "question1", "question2": "question2"},
                               label_column="is_duplicate"),
             instruction="Do these two questions ask the same thing? Answer {choices}."),
        TaskSpec(
            name="stsb", text_fields=("sentence1", "sentence2"), label_names=(),
            label_words={m: () for m in LABEL_SEMANTICS}, label_sentences=(), prefix="stsb",
            metric="pearson_spearman", is_regression=True, similar_class=None, label_range=(0.0, 5.0),
            hub_path="nyu-mll/glue", hub_config="stsb",
            local=_glue_local("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2"},
                              label_column="score"),
            instruction="How similar in meaning are these two sentences? Answer {choices}."),
        _cls("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
             ("yes", "maybe", "no"),
             ("The second sentence follows from the first.", "The second sentence might be true.",
              "The second sentence contradicts the first."), similar=0,
             local=_glue_local("MNLI", {"premise": "sentence1", "hypothesis": "sentence2"},
                               label_column="gold_label", dev="dev_matched.tsv"),
             hub_splits={"dev": "validation_matched"},
             instruction="Does the premise imply the hypothesis? Answer {choices}."),
        _cls("qnli", ("question", "sentence"), nli2, ("yes", "no"),
             ("The sentence answers the question.", "The sentence does not answer the question."),
             similar=0,
             local=_glue_local("QNLI", {"question": "question", "sentence": "sentence"},
                               train=["train.tsv", "train_subset_10475_hfformat.tsv"]),
             instruction="Does the sentence answer the question? Answer {choices}."),
        _cls("rte", ("sentence1", "sentence2"), nli2, ("yes", "no"),
             ("The second sentence follows from the first.",
              "The second sentence does not follow from the first."), similar=0,
             local=_glue_local("RTE", {"sentence1": "sentence1", "sentence2": "sentence2"}),
             instruction="Does the first sentence imply that the second sentence is true? "
                         "Answer {choices}."),
        _cls("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("no", "yes"),
             ("The second sentence does not follow from the first.",
              "The second sentence follows from the first."), similar=1,
             local=_glue_local("WNLI", {"sentence1": "sentence1", "sentence2": "sentence2"}),
             instruction="Does the first sentence imply that the second sentence is true? "
                         "Answer {choices}."),
        _cls("boolq", ("question", "passage"), ("false", "true"), ("no", "yes"),
             ("The answer is no.", "The answer is yes."), similar=1, hub=(sg, "boolq"),
             local=_sg_local("BoolQ"),
             instruction="Read the passage and answer the question. Answer {choices}."),
        _cls("cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
             ("yes", "no", "maybe"),
             ("The hypothesis follows from the premise.", "The hypothesis contradicts the premise.",
              "The hypothesis might be true."), similar=0, hub=(sg, "cb"), local=_sg_local("CB"),
             instruction="Does the premise imply the hypothesis? Answer {choices}."),
        # WiC's target word rides along in sentence2 so the task stays a sentence pair.
        _cls("wic", ("sentence1", "sentence2"), ("false", "true"), ("no", "yes"),
             ("The word has different meanings in the two sentences.",
              "The word has the same meaning in the two sentences."), similar=1, hub=(sg, "wic"),
             local=_sg_local("WiC", compose={"sentence2": "{sentence2} word: {word}"}),
             instruction="Is the word named after word: used with the same meaning in both sentences? "
                         "Answer {choices}."),
        _cls("superglue-rte", ("premise", "hypothesis"), nli2, ("yes", "no"),
             ("The hypothesis follows from the premise.",
              "The hypothesis does not follow from the premise."), similar=0, hub=(sg, "rte"),
             local=_sg_local("RTE"), prefix="rte",
             instruction="Does the premise imply that the hypothesis is true? Answer {choices}."),
    ]


_ALIASES = {"sst": "sst2", "stsbenchmark": "stsb", "mnlim": "mnli", "mnlimatched": "mnli",
            "sgrte": "superglue-rte", "gluerte": "rte"}

_lock = threading.Lock()
_REGISTRY: dict[str, TaskSpec] = {}


def _norm(name: str) -> str:
    # case and punctuation-insensitive key: "SST-2", "sst_2" and "sst2" are the same task
    return re.sub(r"[\s\-_/.]", "", str(name).strip().lower())


def _lookup_key(name: str) -> str | None:
    key = _norm(name)
    by_norm = {_norm(k): k for k in _REGISTRY}
    if key in by_norm:
        return by_norm[key]
    alias = _ALIASES.get(key)
    if alias and alias in _REGISTRY:
        return alias
    return None


def get_task(name: str) -> TaskSpec:
    """The registered spec of `name` (case-insensitive; "sst-2", "STS-B" style spellings work)."""
    if isinstance(name, TaskSpec):
        return name
    key = _lookup_key(name)
    if key is None:
        raise UnknownTaskError(f"unknown task '{name}'; known: {', '.join(list_tasks())}")
    return _REGISTRY[key]


def list_tasks() -> list[str]:
    return list(_REGISTRY)


def _validate(spec: TaskSpec) -> TaskSpec:
    """Normalise list-ish fields to tuples and reject specs that would fail later, far from here."""
    where = f"task '{spec.name}'"
    if not spec.name or not isinstance(spec.name, str):
        raise ConfigError("a task needs a non-empty string 'name'")
    if not spec.text_fields:
        raise ConfigError(f"{where}: 'text_fields' must list at least one field")
    if spec.metric not in METRICS:
        raise ConfigError(f"{where}: unknown metric '{spec.metric}' (choose from {', '.join(METRICS)})")
    text_fields = tuple(str(f) for f in spec.text_fields)
    label_names = tuple(str(x) for x in spec.label_names)
    if spec.is_regression:
        if spec.metric != Metric.PEARSON_SPEARMAN:
            raise ConfigError(f"{where}: a regression task needs metric 'pearson_spearman'")
        low, high = spec.label_range or (0.0, 5.0)
        if not low < high:
            raise ConfigError(f"{where}: label_range must be (low, high) with low < high")
        words = {m: () for m in LABEL_SEMANTICS}
        _check_instruction(spec.instruction, where)
        return replace(spec, text_fields=text_fields, label_names=(), label_words=words,
                       label_range=(float(low), float(high)), label_sentences=())
    if len(label_names) < 2:
        raise ConfigError(f"{where}: a classification task needs at least two 'label_names'")
    if spec.metric == Metric.PEARSON_SPEARMAN:
        raise ConfigError(f"{where}: metric 'pearson_spearman' needs is_regression: true")
    if spec.metric == Metric.F1_ACC and len(label_names) != 2:
        raise ConfigError(f"{where}: metric 'f1_acc' needs exactly two classes")
    given = dict(spec.label_words or {})
    unknown = set(given) - set(LABEL_SEMANTICS)
    if unknown:
        raise ConfigError(f"{where}: unknown label_words mode(s) {sorted(unknown)}; "
                          f"choose from {', '.join(LABEL_SEMANTICS)}")
    words = _default_words(label_names, given.get("natural"))
    for mode in LABEL_SEMANTICS:
        if mode in given:
            words[mode] = tuple(str(w) for w in given[mode])
        w = words[mode]
        if len(w) != len(label_names):
            raise ConfigError(f"{where}: label_words['{mode}'] has {len(w)} words for "
                              f"{len(label_names)} classes")
        if len({x.strip().lower() for x in w}) != len(w):
            raise ConfigError(f"{where}: label_words['{mode}'] must be distinct, got {list(w)}")
    _check_instruction(spec.instruction, where)
    sentences = tuple(str(s) for s in spec.label_sentences)
    if sentences and len(sentences) != len(label_names):
        raise ConfigError(f"{where}: {len(sentences)} label_sentences for {len(label_names)} classes")
    if spec.similar_class is not None and not 0 <= int(spec.similar_class) < len(label_names):
        raise ConfigError(f"{where}: similar_class {spec.similar_class} is not a class index")
    return replace(spec, text_fields=text_fields, label_names=label_names, label_words=words,
                   label_sentences=sentences)


def register_task(spec: TaskSpec, overwrite: bool = False) -> TaskSpec:
    """Add `spec` to the registry. Re-registering an identical spec is a no-op."""
    spec = _validate(spec)
    with _lock:
        key = _lookup_key(spec.name)
        if key is not None and not overwrite:
            if _REGISTRY[key] == spec:
                return _REGISTRY[key]
            raise ConfigError(f"task '{spec.name}' is already registered (as '{key}'); "
                              f"pass overwrite=True or choose another name")
        if key is not None:
            del _REGISTRY[key]
        _REGISTRY[spec.name] = spec
    return spec


def unregister_task(name: str) -> None:
    """Remove a task (tests and notebooks that register throwaway tasks)."""
    with _lock:
        key = _lookup_key(name)
        if key is None:
            raise UnknownTaskError(f"unknown task '{name}'; known: {', '.join(list_tasks())}")
        del _REGISTRY[key]


_SPEC_KEYS = {f.name for f in fields(TaskSpec)}


def task_from_dict(d: dict, *, base_dir: str | os.PathLike | None = None) -> TaskSpec:
    """Build a TaskSpec from plain data (a parsed YAML file); relative `local.dir` is under base_dir."""
    if not isinstance(d, dict):
        raise ConfigError("a task definition must be a mapping of TaskSpec fields")
    unknown = set(d) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"unknown task field(s) {sorted(unknown)}; allowed: {', '.join(sorted(_SPEC_KEYS))}")
    for req in ("name", "text_fields"):
        if req not in d:
            raise ConfigError(f"task definition lacks required field '{req}'")
    d = dict(d)
    if isinstance(d["text_fields"], str):
        d["text_fields"] = (d["text_fields"],)
    d.setdefault("label_names", ())
    d.setdefault("prefix", str(d["name"]))
    for k in ("text_fields", "label_names", "label_sentences"):
        if k in d and d[k] is not None:
            d[k] = tuple(d[k])
    if d.get("label_range") is not None:
        d["label_range"] = tuple(float(x) for x in d["label_range"])
    if d.get("label_words"):
        d["label_words"] = {m: tuple(v) for m, v in dict(d["label_words"]).items()}
    local = dict(d.get("local") or {})
    if "dir" in local and base_dir is not None:
        p = Path(os.path.expanduser(str(local["dir"])))
        local["dir"] = str(p if p.is_absolute() else (Path(base_dir) / p).resolve())
    d["local"] = local
    try:
        return TaskSpec(**d)
    except TypeError as e:
        raise ConfigError(f"task '{d.get('name')}': {e}") from None


def register_task_file(path: str | os.PathLike, overwrite: bool = False) -> TaskSpec:
    """Register a task defined in a small YAML file (TaskSpec field names plus `local`/`hub_*`)."""
    import yaml  # local import: only needed for user task files

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"task file {p}: invalid YAML ({e})") from None
    try:
        spec = task_from_dict(data, base_dir=p.resolve().parent)
        return register_task(spec, overwrite=overwrite)
    except ConfigError as e:
        raise ConfigError(f"task file {p}: {e}") from None


def resolve_tasks(names: list[str] | str) -> list[TaskSpec]:
    """Specs for registry names and/or YAML task-file paths, in the order given."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: list[TaskSpec] = []
    for name in names:
        if isinstance(name, TaskSpec):
            spec = name
        else:
            s = str(name).strip()
            if s.lower().endswith((".yaml", ".yml")) or Path(s).is_file():
                spec = register_task_file(s)
            else:
                spec = get_task(s)
        if any(o.name == spec.name for o in out):
            raise ConfigError(f"task '{spec.name}' is listed twice")
        out.append(spec)
    if not out:
        raise ConfigError("no tasks given")
    return out


# --------------------------------------------------------------------------------------------
# label words and input text

def check_label_semantics(semantics: str) -> None:
    """ConfigError unless `semantics` is a `LabelSemantics` value."""
    choices = [m.value for m in LabelSemantics]
    if semantics not in choices:
        raise ConfigError(f"unknown label semantics '{semantics}'; choose from {', '.join(choices)}")


def regression_grid(task: TaskSpec) -> list[str]:
    """Candidate strings for rank-classifying a regression score: low, low+0.2, ..., high."""
    low, high = task.label_range or (0.0, 5.0)
    n = int(round((high - low) / 0.2))
    return ["%.1f" % (low + 0.2 * i) for i in range(n + 1)]


def label_words(task: TaskSpec, semantics: str) -> tuple[str, ...]:
    """The candidate target strings of a task: its label words, or the score grid for regression."""
    check_label_semantics(semantics)
    if task.is_regression:
        return tuple(regression_grid(task))
    return _class_words(task, semantics)


def _class_words(task: TaskSpec, semantics: str) -> tuple[str, ...]:
    """One word per class of a classification task under `semantics` (names: its label names)."""
    if semantics == LabelSemantics.NAMES:
        return tuple(task.label_names)
    return tuple(task.label_words[semantics])


def label_text(task: TaskSpec, label: int | float, semantics: str) -> str:
    """Target text of a label: the class word, or for regression the score on the 0.2 grid."""
    check_label_semantics(semantics)
    if task.is_regression:
        low, high = task.label_range or (0.0, 5.0)
        x = min(max(float(label), low), high)
        return "%.1f" % (round(x * 5.0) / 5.0)
    i = int(label)
    words = _class_words(task, semantics)
    if not 0 <= i < len(words):
        raise ValueError(f"task '{task.name}': label {label} is not a class index (0..{len(words) - 1})")
    return words[i]


def parse_label_text(task: TaskSpec, text: str, semantics: str) -> int | float | None:
    """Inverse of label_text: class index (or float score); None when the text matches nothing."""
    check_label_semantics(semantics)
    t = (text or "").strip()
    if task.is_regression:
        try:
            x = float(t)
        except ValueError:
            return None
        return x if math.isfinite(x) else None
    t = t.lower()
    for i, w in enumerate(_class_words(task, semantics)):
        if t == w.strip().lower():
            return i
    return None


DEFAULT_INSTRUCTION = "Classify the input. Answer {choices}."     # a task that states none


def _check_instruction(text, where: str) -> None:
    """ConfigError unless `text` is a string whose only placeholder is "{choices}"."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: 'instruction' must be a string")
    try:
        text.format(choices="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{where}: 'instruction' may hold no placeholder but {{choices}} ({e!r})") from None


def instruction_text(task: TaskSpec, semantics: str) -> str:
    """The task's instruction with "{choices}" filled in: the candidate words of `semantics` ("negative or
    positive", "yes, maybe or no"), or for regression "a number from 0.0 to 5.0"."""
    check_label_semantics(semantics)
    if task.is_regression:
        low, high = task.label_range or (0.0, 5.0)
        choices = f"a number from {low:.1f} to {high:.1f}"
    else:
        words = list(_class_words(task, semantics))
        choices = " or ".join([", ".join(words[:-1]), words[-1]])
    return (task.instruction or DEFAULT_INSTRUCTION).format(choices=choices)


def format_input(task: TaskSpec, texts: tuple[str, ...], with_prefix: bool = True) -> str:
    """T5-style input, e.g. "rte: sentence1: X sentence2: Y"; field names stay as keys."""
    if len(texts) != len(task.text_fields):
        raise ValueError(f"task '{task.name}' expects {len(task.text_fields)} texts "
                         f"({', '.join(task.text_fields)}), got {len(texts)}")
    body = " ".join(f"{f}: {t}" for f, t in zip(task.text_fields, texts))
    return f"{task.prefix}: {body}" if with_prefix and task.prefix else body


for _spec in _builtin_tasks():
    register_task(_spec)
del _spec

"""Loading task data (local `glue_data/`-style files or the HF hub), k-shot sampling and batching.

Everything here is deterministic across runs and machines: sampling and shuffling use
`random.Random` seeded with strings (hashed with SHA-512 by the stdlib, not `hash()`), over
examples sorted by their stable uid. Nothing is dropped silently: a bad file is an error that
names the file and the line.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Sequence

from crosspt.errors import DataError, UnknownTaskError
from crosspt.tasks.specs import TaskSpec, get_task

SPLITS = ("train", "dev")
ENV_DATA_DIR = "CROSSPT_DATA_DIR"


class ShotsPer(str, Enum):
    """What k counts in a k-shot sample (config `data.shots_per`); see `kshot_sample`."""
    CLASS = "class"    # k examples of every class (2k uniformly drawn for regression tasks)
    TASK = "task"      # k examples in total


class TrainPool(str, Enum):
    """Which rows of a task's train split a run's k-shot samples come from (config `data.train_pool`).

    Every task's train split is cut in two halves by a hash of each row's uid (`pool_half`), the same cut
    for every seed, k and run. Source pre-training (`crosspt pretrain-sources`) trains and validates on the
    source half only; a target run draws its validation sample from the other half only. So no source
    prompt was trained on, or selected (best epoch) by, a row that a target validates on: with
    `prompt.init: own_source` (or a bank holding the target's own source) the target's validation score
    would otherwise rise for the wrong reason."""
    TARGET = "target"  # validation from the target half; train drawn first from the whole split, as before
    SOURCE = "source"  # train and validation from the source half only
    ALL = "all"        # no cut (how runs drew before the cut existed: stored configs without the key)


def pool_half(uid: str) -> TrainPool:
    """The half of its train split a row is in: a hash of its uid, not of the seed."""
    return TrainPool.SOURCE if hashlib.sha256(uid.encode()).digest()[0] & 1 == 0 else TrainPool.TARGET


# The assessment split (config `data.assess_rows`): rows of a task's train split that a run scores its selected
# state on once, at the end, and that nothing trains, stops early, selects or promotes on. Searches turn it on
# (`ASSESS_AUTO`), a plain `crosspt train` leaves it off (0) unless asked.
ASSESS_AUTO = "auto"
# `auto`: 300 rows per task. Why 300: the binomial sampling SD of an accuracy near 0.5-0.8 is then 2.3-2.9 pts,
# against 8.8 pts on a 32-row validation sample (one ninth of the variance), for one extra evaluation pass of
# 300 rows per trial (seconds on a CPU for MiniLM: benchmarks/assessment_noise.md)
ASSESS_DEFAULT_ROWS = 300
# The cap: at 1000 rows the sampling SD is <= 1.6 pts, well under the seed-to-seed spread of a k-shot trial, so
# more rows add cost (linear) and no power. It is also how many rows a task sets aside whenever assessment is on
ASSESS_MAX_ROWS = 1000
ASSESS_SEED = 0          # fixed: every run, whatever its seed, is assessed on the same rows


ASSESS_POOL_SHARE = 4    # a task sets aside at most 1/4 of each class of its target half: its validation keeps 3/4


def assessment_reserve(rows: Sequence[Example]) -> list[Example]:
    """The rows of one task's train split set aside for assessment whenever it is on, in the fixed order the
    assessment rows are taken from (its first `data.assess_rows`). Drawn from the target half only (`pool_half`:
    no source prompt was pre-trained or selected on those), with fixed seeds (`ASSESS_SEED`, not the run's), the
    same share of each class (at most 1/`ASSESS_POOL_SHARE`, so a rare class keeps most of its rows for the
    validation sample of a small task), `ASSESS_MAX_ROWS` in all at most. k-shot train and validation rows are
    drawn from the other rows, so no run of any seed trains or selects on an assessment row; and the reserve
    does not depend on how many rows are assessed, so a count above 0 changes nothing a run trains on."""
    target = sorted((e for e in rows if pool_half(e.uid) == TrainPool.TARGET), key=lambda e: _uid_key(e.uid))
    if not target:
        return []
    name = target[0].task
    share = min(1 / ASSESS_POOL_SHARE, ASSESS_MAX_ROWS / len(target))
    by_class: dict = defaultdict(list)
    for e in target:                       # regression scores: one group (no classes to keep)
        by_class[None if isinstance(e.label, float) else e.label].append(e)
    reserve: list[Example] = []
    for label in sorted(by_class, key=str):
        group = by_class[label]
        random.Random(f"{ASSESS_SEED}/{name}/assess/{label}").shuffle(group)
        reserve += group[:int(share * len(group))]
    random.Random(f"{ASSESS_SEED}/{name}/assess").shuffle(reserve)
    return reserve


def assessment_rows(reserve: Sequence[Example], assess_rows: int | str, task_name: str) -> list[Example]:
    """The first `assess_rows` rows of the reserve (`ASSESS_AUTO`: `ASSESS_DEFAULT_ROWS`, or the whole reserve
    of a task too small for that), in file order; DataError when an explicit count exceeds the reserve."""
    if assess_rows == ASSESS_AUTO:
        n = min(ASSESS_DEFAULT_ROWS, len(reserve))
        if n == 0:
            raise DataError(f"task '{task_name}': its train split has no rows to set aside for assessment "
                            f"(data.assess_rows); set data.assess_rows: 0")
    else:
        n = int(assess_rows)
        if n < 0 or n > len(reserve):
            raise DataError(f"task '{task_name}': data.assess_rows is {n} but its train split can set aside "
                            f"0..{len(reserve)} assessment rows (a quarter of the target half of the train "
                            f"split, at most {ASSESS_MAX_ROWS}); lower data.assess_rows or use '{ASSESS_AUTO}'")
    keep = {e.uid for e in reserve[:n]}
    return sorted((e for e in reserve if e.uid in keep), key=lambda e: _uid_key(e.uid))


@dataclass(frozen=True)
class Example:
    task: str                  # TaskSpec.name
    uid: str                   # f"{task}/{split}/{row_index}", stable across runs and machines
    texts: tuple[str, ...]     # one string per TaskSpec.text_fields
    label: int | float         # class index, or a float score for regression tasks


def data_dir_default() -> str | None:
    """The data folder from $CROSSPT_DATA_DIR, or None (then data comes from the hub)."""
    return os.environ.get(ENV_DATA_DIR) or None


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> str | None:
    """The data folder to read: `explicit` (a --data-dir flag, `data.data_dir`) when given, else
    $CROSSPT_DATA_DIR, else None (the hub). Returned as given, not made absolute."""
    return str(explicit) if explicit else data_dir_default()


# --------------------------------------------------------------------------------------------
# labels

def _label_map(task: TaskSpec, opts: dict) -> dict[str, int]:
    # explicit map first, then label names, then the class index written as an integer
    m: dict[str, int] = {}
    for i, n in enumerate(task.label_names):
        m[n.strip().lower()] = i
        m[str(i)] = i
    for k, v in (opts.get("label_map") or {}).items():
        m[str(k).strip().lower()] = int(v)
    return m


def _parse_label(task: TaskSpec, raw, lmap: dict[str, int]) -> int | float:
    """Raise ValueError with a short reason; callers add file and line."""
    if raw is None:
        raise ValueError("missing label")
    if task.is_regression:
        try:
            x = float(str(raw).strip())
        except ValueError:
            raise ValueError(f"label {raw!r} is not a number") from None
        low, high = task.label_range or (0.0, 5.0)
        if not math.isfinite(x) or not low <= x <= high:
            raise ValueError(f"score {raw!r} outside the label range {low}..{high}")
        return x
    s = str(raw).strip().lower()
    if s in lmap and 0 <= lmap[s] < len(task.label_names):
        return lmap[s]
    raise ValueError(f"unknown label {raw!r} (expected one of {', '.join(task.label_names)} "
                     f"or 0..{len(task.label_names) - 1})")


def _compose(task: TaskSpec, texts: list[str], raw: dict, positional: Sequence, opts: dict) -> tuple[str, ...]:
    templates = opts.get("compose") or {}
    if not templates:
        return tuple(texts)
    named = {**{str(k): v for k, v in raw.items()}, **dict(zip(task.text_fields, texts))}
    out = []
    for f, t in zip(task.text_fields, texts):
        tmpl = templates.get(f)
        out.append(tmpl.format(*positional, **named).strip() if tmpl else t)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# local files

def _task_dir(task: TaskSpec, data_dir: str | os.PathLike | None) -> Path:
    rel = Path(str(task.local["dir"]))
    if rel.is_absolute():
        return rel
    if data_dir is None:
        raise DataError(f"task '{task.name}': local folder '{rel}' is relative but no data dir was given")
    base = Path(data_dir).expanduser()
    candidates = [base / rel]
    if len(rel.parts) > 1:          # data_dir may point straight at glue_data/ or superglue/
        candidates.append(base / Path(*rel.parts[1:]))
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def task_files(task: TaskSpec, data_dir: str | os.PathLike | None) -> list[Path]:
    """The local files a task's splits are read from (those that exist), e.g. to ship them to other nodes."""
    if not task.local or data_dir is None:
        return []
    found = []
    for split in (task.local.get("files") or {}):
        try:
            found.append(_split_file(task, split, data_dir)[0])
        except DataError:
            continue
    return found


def _split_file(task: TaskSpec, split: str, data_dir) -> tuple[Path, dict]:
    local = task.local
    entries = (local.get("files") or {}).get(split)
    if not entries:
        raise DataError(f"task '{task.name}': no local file listed for split '{split}'")
    if isinstance(entries, (str, dict)):
        entries = [entries]
    folder = _task_dir(task, data_dir)
    tried = []
    for e in entries:
        opts = dict(local)
        if isinstance(e, dict):
            opts.update(e)
            name = e.get("file")
        else:
            name = e
        path = folder / str(name)
        if path.is_file():
            return path, opts
        tried.append(str(path))
    raise DataError(f"task '{task.name}': {split} file not found: {' or '.join(tried)}")


def _resolve_column(task: TaskSpec, col, header: list[str] | None, path: Path, width: int | None):
    if isinstance(col, int) or (isinstance(col, str) and header is None and col.lstrip("-").isdigit()):
        i = int(col)
        if width is not None and not -width <= i < width:
            raise DataError(f"task '{task.name}': column index {i} out of range in {path} ({width} columns)")
        return i
    if header is None:
        raise DataError(f"task '{task.name}': column '{col}' given by name but {path} has no header")
    if col not in header:
        raise DataError(f"task '{task.name}': column '{col}' not found in {path} "
                        f"(columns: {', '.join(header)})")
    return header.index(col)


def _read_tsv(task: TaskSpec, split: str, path: Path, opts: dict) -> list[Example]:
    has_header = bool(opts.get("header", True))
    columns = opts.get("columns") or {}
    lmap = _label_map(task, opts)
    out: list[Example] = []
    try:
        with open(path, encoding=opts.get("encoding", "utf-8"), newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = None
            if has_header:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"task '{task.name}': {path} is empty (expected a header row)")
                header = [h.strip() for h in header]
                width = len(header)
            else:
                width = opts.get("num_columns")
            text_idx = [_resolve_column(task, columns.get(f, f), header, path, width) for f in task.text_fields]
            label_idx = _resolve_column(task, opts.get("label_column", "label"), header, path, width)
            need = max(max(i for i in text_idx + [label_idx]) + 1, 1)
            for row in reader:
                line = reader.line_num
                if (width is not None and len(row) != width) or len(row) < need:
                    expect = width if width is not None else f">= {need}"
                    raise DataError(f"task '{task.name}': malformed row in {path} line {line}: "
                                    f"{len(row)} fields, expected {expect}")
                texts = [row[i].strip() for i in text_idx]
                try:
                    label = _parse_label(task, row[label_idx], lmap)
                except ValueError as e:
                    raise DataError(f"task '{task.name}': {e} in {path} line {line}") from None
                raw = dict(zip(header, row)) if header else {}
                try:
                    texts = _compose(task, texts, raw, row, opts)
                except (KeyError, IndexError) as e:
                    raise DataError(f"task '{task.name}': compose template needs {e} in {path} line {line}") from None
                out.append(Example(task.name, f"{task.name}/{split}/{len(out)}", texts, label))
    except UnicodeDecodeError as e:
        raise DataError(f"task '{task.name}': {path} is not valid {opts.get('encoding', 'utf-8')} ({e})") from None
    except csv.Error as e:
        raise DataError(f"task '{task.name}': cannot parse {path}: {e}") from None
    return out


def json_lines(path: Path, where: str = "", encoding: str = "utf-8"):
    """`(line number, object)` for each non-blank line of a JSON-lines file; a line that is not a JSON object
    is a DataError naming the file and line (prefixed by `where`)."""
    with open(path, encoding=encoding) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}malformed JSON in {path} line {line_no}: {e.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}{path} line {line_no} is not a JSON object")
            yield line_no, rec


def _read_jsonl(task: TaskSpec, split: str, path: Path, opts: dict) -> list[Example]:
    columns = opts.get("columns") or {}
    label_col = opts.get("label_column", "label")
    lmap = _label_map(task, opts)
    out: list[Example] = []
    for line_no, rec in json_lines(Path(path), f"task '{task.name}': ", opts.get("encoding", "utf-8")):
        texts = []
        for f in task.text_fields + (label_col,):
            key = f if f == label_col else columns.get(f, f)
            if key not in rec:
                raise DataError(f"task '{task.name}': column '{key}' not found in {path} line {line_no} "
                                f"(columns: {', '.join(rec)})")
            if f != label_col:
                texts.append(str(rec[key]).strip())
        try:
            label = _parse_label(task, rec[label_col], lmap)
        except ValueError as e:
            raise DataError(f"task '{task.name}': {e} in {path} line {line_no}") from None
        try:
            composed = _compose(task, texts, rec, (), opts)
        except (KeyError, IndexError) as e:
            raise DataError(f"task '{task.name}': compose template needs {e} in {path} line {line_no}") from None
        out.append(Example(task.name, f"{task.name}/{split}/{len(out)}", composed, label))
    return out


# --------------------------------------------------------------------------------------------
# hub

def _load_hub(task: TaskSpec, split: str) -> list[Example]:
    hint = f"pass --data-dir or set {ENV_DATA_DIR} to a folder with glue_data/ and superglue/"
    if not task.hub_path:
        raise DataError(f"task '{task.name}' has no hub dataset and no local folder; {hint}")
    hub_split = (task.hub_splits or {}).get(split, "validation" if split == "dev" else split)
    try:
        import datasets  # heavy; only needed without local files

        ds = datasets.load_dataset(task.hub_path, task.hub_config, split=hub_split)
    except Exception as e:  # network, auth, missing dataset: all one fix for the user
        raise DataError(f"task '{task.name}': cannot load {task.hub_path}/{task.hub_config} "
                        f"split '{hub_split}' from the hub ({type(e).__name__}: {e}); {hint}") from None
    opts = dict(task.local)
    lmap = _label_map(task, opts)
    out: list[Example] = []
    where = f"{task.hub_path}/{task.hub_config}[{hub_split}]"
    for i, rec in enumerate(ds):
        missing = [f for f in task.text_fields + ("label",) if f not in rec]
        if missing:
            raise DataError(f"task '{task.name}': column '{missing[0]}' not found in {where} "
                            f"(columns: {', '.join(rec)})")
        try:
            label = _parse_label(task, rec["label"], lmap)
        except ValueError as e:
            raise DataError(f"task '{task.name}': {e} in {where} row {i}") from None
        texts = _compose(task, [str(rec[f]).strip() for f in task.text_fields], rec, (), opts)
        out.append(Example(task.name, f"{task.name}/{split}/{i}", texts, label))
    return out


def load_split(task: TaskSpec | str, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """All examples of `split` ("train" | "dev"): from local files when data_dir is given (or the
    task's folder is absolute), otherwise from the hub."""
    task = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise DataError(f"task '{task.name}': unknown split '{split}' (choose from {', '.join(SPLITS)})")
    local = task.local or {}
    use_local = bool(local.get("dir")) and (data_dir is not None or Path(str(local["dir"])).is_absolute())
    if not use_local:
        return _load_hub(task, split)
    path, opts = _split_file(task, split, data_dir)
    fmt = opts.get("format") or ("jsonl" if path.suffix in (".jsonl", ".json") else "tsv")
    if fmt == "tsv":
        rows = _read_tsv(task, split, path, opts)
    elif fmt == "jsonl":
        rows = _read_jsonl(task, split, path, opts)
    else:
        raise DataError(f"task '{task.name}': unknown local format '{fmt}' (tsv or jsonl)")
    if not rows:
        raise DataError(f"task '{task.name}': {path} has no examples")
    return rows


# --------------------------------------------------------------------------------------------
# k-shot sampling

def _uid_key(uid: str):
    # natural order so "x/train/10" sorts after "x/train/2"; any fixed order would do
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", uid)]


def _class_name(spec: TaskSpec | None, label) -> str:
    if spec is not None and not spec.is_regression and isinstance(label, int) and 0 <= label < len(spec.label_names):
        return spec.label_names[label]
    return str(label)


def _spec_of(examples: Sequence[Example]) -> TaskSpec | None:
    try:
        return get_task(examples[0].task)
    except UnknownTaskError:
        return None


def kshot_sample(examples: Sequence[Example], k: int, *, per: str = ShotsPer.CLASS.value,
                 seed: int | str = 0, spec: TaskSpec | None = None) -> list[Example]:
    """k examples per class (per="class") or k in total (per="task"), in the input's order.

    Regression tasks have no classes: per="class" there means 2*k examples drawn uniformly.
    """
    if not examples:
        raise DataError("cannot sample from an empty example list")
    tasks = {e.task for e in examples}
    if len(tasks) != 1:
        raise DataError(f"kshot_sample takes one task's examples, got {sorted(tasks)}")
    name = examples[0].task
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise DataError(f"task '{name}': shots must be a positive integer, got {k!r}")
    choices = [p.value for p in ShotsPer]
    if per not in choices:
        raise DataError(f"task '{name}': per must be {' or '.join(map(repr, choices))}, got {per!r}")
    spec = spec or _spec_of(examples)
    uids = [e.uid for e in examples]
    if len(set(uids)) != len(uids):
        raise DataError(f"task '{name}': duplicate example uids; cannot sample deterministically")
    ordered = sorted(examples, key=lambda e: _uid_key(e.uid))
    regression = spec.is_regression if spec is not None else isinstance(examples[0].label, float)

    if per == ShotsPer.TASK or regression:
        n = k if per == ShotsPer.TASK else 2 * k
        if n > len(ordered):
            raise DataError(f"task '{name}': {n} examples requested but only {len(ordered)} available")
        chosen = random.Random(f"{seed}/{name}/all").sample(ordered, n)
    else:
        by_class: dict = defaultdict(list)
        for e in ordered:
            by_class[e.label].append(e)
        classes = range(spec.num_classes) if spec is not None else sorted(by_class)
        sizes = ", ".join(f"{_class_name(spec, c)}={len(by_class.get(c, []))}" for c in classes)
        chosen = []
        for c in classes:
            pool = by_class.get(c, [])
            if k > len(pool):
                raise DataError(f"task '{name}': class '{_class_name(spec, c)}' has {len(pool)} examples, "
                                f"{k} per class requested (class sizes: {sizes})")
            chosen += random.Random(f"{seed}/{name}/class{c}").sample(pool, k)
    keep = {e.uid for e in chosen}
    return [e for e in examples if e.uid in keep]


def _check_all_classes(spec: TaskSpec, examples: Sequence[Example], what: str) -> None:
    if spec.is_regression:
        return
    present = {e.label for e in examples}
    for c in range(spec.num_classes):
        if c not in present:
            raise DataError(f"task '{spec.name}': class '{spec.label_names[c]}' has no examples in the "
                            f"{what} sample; raise shots or use per='class'")


def make_splits(task: TaskSpec | str, data_dir: str | os.PathLike | None, *, shots: int | None,
                per: str = ShotsPer.CLASS.value, val_shots: int | None = None, seed: int = 0,
                max_test: int | None = None, test_seed: int = 0,
                pool: str = TrainPool.ALL.value, assess_rows: int | str = 0) -> dict[str, list[Example]]:
    """{"train", "val", "test"}: disjoint k-shot train/val carved from the train split; test is the
    official dev split. shots=None trains on all train examples not drawn for val (val_shots needed).

    `assess_rows` (> 0 or `ASSESS_AUTO`): also "assess", rows of the train split's `assessment_reserve`,
    which train and val are then drawn without. 0: no assessment, the k-shot rows exactly as before it existed.

    `pool` (`TrainPool`): `source` draws train and val from the source half of the train split only;
    `target` draws train as `all` does (the same rows for a seed) and val from the target half only.

    The max_test subset uses `test_seed`, not `seed`, so runs with different seeds are scored on the
    same test examples.
    """
    task = get_task(task) if isinstance(task, str) else task
    pool = TrainPool(pool)
    rows = load_split(task, "train", data_dir)
    assess = None
    if assess_rows:
        reserve = assessment_reserve(rows)
        assess = assessment_rows(reserve, assess_rows, task.name)
        reserved = {e.uid for e in reserve}
        rows = [e for e in rows if e.uid not in reserved]
    if pool == TrainPool.SOURCE:
        rows = [e for e in rows if pool_half(e.uid) == TrainPool.SOURCE]

    def val_rows(candidates: list[Example]) -> list[Example]:
        return [e for e in candidates if pool_half(e.uid) == TrainPool.TARGET] if pool == TrainPool.TARGET \
            else candidates

    where = "" if pool == TrainPool.ALL else f", from the {pool.value} half of the train split (data.train_pool)"
    if assess is not None:
        where += f", without the {len(reserve)} rows set aside for assessment (data.assess_rows)"
    if shots is None:
        if val_shots is None:
            raise DataError(f"task '{task.name}': full-data training (shots=None) needs val_shots")
        try:
            val = kshot_sample(val_rows(rows), val_shots, per=per, seed=f"{seed}/val", spec=task)
        except DataError as e:
            raise DataError(f"{e} (val sample{where})") from None
        taken = {e.uid for e in val}
        train = [e for e in rows if e.uid not in taken]
    else:
        try:
            train = kshot_sample(rows, shots, per=per, seed=seed, spec=task)
        except DataError as e:
            raise DataError(f"{e} (train sample{where})") from None
        taken = {e.uid for e in train}
        rest = val_rows([e for e in rows if e.uid not in taken])
        if not rest:
            raise DataError(f"task '{task.name}': nothing left for the val sample after drawing train{where}")
        try:
            val = kshot_sample(rest, val_shots if val_shots is not None else shots, per=per,
                               seed=f"{seed}/val", spec=task)
        except DataError as e:
            raise DataError(f"{e} (val sample, after removing the {len(train)} train examples{where})") from None
    _check_all_classes(task, train, "train")
    _check_all_classes(task, val, "val")

    test = select_test_examples(load_split(task, "dev", data_dir), task.name, max_test, test_seed=test_seed)
    return {"train": train, "val": val, "test": test, **({"assess": assess} if assess is not None else {})}


def select_test_examples(examples: Sequence[Example], task_name: str, max_test: int | None, *,
                         test_seed: int = 0) -> list[Example]:
    """The evaluation subset a run scores as "test": `max_test` examples drawn with `test_seed`, kept in
    file order (all when `max_test` is None or covers them). `make_splits` and the pyfunc predictor's
    `evaluate` both call this, so a promoted model is scored on exactly the examples its trial scored."""
    if max_test is None:
        return list(examples)
    if max_test <= 0:
        raise DataError(f"task '{task_name}': max_test must be positive, got {max_test}")
    if max_test >= len(examples):
        return list(examples)
    idx = list(range(len(examples)))
    random.Random(f"{test_seed}/{task_name}/test").shuffle(idx)
    return [examples[i] for i in sorted(idx[:max_test])]


# --------------------------------------------------------------------------------------------
# batching

def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    rank, world = int(shard[0]), int(shard[1])
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad shard {shard}: need 0 <= rank < world_size")
    return rank, world


def multitask_batches(examples_by_task: dict[str, list[Example]], batch_size: int, *, seed: int = 0,
                      epoch: int = 0, shard: tuple[int, int] = (0, 1)) -> list[list[Example]]:
    """One epoch of mixed-task batches for one rank.

    All tasks' examples are shuffled together (seed, epoch), cut into batches of `batch_size`
    (the last one may be smaller) and dealt round-robin to ranks; when the batch count does not
    divide by world_size, the first batches are repeated so every rank takes the same number of
    steps (DDP needs that).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rank, world = _check_shard(shard)
    pool = [e for t in sorted(examples_by_task) for e in sorted(examples_by_task[t], key=lambda e: _uid_key(e.uid))]
    if not pool:
        return []
    random.Random(f"{seed}/epoch{epoch}").shuffle(pool)
    batches = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
    total = math.ceil(len(batches) / world) * world
    batches += [batches[i % len(batches)] for i in range(total - len(batches))]
    return batches[rank::world]


def eval_batches(examples: Sequence[Example], batch_size: int,
                 shard: tuple[int, int] = (0, 1)) -> list[list[Example]]:
    """Sequential batches of this rank's share (examples[rank::world]); no padding, so gathering
    every rank's predictions covers each example exactly once. Ranks may differ by one batch."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rank, world = _check_shard(shard)
    mine = list(examples)[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]

"""Task registry and data layer against the real offline GLUE/SuperGLUE copies."""
from __future__ import annotations

import os
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from crosspt.tasks import data as D
from crosspt.tasks import specs
from crosspt.tasks.data import (Example, data_dir_default, eval_batches, kshot_sample, load_split, make_splits,
                          multitask_batches)
from crosspt.errors import ConfigError, DataError, UnknownTaskError
from crosspt.tasks.specs import (LABEL_SEMANTICS, OPAQUE_WORDS, TaskSpec, format_input, get_task, label_text,
                           list_tasks, parse_label_text, register_task, regression_grid, resolve_tasks)

DATA = Path(os.environ.get("CROSSPT_DATA_DIR") or Path(__file__).parents[1].parent / "shared" / "data")
BUILTIN = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli",
           "boolq", "cb", "wic", "superglue-rte"]
KNOWN_COUNTS = {("sst2", "dev"): 872, ("rte", "dev"): 277, ("cb", "dev"): 56, ("cb", "train"): 250,
                ("cola", "train"): 8551, ("cola", "dev"): 1043, ("mrpc", "train"): 3668,
                ("mrpc", "dev"): 408, ("stsb", "train"): 5749, ("stsb", "dev"): 1500,
                ("qnli", "dev"): 5463, ("qnli", "train"): 10475, ("wnli", "dev"): 71,
                ("wic", "dev"): 638, ("boolq", "dev"): 3270, ("superglue-rte", "train"): 2490,
                ("sst2", "train"): 67349, ("rte", "train"): 2490, ("wnli", "train"): 635,
                ("wic", "train"): 5428}


def _has_file(task: TaskSpec, split: str) -> bool:
    try:
        D._split_file(task, split, DATA)
        return True
    except DataError:
        return False


_cache: dict = {}


def _load(name: str, split: str) -> list[Example]:
    if (name, split) not in _cache:
        _cache[name, split] = load_split(get_task(name), split, str(DATA))
    return _cache[name, split]


@pytest.fixture
def scratch_tasks():
    """Unregister any task a test adds, so tests stay independent."""
    before = set(list_tasks())
    yield
    for name in set(list_tasks()) - before:
        specs.unregister_task(name)


# --------------------------------------------------------------------------------------------
# registry

def test_builtin_registry_contents():
    assert set(BUILTIN) <= set(list_tasks())
    assert get_task("sst2").label_names == ("negative", "positive")
    assert get_task("rte").label_names == ("entailment", "not_entailment")
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("cb").label_names == ("entailment", "contradiction", "neutral")
    assert get_task("cola").metric == "mcc"
    assert get_task("mrpc").metric == get_task("qqp").metric == "f1_acc"
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.metric == "pearson_spearman" and stsb.label_range == (0.0, 5.0)
    similar = {"mrpc": 1, "qqp": 1, "rte": 0, "qnli": 0, "wnli": 1, "mnli": 0, "stsb": None,
               "wic": 1, "boolq": 1, "cb": 0}
    for name, c in similar.items():
        assert get_task(name).similar_class == c, name
    assert (get_task("sst2").hub_path, get_task("sst2").hub_config) == ("nyu-mll/glue", "sst2")
    assert (get_task("boolq").hub_path, get_task("boolq").hub_config) == ("aps/super_glue", "boolq")
    assert get_task("superglue-rte").hub_config == "rte"
    assert len({get_task(n) for n in BUILTIN}) == len(BUILTIN)       # specs are hashable


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_label_words(name):
    spec = get_task(name)
    assert spec.prefix
    if spec.is_regression:
        return
    n = spec.num_classes
    for mode in LABEL_SEMANTICS:
        words = spec.label_words[mode]
        assert len(words) == n and len(set(words)) == n
    assert spec.label_words["opaque"] == OPAQUE_WORDS[:n]
    assert spec.label_words["index"] == tuple(str(i) for i in range(n))
    assert len(spec.label_sentences) == n


def test_aliases_and_unknown_task():
    assert get_task("SST-2").name == "sst2"
    assert get_task("sts-b").name == "stsb"
    assert get_task("SuperGLUE_RTE").name == "superglue-rte"
    assert get_task(" RTE ").name == "rte"
    with pytest.raises(UnknownTaskError, match=r"unknown task 'xyz'; known: .*sst2"):
        get_task("xyz")
    with pytest.raises(UnknownTaskError, match="xyz"):
        resolve_tasks(["rte", "xyz"])


def test_register_conflicts(scratch_tasks):
    spec = TaskSpec(name="mini", text_fields=("text",), label_names=("a", "b"))
    reg = register_task(spec)
    assert reg.label_words["natural"] == ("a", "b") and reg.label_words["opaque"] == ("apple", "orange")
    assert register_task(spec) == reg                       # identical: no-op
    with pytest.raises(ConfigError, match="already registered"):
        register_task(TaskSpec(name="mini", text_fields=("x",), label_names=("a", "b")))
    register_task(TaskSpec(name="mini", text_fields=("x",), label_names=("a", "b")), overwrite=True)
    assert get_task("mini").text_fields == ("x",)
    with pytest.raises(ConfigError, match="metric"):
        register_task(TaskSpec(name="bad", text_fields=("x",), label_names=("a", "b"), metric="bleu"))
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_tasks(["rte", "RTE"])


def test_label_text_roundtrip():
    for name in BUILTIN:
        spec = get_task(name)
        for mode in LABEL_SEMANTICS:
            if spec.is_regression:
                continue
            for c in range(spec.num_classes):
                assert parse_label_text(spec, label_text(spec, c, mode), mode) == c
                assert parse_label_text(spec, " " + label_text(spec, c, mode).upper() + " ", mode) == c
            assert parse_label_text(spec, "definitely not a label", mode) is None
    assert label_text(get_task("sst2"), 1, "natural") == "positive"
    assert label_text(get_task("rte"), 1, "opaque") == "orange"
    assert label_text(get_task("mnli"), 2, "index") == "2"
    with pytest.raises(ConfigError, match="semantics"):
        label_text(get_task("sst2"), 1, "fancy")


def test_regression_text_and_grid():
    stsb = get_task("stsb")
    assert label_text(stsb, 3.87, "natural") == "3.8"
    assert label_text(stsb, 4.95, "index") == "5.0"
    assert label_text(stsb, 0.05, "opaque") == "0.0"
    assert label_text(stsb, 2.5, "natural") == "2.4" or label_text(stsb, 2.5, "natural") == "2.6"
    assert parse_label_text(stsb, " 3.4", "natural") == pytest.approx(3.4)
    assert parse_label_text(stsb, "high", "natural") is None
    assert parse_label_text(stsb, "nan", "natural") is None
    grid = regression_grid(stsb)
    assert grid[0] == "0.0" and grid[1] == "0.2" and grid[-1] == "5.0" and len(grid) == 26
    assert specs.label_words(stsb, "natural") == tuple(grid)


def test_format_input():
    rte = get_task("rte")
    assert format_input(rte, ("X", "Y"), with_prefix=True) == "rte: sentence1: X sentence2: Y"
    assert format_input(rte, ("X", "Y"), with_prefix=False) == "sentence1: X sentence2: Y"
    assert format_input(get_task("sst2"), ("good",), True) == "sst2: sentence: good"
    with pytest.raises(ValueError, match="expects 2 texts"):
        format_input(rte, ("X",), True)


def test_fit_texts_cuts_the_longest_text_and_keeps_the_template():
    """Words as tokens: the formatted input is cut inside its texts, longest first (the first on ties), never in
    the template, so a long premise cannot push the hypothesis or an answer cue out of the budget."""
    import re

    from crosspt.tasks.formatting import fit_texts, shorten_longest_first

    assert shorten_longest_first([10, 3], 5) == [5, 3]
    assert shorten_longest_first([4, 4], 3) == [2, 3]             # ties: the first text loses first
    assert shorten_longest_first([2, 1], 9) == [0, 0]
    rte = get_task("rte")

    def render(ts):
        return (format_input(rte, ts) + " answer:").split()

    def ends(text):
        return [m.end() for m in re.finditer(r"\S+", text)]

    premise, hypothesis = " ".join(f"p{i}" for i in range(50)), "the cat sleeps"
    out = fit_texts((premise, hypothesis), render, ends, 12)
    assert out == "rte: sentence1: p0 p1 p2 p3 p4 sentence2: the cat sleeps answer:".split()
    assert fit_texts(("a b", "c"), render, ends, 12) == render(("a b", "c"))      # fits: unchanged
    both = fit_texts((premise, premise), render, ends, 13)     # 9 text tokens: the first text gives up the odd one
    assert both == "rte: sentence1: p0 p1 p2 p3 sentence2: p0 p1 p2 p3 p4 answer:".split()
    with pytest.raises(ConfigError, match="max_length 3 is too short for the input: its template alone takes 4"):
        fit_texts((premise, hypothesis), render, ends, 3)


# --------------------------------------------------------------------------------------------
# loading the real files

@pytest.mark.parametrize("split", ["train", "dev"])
@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_tasks_load(name, split):
    spec = get_task(name)
    if not _has_file(spec, split):
        pytest.skip(f"{name} {split} files are not in {DATA}")
    rows = _load(name, split)
    assert len(rows) > 0
    if (name, split) in KNOWN_COUNTS:
        assert len(rows) == KNOWN_COUNTS[name, split]
    assert len({r.uid for r in rows}) == len(rows)
    assert rows[0].uid == f"{name}/{split}/0"
    for r in rows:
        assert r.task == name and len(r.texts) == len(spec.text_fields)
        assert all(isinstance(t, str) for t in r.texts) and r.texts[0]
        if spec.is_regression:
            assert isinstance(r.label, float) and 0.0 <= r.label <= 5.0
        else:
            assert isinstance(r.label, int) and 0 <= r.label < spec.num_classes
    if not spec.is_regression:
        assert len({r.label for r in rows}) == spec.num_classes


def test_known_label_distributions_and_contents():
    assert Counter(r.label for r in _load("sst2", "dev")) == {1: 444, 0: 428}
    assert Counter(r.label for r in _load("rte", "dev")) == {0: 146, 1: 131}   # 0 = entailment
    assert Counter(r.label for r in _load("cb", "dev")) == {1: 28, 0: 23, 2: 5}  # 1 = contradiction
    assert Counter(r.label for r in _load("cola", "dev")) == {1: 721, 0: 322}
    assert Counter(r.label for r in _load("qnli", "train")) == {1: 5248, 0: 5227}
    assert Counter(r.label for r in _load("qnli", "dev")) == {0: 2702, 1: 2761}
    mrpc = _load("mrpc", "train")[0]
    assert mrpc.label == 1 and mrpc.texts[0].startswith("Amrozi accused his brother")
    assert _load("stsb", "train")[1].label == pytest.approx(3.8)
    assert _load("cola", "train")[0].texts == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    wic = _load("wic", "dev")[0]
    assert wic.texts[1].endswith("word: class") and wic.label == 0


def test_data_dir_may_point_at_glue_data():
    rows = load_split(get_task("rte"), "dev", str(DATA / "glue_data"))
    assert [r.uid for r in rows] == [r.uid for r in _load("rte", "dev")]
    rows = load_split(get_task("cb"), "dev", str(DATA / "superglue"))
    assert len(rows) == 56


def test_data_dir_default(monkeypatch):
    monkeypatch.setenv("CROSSPT_DATA_DIR", "/some/where")
    assert data_dir_default() == "/some/where"
    monkeypatch.delenv("CROSSPT_DATA_DIR")
    assert data_dir_default() is None


def test_qnli_prefers_full_train_tsv(tmp_path):
    folder = tmp_path / "glue_data" / "QNLI"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tq?\ts.\tnot_entailment\n")
    (folder / "train_subset_10475_hfformat.tsv").write_text("question\tsentence\tlabel\nq\ts\t0\n")
    rows = load_split(get_task("qnli"), "train", tmp_path)
    assert rows == [Example("qnli", "qnli/train/0", ("q?", "s."), 1)]


def test_missing_split_file_names_path(tmp_path):
    with pytest.raises(DataError, match=r"task 'rte': train file not found: .*glue_data/RTE/train\.tsv"):
        load_split(get_task("rte"), "train", tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        load_split(get_task("rte"), "test", DATA)


# --------------------------------------------------------------------------------------------
# broken files

def _write_rte(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "glue_data" / "RTE"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.tsv"
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_column_error(tmp_path):
    path = _write_rte(tmp_path, "index\tsentence1\tsentenceB\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError) as err:
        load_split(get_task("rte"), "train", tmp_path)
    msg = str(err.value)
    assert "task 'rte': column 'sentence2' not found in" in msg and str(path) in msg
    assert "columns: index, sentence1, sentenceB, label" in msg


def test_malformed_row_error(tmp_path):
    path = _write_rte(tmp_path, "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly\tthree\n")
    with pytest.raises(DataError, match=rf"malformed row in {path} line 3: 3 fields, expected 4"):
        load_split(get_task("rte"), "train", tmp_path)


def test_unknown_label_error(tmp_path):
    path = _write_rte(tmp_path, "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    with pytest.raises(DataError, match=rf"unknown label 'maybe'.* in {path} line 3"):
        load_split(get_task("rte"), "train", tmp_path)


def test_bad_regression_score_and_jsonl_errors(tmp_path):
    folder = tmp_path / "glue_data" / "STS-B"
    folder.mkdir(parents=True)
    cols = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (folder / "train.tsv").write_text(cols + "0\tg\tf\ty\t1\tn\tn\ta\tb\tseven\n")
    with pytest.raises(DataError, match=r"not a number in .*train\.tsv line 2"):
        load_split(get_task("stsb"), "train", tmp_path)
    (folder / "train.tsv").write_text(cols + "0\tg\tf\ty\t1\tn\tn\ta\tb\t7.5\n")
    with pytest.raises(DataError, match="outside the label range"):
        load_split(get_task("stsb"), "train", tmp_path)
    sg = tmp_path / "superglue" / "CB"
    sg.mkdir(parents=True)
    (sg / "train.jsonl").write_text('{"premise": "p", "hypothesis": "h", "label": "neutral"}\n{"premise": "p"\n')
    with pytest.raises(DataError, match=r"malformed JSON in .*train\.jsonl line 2"):
        load_split(get_task("cb"), "train", tmp_path)
    (sg / "train.jsonl").write_text('{"premise": "p", "label": "neutral"}\n')
    with pytest.raises(DataError, match=r"column 'hypothesis' not found in .*line 1"):
        load_split(get_task("cb"), "train", tmp_path)


def test_hub_failure_is_a_data_error(monkeypatch):
    fake = types.ModuleType("datasets")

    def boom(*a, **k):
        raise ConnectionError("no network")
    fake.load_dataset = boom
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"task 'sst2'.*no network.*--data-dir.*CROSSPT_DATA_DIR"):
        load_split(get_task("sst2"), "dev", None)


def test_hub_rows_are_converted(monkeypatch):
    fake = types.ModuleType("datasets")
    calls = []

    def load(path, config, split):
        calls.append((path, config, split))
        return [{"word": "bank", "sentence1": "s1", "sentence2": "s2", "label": 1, "idx": 0}]
    fake.load_dataset = load
    monkeypatch.setitem(sys.modules, "datasets", fake)
    rows = load_split(get_task("wic"), "dev", None)
    assert calls == [("aps/super_glue", "wic", "validation")]
    assert rows == [Example("wic", "wic/dev/0", ("s1", "s2 word: bank"), 1)]
    with pytest.raises(DataError, match=r"task 'mnli': column 'premise' not found in nyu-mll/glue/mnli"):
        load_split(get_task("mnli"), "dev", None)
    assert calls[-1] == ("nyu-mll/glue", "mnli", "validation_matched")


# --------------------------------------------------------------------------------------------
# k-shot sampling and splits

def test_kshot_deterministic_and_exact():
    rows = _load("rte", "train")
    a = kshot_sample(rows, 8, per="class", seed=3)
    b = kshot_sample(list(reversed(rows)), 8, per="class", seed=3)
    assert {e.uid for e in a} == {e.uid for e in b}
    assert [e.uid for e in a] == [e.uid for e in kshot_sample(rows, 8, per="class", seed=3)]
    assert {e.uid for e in kshot_sample(rows, 8, per="class", seed=4)} != {e.uid for e in a}
    assert Counter(e.label for e in a) == {0: 8, 1: 8}
    t = kshot_sample(rows, 10, per="task", seed=0)
    assert len(t) == 10 and len({e.uid for e in t}) == 10
    r = kshot_sample(_load("stsb", "train"), 8, per="class", seed=0)   # regression: 2*k
    assert len(r) == 16


def test_kshot_pinned_uids():
    # pins the sampler itself (string-seeded random.Random, no hash()): same uids on every machine;
    # a change here changes every published split
    got = [e.uid for e in kshot_sample(_load("cb", "train"), 2, per="class", seed=0)]
    assert got == ["cb/train/23", "cb/train/33", "cb/train/46", "cb/train/56", "cb/train/96", "cb/train/186"]
    assert Counter(e.label for e in kshot_sample(_load("cb", "train"), 2, seed=0)) == {0: 2, 1: 2, 2: 2}


def test_kshot_errors():
    rows = _load("cb", "train")
    with pytest.raises(DataError, match=r"task 'cb': class 'neutral' has 16 examples, 20 per class requested"):
        kshot_sample(rows, 20, per="class", seed=0)
    with pytest.raises(DataError, match="positive integer"):
        kshot_sample(rows, 0, seed=0)
    with pytest.raises(DataError, match="positive integer"):
        kshot_sample(rows, -3, seed=0)
    with pytest.raises(DataError, match="251 examples requested but only 250"):
        kshot_sample(rows, 251, per="task", seed=0)
    with pytest.raises(DataError, match="empty"):
        kshot_sample([], 4, seed=0)


def test_make_splits_disjoint_and_deterministic():
    s1 = make_splits("rte", DATA, shots=16, seed=1, max_test=100)
    s2 = make_splits("rte", DATA, shots=16, seed=1, max_test=100)
    assert [e.uid for e in s1["train"]] == [e.uid for e in s2["train"]]
    assert [e.uid for e in s1["val"]] == [e.uid for e in s2["val"]]
    assert not {e.uid for e in s1["train"]} & {e.uid for e in s1["val"]}
    assert Counter(e.label for e in s1["train"]) == {0: 16, 1: 16}
    assert Counter(e.label for e in s1["val"]) == {0: 16, 1: 16}
    assert len(s1["test"]) == 100 and all(e.uid.startswith("rte/dev/") for e in s1["test"])
    s3 = make_splits("rte", DATA, shots=16, val_shots=4, seed=2, max_test=100)
    assert [e.uid for e in s3["test"]] == [e.uid for e in s1["test"]]   # same test subset across seeds
    assert len(s3["val"]) == 8
    full = make_splits("cb", DATA, shots=8)
    assert len(full["test"]) == 56


@pytest.mark.parametrize("max_test,test_seed", [(7, 0), (100, 3), (277, 0), (None, 0)])
def test_test_subset_is_one_rule_for_runs_and_the_predictor(max_test, test_seed):
    """make_splits' test split and the pyfunc predictor's evaluate subset are the same examples."""
    import random

    from crosspt.registry import pyfunc

    assert pyfunc.select_test_examples is D.select_test_examples
    dev = load_split("rte", "dev", DATA)
    run = make_splits("rte", DATA, shots=4, seed=5, max_test=max_test, test_seed=test_seed)["test"]
    predictor = pyfunc.select_test_examples(dev, "rte", max_test, test_seed=test_seed)
    assert [e.uid for e in run] == [e.uid for e in predictor]
    idx = list(range(len(dev)))                   # the rule itself: a seeded shuffle, kept in file order
    random.Random(f"{test_seed}/rte/test").shuffle(idx)
    expected = sorted(idx[:max_test]) if max_test is not None else list(range(len(dev)))
    assert [e.uid for e in run] == [dev[i].uid for i in expected]
    with pytest.raises(DataError, match="max_test must be positive"):
        D.select_test_examples(dev, "rte", 0)


def test_make_splits_errors():
    with pytest.raises(DataError, match=r"class 'neutral' has 8 examples.*val sample"):
        make_splits("cb", DATA, shots=8, val_shots=9, seed=0)
    with pytest.raises(DataError, match="has no examples in the train sample"):
        make_splits("cb", DATA, shots=2, per="task", seed=0)
    f = make_splits("cb", DATA, shots=None, val_shots=2)
    assert len(f["val"]) == 6 and len(f["train"]) == 244


# --------------------------------------------------------------------------------------------
# user tasks from YAML

YAML = """\
name: toxic
text_fields: [comment]
label_names: [fine, toxic]
label_words:
  natural: [ok, bad]
label_sentences: ["It is fine.", "It is toxic."]
prefix: toxic
metric: f1_acc
similar_class: null
local:
  dir: mydata
  format: tsv
  header: true
  files: {train: train.tsv, dev: [dev.tsv]}
  columns: {comment: text}
  label_column: y
  label_map: {clean: 0, dirty: 1}
"""


def test_user_task_from_yaml_end_to_end(tmp_path, scratch_tasks):
    folder = tmp_path / "mydata"
    folder.mkdir()
    train = ["text\ty"] + [f"comment number {i}\t{'dirty' if i % 3 == 0 else 'clean'}" for i in range(30)]
    (folder / "train.tsv").write_text("\n".join(train) + "\n")
    (folder / "dev.tsv").write_text("text\ty\nnice one\tclean\nawful\tdirty\n")
    path = tmp_path / "toxic.yaml"
    path.write_text(YAML)

    specs = resolve_tasks([str(path), "rte"])
    assert [s.name for s in specs] == ["toxic", "rte"]
    spec = get_task("toxic")
    assert Path(spec.local["dir"]).is_absolute()
    assert spec.label_words == {"natural": ("ok", "bad"), "opaque": ("apple", "orange"), "index": ("0", "1")}
    assert label_text(spec, 1, "natural") == "bad"
    assert format_input(spec, ("hello",), True) == "toxic: comment: hello"

    rows = load_split(spec, "train", None)          # absolute folder: no data dir needed
    assert len(rows) == 30 and rows[0] == Example("toxic", "toxic/train/0", ("comment number 0",), 1)
    assert load_split(spec, "dev", DATA)[1].label == 1
    splits = make_splits(spec, None, shots=3, seed=0)
    assert Counter(e.label for e in splits["train"]) == {0: 3, 1: 3}
    assert not {e.uid for e in splits["train"]} & {e.uid for e in splits["val"]}
    assert len(splits["test"]) == 2
    assert resolve_tasks([str(path)])[0] == spec        # registering the same file again is fine


def test_bad_yaml_task(tmp_path, scratch_tasks):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\ntext_fields: [a]\nlabel_names: [x, y]\ncolour: blue\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown task field\(s\) \['colour'\]"):
        resolve_tasks([str(p)])
    with pytest.raises(ConfigError, match="task file not found"):
        resolve_tasks([str(tmp_path / "nope.yaml")])


# --------------------------------------------------------------------------------------------
# batching

def _toy(task: str, n: int) -> list[Example]:
    return [Example(task, f"{task}/train/{i}", (f"t{i}",), i % 2) for i in range(n)]


def test_multitask_batches_deterministic_and_mixed():
    by_task = {"a": _toy("a", 37), "b": _toy("b", 23)}
    b1 = multitask_batches(by_task, 8, seed=0, epoch=0)
    b2 = multitask_batches({"b": list(reversed(by_task["b"])), "a": by_task["a"]}, 8, seed=0, epoch=0)
    assert [[e.uid for e in b] for b in b1] == [[e.uid for e in b] for b in b2]
    b3 = multitask_batches(by_task, 8, seed=0, epoch=1)
    assert [[e.uid for e in b] for b in b1] != [[e.uid for e in b] for b in b3]
    assert len(b1) == 8 and sorted(e.uid for b in b1 for e in b) == sorted(e.uid for t in by_task.values() for e in t)
    assert any(len({e.task for e in b}) == 2 for b in b1)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_multitask_batches_sharding(world):
    by_task = {"a": _toy("a", 37), "b": _toy("b", 23)}     # 60 examples, batch 8 -> 8 batches
    shards = [multitask_batches(by_task, 8, seed=5, epoch=2, shard=(r, world)) for r in range(world)]
    counts = {len(s) for s in shards}
    assert len(counts) == 1
    seen = [e.uid for s in shards for b in s for e in b]
    everything = {e.uid for t in by_task.values() for e in t}
    assert set(seen) == everything                          # every example is trained on
    if 8 % world == 0:
        assert len(seen) == len(everything)                 # and exactly once when no padding is needed


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_eval_batches_cover_once(world):
    rows = _load("rte", "dev")
    shards = [eval_batches(rows, 16, shard=(r, world)) for r in range(world)]
    uids = [e.uid for s in shards for b in s for e in b]
    assert sorted(uids) == sorted(e.uid for e in rows)
    assert all(len(b) <= 16 for s in shards for b in s)
    with pytest.raises(ValueError):
        eval_batches(rows, 16, shard=(world, world))


def test_task_instruction_fills_the_label_words_and_is_checked():
    """Every built-in task has its own instruction; "{choices}" reads the run's label words; a task YAML's
    `instruction` is kept, a missing one means the generic instruction, a stray placeholder is one clear error."""
    from crosspt.errors import ConfigError

    assert len({specs.get_task(n).instruction for n in specs.list_tasks()} - {""}) >= 10
    sst2 = specs.get_task("sst2")
    assert specs.instruction_text(sst2, "natural") == \
        "Is the sentiment of this review negative or positive? Answer with one word."
    assert specs.instruction_text(sst2, "opaque") == \
        "Is the sentiment of this review apple or orange? Answer with one word."
    assert specs.instruction_text(specs.get_task("mnli"), "natural").endswith("Answer yes, maybe or no.")
    assert specs.instruction_text(specs.get_task("stsb"), "natural").endswith("Answer a number from 0.0 to 5.0.")
    base = {"name": "mine", "text_fields": ["text"], "label_names": ["bad", "good"]}
    mine = specs.task_from_dict({**base, "instruction": "Is it good? Say {choices}."})
    assert specs.instruction_text(specs._validate(mine), "natural") == "Is it good? Say bad or good."
    assert specs.instruction_text(specs._validate(specs.task_from_dict(base)), "natural") == \
        specs.DEFAULT_INSTRUCTION.format(choices="bad or good")
    with pytest.raises(ConfigError, match="task 'mine': 'instruction' may hold no placeholder but"):
        specs._validate(specs.task_from_dict({**base, "instruction": "Say {labels}."}))

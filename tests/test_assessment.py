"""The assessment split (`data.assess_rows`): fixed rows of each target task's train pool that a run scores its
selected state on once, at the end, and that no k-shot sample of any seed, no source prompt, no early stopping
and no selection ever touches."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from crosspt.config.schema import config_hash, load_config
from crosspt.errors import ConfigError, DataError
from crosspt.tasks.data import (ASSESS_AUTO, ASSESS_DEFAULT_ROWS, TrainPool, assessment_reserve, load_split,
                                make_splits, pool_half)

REPO = Path(__file__).resolve().parents[1]


def _uids(rows) -> set[str]:
    return {e.uid for e in rows}


# SST-2's train file is 67k rows, parsed again by every draw: fewer seeds there
@pytest.mark.parametrize("task,shots,seeds", [("rte", 16, 40), ("cb", 3, 40), ("sst2", 16, 6)])
def test_assessment_rows_are_fixed_and_disjoint_from_every_kshot_and_source_row(task, shots, seeds, data_dir):
    """Over many seeds: the same assessment rows for every seed; none of them in any seed's k-shot train or
    validation sample (targets draw train from the whole split), nor in the source half that source prompts
    pre-train and select on; and the rows not set aside are all still drawable."""
    train_rows = load_split(task, "train", data_dir)
    source_half = {e.uid for e in train_rows if pool_half(e.uid) == TrainPool.SOURCE}
    first = None
    for seed in range(seeds):
        s = make_splits(task, data_dir, shots=shots, seed=seed, max_test=20, pool="target", assess_rows=ASSESS_AUTO)
        assess = _uids(s["assess"])
        first = first or assess
        assert assess == first, f"seed {seed} assessed other rows"
        assert not assess & (_uids(s["train"]) | _uids(s["val"])), f"seed {seed}: a k-shot row is an assessment row"
        assert not assess & source_half
        # the source side of a search (crosspt pretrain-sources: pool=source) never sees them either
        src = make_splits(task, data_dir, shots=shots, seed=seed, pool="source", assess_rows=ASSESS_AUTO)
        assert not assess & (_uids(src["train"]) | _uids(src["val"]))
    assert len(first) == min(ASSESS_DEFAULT_ROWS, len(assessment_reserve(train_rows)))
    full = make_splits(task, data_dir, shots=None, val_shots=2, seed=3, assess_rows=ASSESS_AUTO)  # full-data train
    assert not _uids(full["assess"]) & (_uids(full["train"]) | _uids(full["val"]))
    assert len(full["train"]) + len(full["val"]) == len(train_rows) - len(assessment_reserve(train_rows))


def test_off_leaves_kshot_rows_as_before_and_the_row_count_changes_no_training_row(data_dir):
    """assess_rows 0 is the draw as it was (no "assess" split, the same uids as the default); any count above 0
    sets aside the same reserve, so 50, 300 and `auto` train and validate on the same rows, and the assessment
    rows of a smaller count are the first of a larger one's."""
    plain = make_splits("rte", data_dir, shots=16, seed=7, max_test=20, pool="target")
    off = make_splits("rte", data_dir, shots=16, seed=7, max_test=20, pool="target", assess_rows=0)
    assert "assess" not in off and all(_uids(off[k]) == _uids(plain[k]) for k in ("train", "val", "test"))
    runs = {n: make_splits("rte", data_dir, shots=16, seed=7, max_test=20, pool="target", assess_rows=n)
            for n in (50, 300, ASSESS_AUTO)}
    assert len({(tuple(_uids(r["train"])), tuple(_uids(r["val"]))) for r in runs.values()}) == 1
    assert _uids(runs[50]["assess"]) < _uids(runs[300]["assess"]) == _uids(runs[ASSESS_AUTO]["assess"])
    # what a run trains on changed with assessment on: another config hash; 0 keeps the old hash
    assert config_hash(load_config(None, {"data.assess_rows": 0})) == config_hash(load_config(None, {}))
    assert config_hash(load_config(None, {"data.assess_rows": 300})) != config_hash(load_config(None, {}))


@pytest.mark.parametrize("value", [-1, 1001, "all", True, 2.5])
def test_bad_assess_rows_is_one_config_error(value):
    with pytest.raises(ConfigError, match=r"^config: 'data.assess_rows': .*must be 0 \(off\), 1..1000 or 'auto'"):
        load_config(None, {"data.assess_rows": value})


def test_more_rows_than_the_pool_holds_is_one_data_error(data_dir):
    reserve = len(assessment_reserve(load_split("cb", "train", data_dir)))
    with pytest.raises(DataError, match=rf"^task 'cb': data.assess_rows is 900 but its train split can set aside "
                                        rf"0..{reserve} assessment rows"):
        make_splits("cb", data_dir, shots=4, seed=0, assess_rows=900)
    make_splits("cb", data_dir, shots=4, seed=0, assess_rows=reserve)       # the whole reserve is allowed


@pytest.mark.slow
def test_cli_refuses_bad_assess_rows_with_one_line(data_dir, tmp_path):
    """`crosspt train` with too many assessment rows for its task: exit non-zero, one error line, no run."""
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    out = subprocess.run([sys.executable, "-m", "crosspt.cli", "train", *[a for kv in ("tasks=[cb]", "data.shots=4",
                          "data.assess_rows=900", f"data.data_dir={data_dir}", "train.epochs=1") for a in ("--set", kv)]],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert out.returncode != 0 and len(lines) == 1 and "data.assess_rows is 900" in lines[0], out.stderr
    assert not (tmp_path / "crosspt_runs").exists()


@pytest.mark.slow
def test_assessment_never_steers_training_or_selection(minilm_path, data_dir, tmp_path):
    """The same run with and without its assessment split: identical epochs, validation scores, best epoch,
    selected state and test score; the assessment metrics appear once, in the last report, and the result
    carries them (assess_score: mean over tasks of each task's main metric, like test_score)."""
    from crosspt.run import inputs, loop
    from crosspt.tasks.metrics import primary_metric
    from crosspt.tasks.specs import get_task

    cfg = load_config(None, {"tasks": ["rte", "sst2"], "seed": 3, "backbone.name": "minilm",
                             "backbone.max_length": 48, "data.data_dir": str(data_dir), "data.shots": 4,
                             "data.max_test": 16, "data.assess_rows": 24, "train.epochs": 4, "train.patience": 2,
                             "optim.prompt_lr": 0.3})
    _, splits = inputs.prepare_data(cfg)
    without = {t: {k: v for k, v in s.items() if k != "assess"} for t, s in splits.items()}
    runs = {}
    for name, sp in (("with", splits), ("without", without)):
        session = loop.LocalSession(tmp_path / name)
        result = loop.run_loop(cfg, session, splits=sp)
        runs[name] = (result, session.reports)
    (res, reports), (res0, reports0) = runs["with"], runs["without"]
    # the losses are compared to float rounding: CPU kernels may sum in another order from one run to the next
    # (seen: 0.99846467 vs 0.99846473 for the same run twice, with or without assessment)
    inexact = ("train_loss", "initial.train_loss")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("assess") and not k.endswith("_s")
                           and k not in inexact} for r in rows]
    assert strip(reports) == strip(reports0)
    assert [r["train_loss"] for r in reports] == pytest.approx([r["train_loss"] for r in reports0], rel=1e-5)
    assert len(reports) >= 2                    # the selection had epochs to choose from
    for key in ("best_epoch", "best_val_score", "test_score", "epochs_run", "router_weights"):
        assert res[key] == res0[key], key
    assert [h["val_score"] for h in res["history"]] == [h["val_score"] for h in res0["history"]]
    assert not any(k.startswith("assess") for r in reports[:-1] for k in r)
    last = reports[-1]
    assert "assess_score" not in res0 and not any(k.startswith("assess") for k in reports0[-1])
    mains = {t: primary_metric(get_task(t)) for t in cfg.tasks}
    assert last["assess_score"] == res["assess_score"] == pytest.approx(
        sum(last[f"assess_{t}_{m}"] for t, m in mains.items()) / 2)
    assert all(res["metrics"][t]["assess"][m] == last[f"assess_{t}_{m}"] for t, m in mains.items())


def test_repeats_average_the_assessment_like_the_objective():
    from crosspt.search.repeats import mean_row

    rows = [{"epoch": 2, "best_val_score": 0.5, "assess_score": 0.6, "assess_rte_accuracy": 0.6},
            {"epoch": 2, "best_val_score": 0.7, "assess_score": 0.8, "assess_rte_accuracy": 0.8}]
    row = mean_row(rows, 2, True, ("best_val_score", "assess_score"))
    assert row["assess_score"] == pytest.approx(0.7) and row["assess_rte_accuracy"] == pytest.approx(0.7)
    assert row["assess_score_r1"] == 0.8 and row["assess_score_std"] == pytest.approx(0.1)


def test_split_key_tells_apart_what_changes_the_rows():
    """The driver ships a trial the splits drawn for its key: a config whose rows differ needs another key
    (data.train_pool was missing from the key: a trial with another pool got the base's rows)."""
    from crosspt.run.shipping import split_key

    base = load_config(None, {"data.assess_rows": "auto"})
    for over in ({"data.assess_rows": 0}, {"data.assess_rows": 50}, {"data.train_pool": "all"}):
        assert split_key(load_config(None, {"data.assess_rows": "auto", **over})) != split_key(base), over
    assert split_key(load_config(None, {"data.assess_rows": "auto", "optim.prompt_lr": 0.5})) == split_key(base)


def test_searches_assess_by_default_and_sources_do_not():
    from crosspt.config.space import SearchSpace

    space = SearchSpace.model_validate({"name": "a", "base": {"tasks": ["rte"]},
                                        "space": {"optim.prompt_lr": {"type": "loguniform", "low": 0.01, "high": 0.3}}})
    assert space.base_config().data.assess_rows == ASSESS_AUTO
    assert space.config_for({"optim.prompt_lr": 0.1}).data.assess_rows == ASSESS_AUTO
    assert load_config(None, {}).data.assess_rows == 0          # crosspt train: off unless asked
    off = SearchSpace.model_validate({**space.model_dump(mode="json"), "base": {"tasks": ["rte"], "data": {"assess_rows": 0}}})
    assert off.base_config().data.assess_rows == 0


def test_cli_train_with_assessment_logs_it_like_a_trial(tiny_t5_path, data_dir, tmp_path, monkeypatch, capsys):
    """`crosspt train --set data.assess_rows=20`: the run's metrics carry assess_score and assess_rte_accuracy,
    its inputs `rte-assess` (digest: the hash of the row ids, the rows make_splits sets aside), and the printed
    table an `assess` line."""
    import hashlib

    from mlflow import MlflowClient

    from crosspt.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'train.db'}"
    sets = ["tasks=[rte]", f"backbone.name={tiny_t5_path}", f"data.data_dir={data_dir}", "data.shots=2",
            "train.epochs=1", "train.batch_size=4", "data.max_test=8", "backbone.max_length=48",
            "prompt.private_len=4", "data.assess_rows=20"]
    args = ["train", *[a for kv in sets for a in ("--set", kv)], "--output-dir", str(tmp_path / "o"),
            "--tracking-uri", uri, "--experiment", "assessed"]
    assert main(args) == 0
    assert any(line.split()[:2] == ["rte", "assess"] for line in capsys.readouterr().out.splitlines())
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("assessed").experiment_id])
    m = run.data.metrics
    assert m["assess_score"] == m["assess_rte_accuracy"]
    (ds,) = [d.dataset for d in run.inputs.dataset_inputs if d.dataset.name == "rte-assess"]
    rows = make_splits("rte", data_dir, shots=2, seed=0, max_test=8, pool="target", assess_rows=20)["assess"]
    assert ds.digest == hashlib.sha256("\n".join(e.uid for e in rows).encode()).hexdigest()[:16]

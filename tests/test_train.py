"""`crosspt train`: one configuration end to end — in-process, as a 2-worker Ray Train DDP run, resumed
from a mid-run checkpoint, and bad input through the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crosspt.config.schema import load_config
from crosspt.run.trainer import train

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(backbone: Path, data_dir: Path, **over):
    base = {"tasks": ["sst2", "rte"], "seed": 0, "backbone.name": str(backbone), "backbone.max_length": 48,
            "data.data_dir": str(data_dir), "data.shots": 8, "data.max_test": 32,
            "prompt.private_len": 4, "prompt.n_sources": 2, "prompt.source_len": 4, "prompt.source_bank": "random",
            "prompt.learn_sources": True,
            "train.epochs": 4, "train.batch_size": 8, "train.patience": None, "optim.prompt_lr": 0.05}
    base.update(over)
    return load_config(None, base)


def test_in_process_run_reports_every_epoch_and_final_metrics(tiny_t5_path, data_dir, tmp_path):
    reports = []
    cfg = tiny_cfg(tiny_t5_path, data_dir, **{"scaling.in_process": True})
    result = train(cfg, output_dir=tmp_path, on_report=lambda m, c: reports.append((m, c)))
    assert [m["epoch"] for m, _ in reports] == [0, 1, 2, 3]
    assert all(c is not None and (c / "prompts.safetensors").is_file() for _, c in reports[-2:])
    assert set(result["metrics"]) == {"sst2", "rte"}
    assert 0.0 <= result["metrics"]["rte"]["test"]["accuracy"] <= 1.0
    # the best epoch is the best validation score seen, the untrained start (epoch -1) included
    assert result["best_val_score"] == max(h["val_score"] for h in result["history"])
    assert result["history"][0]["epoch"] == -1 and result["epochs_run"] == 4
    assert 0 < result["trainable_params"] < result["total_params"]
    # the kept checkpoint holds the best epoch's prompts, not the last epoch's
    from crosspt.run.artifacts import load_prompt_artifact

    _, meta = load_prompt_artifact(reports[-1][1] / "prompts.safetensors")
    assert meta["epoch"] == result["best_epoch"]


def test_resume_from_mid_run_checkpoint_continues_that_run(tiny_t5_path, data_dir, tmp_path):
    cfg = tiny_cfg(tiny_t5_path, data_dir, **{"scaling.in_process": True, "prompt.n_sources": 0})
    full_reports = []
    full = train(cfg, output_dir=tmp_path / "full", on_report=lambda m, c: full_reports.append(m))
    mid = tmp_path / "full" / "checkpoints" / "epoch_0002"      # checkpoints of epochs 2 and 3 are kept
    assert mid.is_dir()
    resumed_reports = []
    resumed = train(cfg, output_dir=tmp_path / "resumed", resume_from=mid,
                    on_report=lambda m, c: resumed_reports.append(m))
    assert [m["epoch"] for m in resumed_reports] == [3]          # continues at epoch 3, no restart
    assert resumed_reports[0]["global_step"] == full_reports[3]["global_step"]
    assert resumed_reports[0]["val_score"] == pytest.approx(full_reports[3]["val_score"], abs=1e-6)
    for task in ("sst2", "rte"):
        assert resumed["metrics"][task]["test"] == pytest.approx(full["metrics"][task]["test"])
    assert resumed["best_val_score"] == pytest.approx(full["best_val_score"], abs=1e-6)
    # a checkpoint of another configuration is refused
    from crosspt.errors import ArtifactError

    other = tiny_cfg(tiny_t5_path, data_dir, **{"scaling.in_process": True, "prompt.n_sources": 0,
                                                "prompt.private_len": 6})
    with pytest.raises(ArtifactError, match="config"):
        train(other, output_dir=tmp_path / "other", resume_from=mid)


def test_run_loop_trains_on_precomputed_splits(tiny_t5_path, data_dir, tmp_path, monkeypatch):
    """`splits=`: the loop takes the k-shot splits it is handed and reads no data; splits of other
    tasks are refused."""
    from crosspt.errors import ConfigError
    from crosspt.run import inputs, loop

    cfg = tiny_cfg(tiny_t5_path, data_dir, **{"train.epochs": 1, "prompt.n_sources": 0})
    _, splits = inputs.prepare_data(cfg)
    fewer = {t: {**s, "train": s["train"][:3]} for t, s in splits.items()}     # 6 examples: one batch of 8

    def no_reading(*a, **k):
        raise AssertionError("make_splits called although splits were given")

    monkeypatch.setattr(inputs, "make_splits", no_reading)
    result = loop.run_loop(cfg, loop.LocalSession(tmp_path), splits=fewer)
    assert result["history"][-1]["global_step"] == 1
    with pytest.raises(ConfigError, match="precomputed splits"):
        inputs.prepare_data(cfg, splits={"sst2": splits["sst2"]})


@pytest.mark.slow
def test_two_worker_ddp_matches_one_worker(ray_head, minilm_path, data_dir, tmp_path):
    """Same global batch: 2 DDP workers (gloo) end with identical prompts on both ranks and reach the
    1-worker run's validation metric within 2 points (real MiniLM, real SST-2/RTE rows)."""
    common = {"backbone.name": "minilm", "data.val_shots": 32, "train.epochs": 3, "prompt.n_sources": 0,
              "prompt.private_len": 8, "optim.prompt_lr": 0.01, "scaling.in_process": False}
    one = train(tiny_cfg(minilm_path, data_dir, **common, **{"scaling.num_workers": 1}), output_dir=tmp_path / "w1")
    two = train(tiny_cfg(minilm_path, data_dir, **common, **{"scaling.num_workers": 2}), output_dir=tmp_path / "w2")
    hist1 = [h["val_score"] for h in one["history"]]
    hist2 = [h["val_score"] for h in two["history"]]
    print("val per epoch, 1 worker:", hist1, "2 workers:", hist2)
    assert two["world_size"] == 2 and len(set(two["rank_state_digests"])) == 1
    assert abs(two["best_val_score"] - one["best_val_score"]) <= 0.02
    assert max(abs(a - b) for a, b in zip(hist1, hist2)) <= 0.02


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "crosspt.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "sst2,nosuchtask"], "unknown task 'nosuchtask'"),
    (["--backbone", "no-such-org/no-such-model-xyz"], "unknown backbone"),
    (["--set", "prompt.bogus=1"], "prompt.bogus"),
    (["--set", "prompt.private_len=abc"], "prompt.private_len"),
])
def test_bad_input_is_one_clear_line(args, needle, data_dir, tmp_path):
    out = run_cli("train", "--data-dir", str(data_dir), "--output-dir", str(tmp_path), *args,
                  env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    err = [l for l in out.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(err) == 1 and needle in err[0], out.stderr[-2000:]


def test_malformed_yaml_and_missing_column(data_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [sst2\nprompt: {private_len: 4}\n")
    out = run_cli("train", "--config", str(bad))
    assert out.returncode == 2 and "malformed YAML" in out.stderr and "Traceback" not in out.stderr
    # a local glue_data folder whose SST-2 train file lacks the 'sentence' column
    glue = tmp_path / "data" / "glue_data" / "SST-2"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text("text\tlabel\nfine\t1\nbad\t0\n")
    (glue / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    out = run_cli("train", "--tasks", "sst2", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "o"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'sentence'" in out.stderr and "train.tsv" in out.stderr


@pytest.mark.slow
def test_cli_train_minilm_real_rows_writes_output_json(data_dir, tmp_path):
    """The README's first run: offline MiniLM, real SST-2 rows, output JSON with the promised keys."""
    out_json = tmp_path / "run.json"
    out = run_cli("train", "--backbone", "minilm", "--tasks", "sst2", "--shots", "16", "--seed", "0",
                  "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"), "--output-json", str(out_json),
                  "--set", "train.epochs=3", "--set", "data.max_test=200", "--set", "scaling.in_process=true")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out_json.read_text())
    assert set(res) >= {"metrics", "trainable_params", "total_params", "wall_s", "config_hash"}
    assert res["metrics"]["sst2"]["test"]["accuracy"] > 0.6            # zero-shot label scoring alone is ~0.69
    assert res["trainable_params"] < 0.01 * res["total_params"]


def _train_args(backbone: Path, data_dir: Path, out: Path) -> list[str]:
    return ["train", "--backbone", str(backbone), "--tasks", "rte", "--shots", "4", "--seed", "0",
            "--data-dir", str(data_dir), "--output-dir", str(out), "--set", "train.epochs=2",
            "--set", "data.max_test=16", "--set", "backbone.max_length=48", "--set", "prompt.private_len=4",
            "--set", "scaling.in_process=true"]


def test_cli_train_logs_one_mlflow_run_like_a_search_child(tiny_t5_path, data_dir, tmp_path, monkeypatch):
    """`crosspt train` logs one run: flat params (inactive factors marked), per-epoch metrics, config.yaml,
    the best prompts (no router heatmap without a router), a dataset input per task and split, provenance tags, FINISHED;
    `--no-tracking` writes no store at all."""
    from mlflow import MlflowClient

    from crosspt.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'train.db'}"
    assert main(_train_args(tiny_t5_path, data_dir, tmp_path / "o") + ["--tracking-uri", uri,
                                                                         "--experiment", "single"]) == 0
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("single")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    (run,) = c.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in run.data.tags
    p = run.data.params
    assert p["prompt.private_len"] == "4" and p["tasks"] == "rte" and p["config_hash"]
    assert p["prompt.source_len"] == "inactive" and p["optim.router_lr"] == "inactive"    # no sources
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val_score")] == [-1, 0, 1]   # untrained, then per epoch
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "prompts"} <= arts and "plots" not in arts   # one candidate: no router, no heatmap
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"rte-train", "rte-val", "rte-test"}
    assert run.data.tags.get("crosspt.version.crosspt") and run.data.tags.get("crosspt.data_source")

    assert main(_train_args(tiny_t5_path, data_dir, tmp_path / "o2") + ["--no-tracking"]) == 0
    assert not (tmp_path / "mlflow.db").exists()


def test_seq2seq_reports_generated_metrics_beside_ranked_ones(tiny_t5_path, data_dir, tmp_path):
    """Rank classification and greedy generation both score the best state on test: `accuracy` and
    `gen_accuracy` side by side (generation parses the decoded text; unparsable counts as wrong)."""
    cfg = tiny_cfg(tiny_t5_path, data_dir, **{"scaling.in_process": True, "train.epochs": 1, "tasks": ["rte"],
                                                "prompt.n_sources": 0, "prompt.learn_sources": False})
    result = train(cfg, output_dir=tmp_path)
    test = result["metrics"]["rte"]["test"]
    assert set(test) == {"accuracy", "gen_accuracy"} and 0.0 <= test["gen_accuracy"] <= 1.0
    assert result["test_score"] == test["accuracy"]                  # the ranked metric still ranks runs


def test_prompt_vs_zero_shot_reads_the_best_prompt_whose_folder_is_gone(tiny_t5_path, data_dir, tmp_path):
    """benchmarks/prompt_vs_zero_shot.py reads a run's best prompts from its LAST checkpoint: the best epoch's own
    folder may be gone (a run keeps two) or never exist (epoch -1). It used to open `epoch_<best>/`, and failed
    with FileNotFoundError when the README command's best epoch 3 of 7 had been cleaned up."""
    from safetensors.torch import load_file

    from benchmarks.prompt_vs_zero_shot import prompts_to_read
    from crosspt.run.artifacts import load_prompt_artifact

    # an lr too small to change a validation answer: no epoch beats the untrained prompt (best epoch -1)
    cfg = tiny_cfg(tiny_t5_path, data_dir, **{"scaling.in_process": True, "optim.prompt_lr": 1e-12,
                                              "optim.router_lr": 1e-12, "train.epochs": 3})
    result = train(cfg, output_dir=tmp_path)
    assert result["best_epoch"] == -1
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch_*")) == ["epoch_0001", "epoch_0002"]
    epoch, path = prompts_to_read(tmp_path)
    assert epoch == -1 and path.is_file()
    _, meta = load_prompt_artifact(path)
    assert meta["epoch"] == -1
    assert set(load_file(str(path))) >= {"prompt.private.prompts", "prompt.router.logits"}
    assert prompts_to_read(tmp_path, 2) == (2, tmp_path / "checkpoints" / "epoch_0002" / "state.safetensors")

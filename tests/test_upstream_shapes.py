"""The private shapes of Ray, MLflow and transformers that crosspt relies on (crosspt/run/_ray_compat.py,
crosspt/registry/_mlflow_compat.py, crosspt/backbones/_transformers_compat.py), held against the installed libraries: each test fails, naming the
shape, when an upgrade moves or renames what the adapter reaches into."""
from __future__ import annotations

import json

import pytest


def test_ray_job_runtime_env_is_read_from_ray_private_variable(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from crosspt.run._ray_compat import job_runtime_env

    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert job_runtime_env() == {}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"env_vars": {"A": "1"}}}))
    assert job_runtime_env() == {"env_vars": {"A": "1"}}


def test_ray_cluster_mode_switch_is_a_module_constant():
    from ray._private import ray_constants

    from crosspt.run._ray_compat import cluster_mode_off

    before = ray_constants.ENABLE_RAY_CLUSTER
    assert isinstance(before, bool)
    with cluster_mode_off():
        assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert ray_constants.ENABLE_RAY_CLUSTER is before


def test_ray_checkpoint_delete_raises_on_a_gone_path_and_is_tolerated(tmp_path):
    """Ray's `_delete_fs_path(fs, fs_path)` raises FileNotFoundError for a checkpoint already deleted (the
    bug the adapter works around); after `tolerate_deleted_checkpoints` it does not, and a present path is
    still deleted."""
    import pyarrow.fs
    from ray.train._internal import checkpoint_manager as cm

    from crosspt.run._ray_compat import tolerate_deleted_checkpoints

    fs, gone = pyarrow.fs.LocalFileSystem(), str(tmp_path / "checkpoint_000001")
    original = cm._delete_fs_path
    try:
        if not getattr(original, "crosspt_tolerant", False):
            with pytest.raises(FileNotFoundError):
                original(fs=fs, fs_path=gone)
        tolerate_deleted_checkpoints()
        cm._delete_fs_path(fs=fs, fs_path=gone)
        present = tmp_path / "checkpoint_000002"
        present.mkdir()
        cm._delete_fs_path(fs=fs, fs_path=str(present))
        assert not present.exists()
    finally:
        cm._delete_fs_path = original


def test_optuna_search_keeps_its_study_and_trials_where_the_adapter_reads_them():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from crosspt.run._ray_compat import completed_trials, optuna_study, optuna_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearch(lambda trial: trial.suggest_float("x", 0.0, 1.0) and None, metric="acc", mode="max",
                            sampler=optuna.samplers.RandomSampler(seed=0))
    assert isinstance(optuna_study(searcher), optuna.Study)
    optuna_study(searcher).enqueue_trial({"x": 0.25})
    assert searcher.suggest("t1") == {"x": 0.25}
    assert isinstance(optuna_trials(searcher)["t1"], optuna.Trial)
    assert completed_trials(searcher) == set()
    searcher.on_trial_complete("t1", {"acc": 0.5})
    assert "t1" in completed_trials(searcher)
    assert optuna_study(searcher).trials[0].value == 0.5


def test_asha_keeps_its_limits_and_stop_count_where_the_adapter_reads_them():
    from ray.tune.schedulers import AsyncHyperBandScheduler

    from crosspt.run._ray_compat import asha_before_last_step, asha_uncount_stop

    asha = AsyncHyperBandScheduler(metric="acc", mode="max", time_attr="training_iteration", max_t=4)
    assert asha_before_last_step(asha, {"training_iteration": 3})
    assert not asha_before_last_step(asha, {"training_iteration": 4})
    stopped = asha._num_stopped
    assert isinstance(stopped, int)
    asha_uncount_stop(asha)
    assert asha._num_stopped == stopped - 1


def test_mlflow_log_table_file_is_what_the_adapter_writes(tmp_path):
    """`replace_table` writes log_table's own file format, and replaces where log_table appends."""
    from crosspt.registry import store
    from crosspt.registry._mlflow_compat import replace_table, write_table_file

    c = store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = c.create_run(c.create_experiment("shapes", artifact_location=str(tmp_path / "art"))).info.run_id
    first = {"factor": ["lr", "bank"], "importance": [0.5, None]}
    c.log_table(run_id, first, "report/factors.json")
    logged = c.download_artifacts(run_id, "report/factors.json", str(tmp_path / "dl1"))
    write_table_file(first, tmp_path / "ours.json")
    assert (tmp_path / "ours.json").read_bytes() == open(logged, "rb").read()

    second = {"factor": ["lr"], "importance": [0.7]}
    replace_table(c, run_id, second, "report/factors.json")
    got = json.loads(open(c.download_artifacts(run_id, "report/factors.json", str(tmp_path / "dl2"))).read())
    assert got["columns"] == ["factor", "importance"] and got["data"] == [["lr", 0.7]]
    tags = json.loads(c.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "report/factors.json", "type": "table"} in tags


def test_transformers_gguf_quantizer_blocks_saving_until_the_adapter_drops_it(tmp_path):
    """A model read from a GGUF file carries its quantizer as `model.hf_quantizer` (and a GgufConfig as
    `config.quantization_config`), and `save_pretrained` refuses it; `drop_gguf_quantizer` makes it an
    ordinary checkpoint that loads back without a quantizer."""
    import transformers
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    from crosspt.backbones._transformers_compat import drop_gguf_quantizer

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    gguf = GgufConfig(gguf_file="model.gguf")
    model.hf_quantizer, model.config.quantization_config = GgufHfQuantizer(gguf), gguf     # as from_pretrained leaves it
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    drop_gguf_quantizer(model)
    model.save_pretrained(tmp_path / "saved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert getattr(again, "hf_quantizer", None) is None and not hasattr(again.config, "quantization_config")

"""The search learns from the right signal: liveness (no dead factor is searched or rated), validation
objectives only, no silent random sources, repeats that ASHA can stop per epoch, the untrained evaluation
logged, Optuna kept truthful across restores, resume of an ended run returns its result.

Fast: real configs and spaces, a real Optuna sqlite study, a real MLflow sqlite store, a tiny T5 on real
GLUE rows; no Ray cluster (the end-to-end searches are in test_search.py / test_reliability.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crosspt.config.schema import load_config
from crosspt.config.space import SearchSpace, load_space, random_sampler, sample
from crosspt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def space_tree(**space) -> dict:
    return {"name": "sig", "base": {"tasks": ["sst2"], "backbone": {"name": "minilm"},
                                    "prompt": {"private_len": 4, "source_bank": "random"}},
            "space": space}


def write(tmp_path: Path, tree: dict) -> Path:
    f = tmp_path / "space.yaml"
    f.write_text(yaml.safe_dump(tree, sort_keys=False))
    return f


# ---- liveness: one table --------------------------------------------------------------------------
def test_a_factor_no_sampled_config_reads_is_refused_with_one_line(tmp_path):
    """The offline_default space as shipped before searched `prompt.temperature.rate`, which only the `step`
    schedule reads (the default is `exp`): refused, naming the factor and why."""
    tree = space_tree(**{"prompt.n_sources": {"type": "int", "low": 0, "high": 3},
                         "prompt.temperature.rate": {"type": "loguniform", "low": 1e-4, "high": 0.1,
                                                     "when": {"prompt.n_sources": ">0"}}})
    with pytest.raises(ConfigError) as e:
        load_space(write(tmp_path, tree))
    msg = str(e.value)
    print("\n" + msg)
    assert "'prompt.temperature.rate' is never read" in msg and "schedule 'step'" in msg and "\n" not in msg
    # routing keys without anything to route, placement on an encoder, init without a private prompt
    for key, p, base_prompt, why in [
            ("prompt.normalization", {"type": "choice", "values": ["noisy_topk", "reference"]}, {}, "two or more"),
            ("prompt.placement", {"type": "choice", "values": ["before", "after"]}, {}, "encoder"),
            ("prompt.init", {"type": "choice", "values": ["vocab", "random"]},
             {"n_sources": 2, "private_len": 0}, "private_len > 0")]:
        t = space_tree(**{key: p})
        t["base"]["prompt"].update(base_prompt)
        with pytest.raises(ConfigError, match=rf"'{key}' is never read.*{why}"):
            load_space(write(tmp_path, t))
    # a when: that never holds is the same kind of no-op
    t = space_tree(**{"optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.1,
                                          "when": {"prompt.n_sources": ">5"}}})
    with pytest.raises(ConfigError, match="'optim.prompt_lr' is never read.*when: .* never holds"):
        load_space(write(tmp_path, t))


def test_the_cli_refuses_a_dead_factor_before_anything_starts(tmp_path):
    tree = space_tree(**{"prompt.temperature.rate": {"type": "loguniform", "low": 1e-4, "high": 0.1}})
    tree["base"]["prompt"]["n_sources"] = 2
    out = subprocess.run([sys.executable, "-m", "crosspt.cli", "search", "--space", str(write(tmp_path, tree))],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    print("\n$ crosspt search --space space.yaml ->", out.returncode, out.stderr.strip())
    assert out.returncode != 0 and "prompt.temperature.rate" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_a_factor_is_sampled_only_where_it_acts():
    """`sample` skips a factor where the liveness table says it does not act, so Optuna never records a
    no-op value: no routing factor without two candidates, the rate only under `step`."""
    space = SearchSpace.model_validate(space_tree(**{
        "prompt.n_sources": {"type": "int", "low": 0, "high": 2},
        "prompt.private_len": {"type": "choice", "values": [0, 4]},
        "prompt.composition": {"type": "choice", "values": ["cat", "wavg"]},
        "prompt.temperature.schedule": {"type": "choice", "values": ["exp", "step"]},
        "prompt.temperature.rate": {"type": "loguniform", "low": 1e-4, "high": 0.1},
        "optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.1}}))
    seen = []
    for i in range(200):
        skipped: dict = {}
        try:
            p = sample(space, random_sampler(i), skipped=skipped)
            space.config_for(p)
        except ConfigError:            # n_sources 0 and private_len 0: no prompt at all (refused elsewhere)
            continue
        seen.append(p)
        n_cand = p["prompt.n_sources"] + (p["prompt.private_len"] > 0)
        assert ("prompt.composition" in p) == (n_cand >= 2), p
        assert ("prompt.temperature.rate" in p) == (n_cand >= 2 and p.get("prompt.temperature.schedule") == "step"), p
        assert all(why == "dead" for why in skipped.values())
    assert any("prompt.temperature.rate" in p for p in seen) and any("prompt.composition" not in p for p in seen)


def test_a_factor_whose_liveness_depends_on_a_later_one_is_refused(tmp_path):
    tree = space_tree(**{"prompt.composition": {"type": "choice", "values": ["cat", "wavg"]},
                         "prompt.n_sources": {"type": "int", "low": 0, "high": 2}})
    with pytest.raises(ConfigError, match="'prompt.composition': whether it acts depends on 'prompt.n_sources'"):
        load_space(write(tmp_path, tree))


def test_inactive_marking_follows_the_table():
    """MLflow's `inactive` params come from the same table: a private-only trial's routing keys, and the
    placement on an encoder."""
    from crosspt.search.params import trial_params

    space = SearchSpace.model_validate(space_tree(**{"optim.prompt_lr": {"type": "loguniform", "low": 1e-3,
                                                                         "high": 0.1}}))
    params = trial_params(space.config_for({"optim.prompt_lr": 0.01}), space, {"optim.prompt_lr": 0.01})
    for key in ("prompt.normalization", "prompt.temperature.rate", "prompt.router_bias", "prompt.placement",
                "prompt.source_bank", "optim.router_lr"):
        assert params[key] == "inactive", key
    assert params["prompt.init"] != "inactive" and params["backbone.pair_encoding"] != "inactive"


def test_every_shipped_space_loads():
    for f in sorted((REPO / "search_spaces").glob("*.yaml")):
        assert load_space(f).space, f


def test_decoder_space_searches_the_decoders_own_factors():
    """search_spaces/decoder_smollm2.yaml validates (liveness included: every factor acts on a decoder) and
    searches template, init, private length, lr and label words on the smollm2 preset's validation rows."""
    space = load_space(REPO / "search_spaces" / "decoder_smollm2.yaml")
    assert set(space.space) == {"backbone.template", "prompt.init", "prompt.private_len", "optim.prompt_lr",
                                "prompt.label_semantics"}
    cfg = space.config_for({"backbone.template": "plain", "prompt.private_len": 4, "prompt.init": "text",
                            "prompt.label_semantics": "opaque", "optim.prompt_lr": 0.05})
    assert (cfg.backbone.name, cfg.backbone.template, cfg.prompt.init, cfg.data.val_shots) == ("smollm2", "plain", "text", 32)


# ---- objective, scheduler, sources ------------------------------------------------------------------
def test_selecting_on_test_is_refused(tmp_path):
    tree = space_tree(**{"optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.1}})
    for metric in ("test_score", "test_sst2_accuracy"):
        tree["objective"] = {"metric": metric, "mode": "max"}
        with pytest.raises(ConfigError, match=f"'objective.metric'.*{metric}.*selects on the test split"):
            load_space(write(tmp_path, tree))
    tree["objective"] = {"metric": "best_val_score", "mode": "max"}
    tree["scheduler"] = {"type": "asha", "metric": "val_score"}
    with pytest.raises(ConfigError, match="scheduler.metric 'val_score' differs from objective.metric"):
        load_space(write(tmp_path, tree))
    tree["scheduler"] = {"type": "asha"}
    space = load_space(write(tmp_path, tree))
    assert space.scheduler_metric == "best_val_score"
    from crosspt.search.optuna_glue import make_scheduler

    asha = make_scheduler(space, 4)
    assert (asha._metric, asha._mode) == ("best_val_score", "max")


def test_sources_without_a_bank_are_refused_unless_random_is_asked_for(tmp_path, data_dir):
    from crosspt.config.schema import source_bank_problem

    cfg = load_config(None, {"prompt.n_sources": 2})
    assert "prompt.source_bank is not set" in source_bank_problem(cfg)
    assert source_bank_problem(load_config(None, {"prompt.n_sources": 2, "prompt.source_bank": "random"})) is None
    tree = space_tree(**{"prompt.n_sources": {"type": "int", "low": 0, "high": 2}})
    del tree["base"]["prompt"]["source_bank"]
    with pytest.raises(ConfigError, match="prompt.n_sources is [12] but prompt.source_bank is not set"):
        load_space(write(tmp_path, tree))
    out = subprocess.run([sys.executable, "-m", "crosspt.cli", "train", "--backbone", "minilm", "--tasks", "rte",
                          "--data-dir", str(data_dir), "--set", "prompt.n_sources=2", "--no-tracking"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    print("\n$ crosspt train ... --set prompt.n_sources=2 ->", out.returncode, out.stderr.strip())
    assert out.returncode != 0 and "prompt.source_bank is not set" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# ---- Optuna --------------------------------------------------------------------------------------
def test_only_optunas_finished_trial_error_is_swallowed(tmp_path):
    """A result without the objective (a real bug) fails loudly; before, any KeyError made the trial a
    valueless PRUNED one."""
    import optuna

    from crosspt.search.optuna_glue import TUNE_TRIAL_ATTR, make_searcher

    space = SearchSpace.model_validate(space_tree(**{"optim.prompt_lr": {"type": "loguniform", "low": 1e-3,
                                                                         "high": 0.1}}))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(space, url, "sig")
    searcher.set_search_properties(None, None, {})
    searcher.suggest("t1")
    with pytest.raises(KeyError):
        searcher.on_trial_result("t1", {"training_iteration": 1, "val_score": 0.5})
    searcher.on_trial_result("t1", {"training_iteration": 1, "best_val_score": 0.5})
    study = optuna.load_study(study_name="sig", storage=url)
    assert study.trials[0].user_attrs[TUNE_TRIAL_ATTR] == "t1"
    assert study.metric_names == ["best_val_score"]
    # a trial finished in the study already (a restored driver): dropped, not an error
    searcher.on_trial_complete("t1", {"training_iteration": 2, "best_val_score": 0.6, "final_epoch": True})
    searcher._completed_trials.discard("t1")
    searcher.on_trial_result("t1", {"training_iteration": 3, "best_val_score": 0.7})
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE and study.trials[0].value == 0.6


def test_stale_running_trials_are_failed_except_those_tune_continues(tmp_path):
    import optuna

    from crosspt.search.optuna_glue import TUNE_TRIAL_ATTR, fail_stale_trials

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    kept, stale, _orphan = study.ask(), study.ask(), study.ask()
    kept.set_user_attr(TUNE_TRIAL_ATTR, "a")
    stale.set_user_attr(TUNE_TRIAL_ATTR, "b")
    assert fail_stale_trials(url, "s", keep={"a"}) == 2
    states = [t.state for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states == [optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.FAIL]
    assert fail_stale_trials(url, "missing-study") == 0


def test_sampler_per_algorithm():
    import optuna

    from crosspt.search.optuna_glue import make_sampler

    space = SearchSpace.model_validate(space_tree(**{
        "prompt.n_sources": {"type": "int", "low": 0, "high": 2},
        "prompt.top_k": {"type": "int", "low": 1, "high": "prompt.n_sources", "when": {"prompt.n_sources": ">1"}}}))
    assert make_sampler(space)._multivariate is None and not make_sampler(space)._group   # Optuna's default
    space.search.tpe_group = True             # measured worse on conditional spaces: opt-in
    assert make_sampler(space)._multivariate and make_sampler(space)._group
    space.search.algorithm = "qmc"
    assert isinstance(make_sampler(space), optuna.samplers.QMCSampler)
    space.search.algorithm = "random"
    assert isinstance(make_sampler(space), optuna.samplers.RandomSampler)


# ---- the loop: the untrained evaluation, resume of an ended run, repeats per epoch -----------------
def tiny_cfg(tiny_t5_path, data_dir, **over):
    return load_config(None, {"tasks": ["rte"], "backbone.name": str(tiny_t5_path), "backbone.max_length": 32,
                              "data.data_dir": str(data_dir), "data.shots": 4, "data.max_test": 8,
                              "prompt.private_len": 2, "train.batch_size": 4, "train.epochs": 6,
                              "train.patience": 1, "optim.prompt_lr": 1e-6, **over})


def test_the_untrained_evaluation_is_logged_at_step_minus_one(tiny_t5_path, data_dir, tmp_path):
    from crosspt.registry import experiments, store, trial_logger
    from crosspt.run.loop import LocalSession, run_loop

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = trial_logger.TrialLogger(uri, experiments.ensure_experiment(uri, "e"), None, None, None, run_name="r")
    logger.start({}, "x: 1\n")
    result = run_loop(tiny_cfg(tiny_t5_path, data_dir), LocalSession(tmp_path / "out",
                                                                     on_report=lambda m, d: logger.log_epoch(m, d)))
    history = {m.step: m.value for m in store.client(uri).get_metric_history(logger.run_id, "val_score")}
    print("\nval_score by step:", history, "best_val_score:", result["best_val_score"])
    assert history[-1] == result["history"][0]["val_score"]
    assert result["best_val_score"] <= max(history.values())
    assert "initial.val_score" not in store.client(uri).get_run(logger.run_id).data.metrics


def test_resuming_an_ended_run_returns_its_result_without_training(tiny_t5_path, data_dir, tmp_path):
    """A run stopped by patience (lr 1e-6: nothing improves) resumed from its last checkpoint: the same
    result, no epoch trained or reported (before, the loop trained the remaining epochs)."""
    from crosspt.run.loop import LocalSession, run_loop

    cfg = tiny_cfg(tiny_t5_path, data_dir)
    first = LocalSession(tmp_path / "a")
    result = run_loop(cfg, first)
    assert result["epochs_run"] < cfg.train.epochs, "patience should have stopped the run"
    again = LocalSession(tmp_path / "b", resume_from=first.checkpoints[-1])
    resumed = run_loop(cfg, again)
    assert again.reports == [] and resumed["test_score"] == result["test_score"]
    assert resumed["epochs_run"] == result["epochs_run"]


def test_repeats_report_their_mean_every_epoch_so_asha_can_stop_them_early(tiny_t5_path, data_dir, tmp_path):
    """ASHA stops a trial by ending it at a report. Repeats now train side by side and report the mean after
    each epoch: a stop at the first report leaves every repeat at one epoch. (Before, all repeats ran all
    their epochs before the first report: the fault at epoch 1 fired first.)"""
    import os

    from crosspt.run.session import Session
    from crosspt.search.repeats import run_repeats

    class StopAtFirstReport(Session):
        def __init__(self):
            self.reports = []

        def report(self, metrics, checkpoint_dir):
            self.reports.append(metrics)
            raise SystemExit(0)

    space = SearchSpace.model_validate({"name": "rep", "budget": {"repeats": 3}})
    cfg = tiny_cfg(tiny_t5_path, data_dir, **{"train.patience": None})
    stop = StopAtFirstReport()
    os.environ["CROSSPT_FAULT"] = "raise@epoch=1"
    try:
        with pytest.raises(SystemExit):
            run_repeats(cfg, space, stop)
    finally:
        del os.environ["CROSSPT_FAULT"]
    (row,) = stop.reports
    assert row["epoch"] == 0 and not row["final_epoch"]
    assert [row[f"best_val_score_r{i}"] for i in range(3)] and row["best_val_score_std"] >= 0
    assert row["best_val_score"] == pytest.approx(sum(row[f"best_val_score_r{i}"] for i in range(3)) / 3)


def test_repeat_rows_average_scores_and_keep_counters():
    from crosspt.config.schema import RunConfig
    from crosspt.search.repeats import mean_row, repeat_configs

    assert [c.seed for c in repeat_configs(RunConfig(seed=7), 3)] == [7, 1007, 2007]
    rows = [{"epoch": 1, "val_score": 0.7, "best_val_score": 0.7, "trainable_params": 10, "initial.val_score": 0.5},
            {"epoch": 1, "val_score": 0.5, "best_val_score": 0.5, "trainable_params": 10, "initial.val_score": 0.3},
            {"epoch": 0, "val_score": 0.4, "best_val_score": 0.4, "trainable_params": 10, "initial.val_score": 0.4}]
    row = mean_row(rows, 1, True, ("best_val_score",))
    assert row["best_val_score"] == pytest.approx(1.6 / 3) and row["final_epoch"] and row["epoch"] == 1
    assert [row[f"best_val_score_r{i}"] for i in range(3)] == [0.7, 0.5, 0.4] and row["best_val_score_std"] > 0
    assert row["trainable_params"] == 10 and "val_score_r0" not in row
    assert row["initial.val_score"] == pytest.approx(0.4)

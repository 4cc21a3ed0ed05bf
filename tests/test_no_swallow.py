"""Errors are raised or stated, never swallowed: what once fell into an `except Exception` and came out as a
quiet default. Real sqlite MLflow stores and Optuna studies, a real tiny backbone folder."""
from __future__ import annotations

import shutil
import warnings
from types import SimpleNamespace

import pytest

from crosspt.registry import experiments, run_log, store


def test_an_unreadable_search_space_file_is_an_error(tmp_path):
    """A parent run whose search_space.yaml is there but is not YAML: `crosspt report` stops with one line
    naming the file. Before: read as if the file were missing, every factor became a choice over its logged
    strings and a numeric factor fell to "too few" without a word."""
    from crosspt.errors import ArtifactError
    from crosspt.search.report.store import load_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = store.client(uri)
    exp = experiments.ensure_experiment(uri, "space_file")
    parent = c.create_run(exp, tags={experiments.SEARCH_TAG: "s"}).info.run_id
    run_log.log_params(c, parent, {"space.keys": "optim.prompt_lr", "objective.metric": "best_val_score"})
    c.log_text(parent, "space: {optim.prompt_lr: {type: loguniform, low: 0.001\n  high: [", "search_space.yaml")
    with pytest.raises(ArtifactError) as e:
        load_search(uri, parent_run_id=parent)
    assert "search_space.yaml" in str(e.value) and parent in str(e.value) and "\n" not in str(e.value)


def test_a_backbone_family_that_cannot_be_resolved_yet_is_asked_again(tmp_path, tiny_t5_path):
    """The liveness table asks a backbone's family; where it cannot be resolved (a folder not there yet, a
    hub id offline) the answer is unknown for now, not for the life of the process. Before: the None was
    cached (lru_cache) and a backbone prepared later stayed unknown."""
    from crosspt.config.liveness import family_of

    later = tmp_path / "backbone_later"
    cfg = SimpleNamespace(backbone=SimpleNamespace(name=str(later), family="auto"))
    assert family_of(cfg) is None
    shutil.copytree(tiny_t5_path, later)
    assert family_of(cfg) == "seq2seq"


def test_a_normal_trial_reports_each_step_to_optuna_once(tmp_path):
    """A trial that runs to its last epoch: every epoch's result goes through `on_trial_result`, then Tune
    hands the last one to `on_trial_complete` again. The study gets each step once and Optuna warns of
    nothing. Before: the last step was reported twice ("The reported value is ignored because this `step=2`
    is already reported") in every normal search's output."""
    import optuna
    import yaml

    from crosspt.config.space import load_space
    from crosspt.search.optuna_glue import make_searcher, rdb_storage

    tree = {"name": "steps", "base": {"backbone": {"name": "minilm"}, "tasks": ["rte"], "train": {"epochs": 2}},
            "space": {"optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.3}},
            "objective": {"metric": "best_val_score", "mode": "max"}, "budget": {"num_samples": 1, "max_epochs": 2},
            "search": {"algorithm": "optuna", "seed": 0}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tree))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(load_space(tmp_path / "space.yaml"), url, "steps")
    searcher.suggest("t0")
    results = [{"training_iteration": i, "best_val_score": s, "final_epoch": i == 2} for i, s in ((1, 0.5), (2, 0.6))]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for r in results:
            searcher.on_trial_result("t0", r)
        searcher.on_trial_complete("t0", results[-1])
    said = [str(w.message) for w in seen if "already reported" in str(w.message)]
    assert not said, said
    (trial,) = optuna.load_study(study_name="steps", storage=rdb_storage(url)).trials
    assert trial.state.name == "COMPLETE" and trial.intermediate_values == {1: 0.5, 2: 0.6}

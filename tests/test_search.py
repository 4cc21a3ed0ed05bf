"""End-to-end searches against real components the tests start themselves: a Ray head on loopback,
a sqlite MLflow store, a real `mlflow server`, and `ray job submit`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from crosspt.search.driver import run_search
from crosspt.config.space import SearchSpace, load_space
from crosspt.registry import best_run, experiments, store
from ray_cluster import RAY_CLI

REPO = Path(__file__).resolve().parents[1]
FACTORS = ["prompt.n_sources", "prompt.top_k", "prompt.composition", "optim.prompt_lr"]     # tiny_space's


def tiny_space(backbone: Path, name: str, num_samples: int = 3, **extra) -> SearchSpace:
    tree = {
        "name": name,
        "base": {"tasks": ["sst2", "rte"], "seed": 0, "backbone": {"name": str(backbone), "max_length": 48},
                 "data": {"shots": 4, "max_test": 24},
                 "prompt": {"private_len": 4, "source_len": 4, "source_bank": "random"},
                 "train": {"batch_size": 8, "eval_batch_size": 32, "patience": None},
                 "scaling": {"num_workers": 1, "in_process": True}},
        "space": {
            "prompt.n_sources": {"type": "int", "low": 0, "high": 2},
            "prompt.top_k": {"type": "int", "low": 1, "high": "prompt.n_sources", "when": {"prompt.n_sources": ">1"}},
            "prompt.composition": {"type": "choice", "values": ["cat", "wavg"]},
            "optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.3},
        },
        "objective": {"metric": "best_val_score", "mode": "max"},
        "budget": {"num_samples": num_samples, "max_epochs": 2},
        "scheduler": {"type": "fifo"},
        "search": {"algorithm": "optuna", "seed": 0},
    }
    for k, v in extra.items():
        tree[k] = v if not isinstance(v, dict) else {**tree.get(k, {}), **v}
    return SearchSpace.model_validate(tree)


def check_children(uri: str, summary: dict, n: int) -> list:
    c = store.client(uri)
    parent = c.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = experiments.child_runs(uri, summary["experiment_id"], summary["parent_run_id"])
    assert len(children) == n
    for r in children:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status, r.data.tags.get("error"))
        assert sorted(r.data.params) == sorted(FACTORS), r.data.params       # the searched factors, nothing else
        routed = r.data.params["prompt.n_sources"] != "0"
        if not routed:                                     # nothing to route: no fake router values
            assert r.data.params["prompt.composition"] == r.data.params["prompt.top_k"] == "inactive"
        assert r.info.run_name == f"trial{int(r.data.tags['crosspt.trial_number']):03d}"
        assert "val_score" in r.data.metrics and "best_val_score" in r.data.metrics
        # what the trial paid besides training; its k-shot splits came drawn from the driver, no file read
        m = r.data.metrics
        assert m["trial.start_to_first_step_s"] > 0 and m["trial.last_step_to_end_s"] >= 0
        assert 0 < m["trial.eval_s"] < m["trial.wall_s"] and m["trial.data_preparations"] == 0
        arts = {a.path for a in c.list_artifacts(r.info.run_id, "prompts")} | \
               {a.path for a in c.list_artifacts(r.info.run_id, "plots")}
        assert "prompts/prompts.safetensors" in arts and ("plots/router_heatmap.png" in arts) == routed
        # the artifact is a real safetensors prompt file with the run's metadata
        local = c.download_artifacts(r.info.run_id, "prompts/prompts.safetensors")
        from crosspt.run.artifacts import load_prompt_artifact

        tensors, meta = load_prompt_artifact(local)
        assert meta["tasks"] == ["sst2", "rte"] and "router_weights" in tensors
    names = {a.path for a in c.list_artifacts(summary["parent_run_id"])}
    assert {"trials.csv", "search_space.yaml"} <= names
    return children


@pytest.mark.slow
def test_three_trial_search_sqlite(ray_head, tiny_t5_path, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_search(tiny_space(tiny_t5_path, "tiny3"), data_dir=str(data_dir), tracking_uri=uri,
                         storage_path=str(tmp_path / "ray_results"), verbose=0)
    assert summary["num_trials"] == 3 and summary["num_failed"] == 0
    children = check_children(uri, summary, 3)
    # every trial's final Tune result carries the assessment score its child run logged
    from crosspt.search.reconcile import tune_trials

    assessed = {t.last_result["mlflow_run_id"]: t.last_result["assess_score"] for t in tune_trials(summary["storage"])}
    assert assessed == {r.info.run_id: r.data.metrics["assess_score"] for r in children}
    assert summary["best"] is not None and summary["best_run_id"]
    # the summary's best is the one best-run rule's (the report and `promote` read the same)
    best = best_run.best_finished_child(store.client(uri), summary["experiment_id"], "best_val_score", "max",
                                        summary["parent_run_id"])
    assert (summary["best_run_id"], summary["best"]["trial_id"]) == (best.info.run_id,
                                                                     best.data.tags[experiments.TRIAL_TAG])
    # the Optuna study is persistent (sqlite beside the MLflow store) and holds the 3 trials
    import optuna

    study = optuna.load_study(study_name="tiny3", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 3
    # concurrent trials never got identical configurations
    configs = [json.dumps(t["params"], sort_keys=True) for t in summary["trials"]]
    assert len(set(configs)) == 3
    # a second search of the same name refuses to clobber the first one's state
    from crosspt.errors import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        run_search(tiny_space(tiny_t5_path, "tiny3"), data_dir=str(data_dir), tracking_uri=uri,
                   storage_path=str(tmp_path / "ray_results"), verbose=0)
    check_provenance(uri, summary, n_tasks=2)
    # the same space under another experiment is another search: not refused, its own parent and study
    other = run_search(tiny_space(tiny_t5_path, "tiny3", num_samples=1), experiment="mine", data_dir=str(data_dir),
                       tracking_uri=uri, storage_path=str(tmp_path / "ray_results"), verbose=0)
    assert other["experiment"] == "mine" and other["parent_run_id"] != summary["parent_run_id"]
    assert other["num_trials"] == 1 and len(study.trials) == 3
    assert len(optuna.load_study(study_name="tiny3--mine", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 1


def check_assessed(run, tasks: list[str]) -> None:
    """A finished trial's child run scored its selected state on the assessment rows (searches do by default):
    assess_score is the mean over tasks of assess_<task>_<main metric>, and what it cost is a trial.* timing."""
    from crosspt.tasks.metrics import primary_metric
    from crosspt.tasks.specs import get_task

    m = run.data.metrics
    mains = [m[f"assess_{t}_{primary_metric(get_task(t))}"] for t in tasks]
    assert m["assess_score"] == pytest.approx(sum(mains) / len(mains)), m
    assert 0 < m["trial.assess_s"] <= m["trial.eval_s"], m


def check_provenance(uri: str, summary: dict, n_tasks: int) -> None:
    """Experiment kind, parent description, versions/commit/data tags and dataset inputs on every run;
    the best trial is a FINISHED run; the trials table is an MLflow table too."""
    c = store.client(uri)
    exp = c.get_experiment(summary["experiment_id"])
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert exp.tags.get("mlflow.note.content", "").startswith("crosspt search `")
    parent = c.get_run(summary["parent_run_id"])
    note = parent.data.tags["mlflow.note.content"]
    assert "Budget:" in note and "Best trial" in note and summary["best"]["trial"] in note, note
    assert summary["best"]["status"] == "FINISHED"
    assert c.get_run(summary["best_run_id"]).info.status == "FINISHED"
    children = experiments.child_runs(uri, summary["experiment_id"], summary["parent_run_id"])
    digests = set()
    for run in [parent, *children]:
        tags = run.data.tags
        for pkg in ("crosspt", "torch", "transformers", "ray", "mlflow", "optuna"):
            assert tags.get(f"crosspt.version.{pkg}"), (pkg, run.info.run_name)
        assert len(tags.get("mlflow.source.git.commit", "")) == 40 and tags.get("crosspt.data_source")
        inputs = run.inputs.dataset_inputs
        assert len(inputs) == 4 * n_tasks, [d.dataset.name for d in inputs]
        assert {t.value for d in inputs for t in d.tags if t.key == "mlflow.data.context"} == \
            {"train", "val", "test", "assess"}
        digests.add(tuple(sorted((d.dataset.name, d.dataset.digest) for d in inputs)))
        if run.info.status == "FINISHED" and run is not parent:
            check_assessed(run, tags["crosspt.tasks"].split(","))
    assert len(digests) == 1, digests          # same base data config: the same rows everywhere
    assert "trials.json" in {a.path for a in c.list_artifacts(summary["parent_run_id"])}
    print("\nparent description:\n" + note)


@pytest.mark.slow
def test_search_through_mlflow_server(ray_head, mlflow_server, tiny_decoder_path, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = run_search(tiny_space(tiny_decoder_path, "viaserver", num_samples=2), data_dir=str(data_dir),
                         tracking_uri=mlflow_server.url, storage_path=str(tmp_path / "ray_results"), verbose=0)
    assert summary["num_trials"] == 2
    check_children(mlflow_server.url, summary, 2)
    # artifacts went through the server into its artifact destination
    stored = list((Path(mlflow_server.log.name).parent / "server_artifacts").rglob("prompts.safetensors"))
    assert len(stored) >= 2


@pytest.mark.slow
def test_asha_stops_a_weak_trial_early(ray_head, minilm_path, data_dir, tmp_path, monkeypatch):
    """Sequential trials: a trial that cannot learn (index labels at lr 1e-7) scores below the first
    trial (natural label words) at the first rung, and ASHA stops it before max_epochs."""
    monkeypatch.chdir(tmp_path)
    space = SearchSpace.model_validate({
        "name": "asha",
        "base": {"tasks": ["sst2"], "seed": 0, "backbone": {"name": "minilm", "max_length": 48},
                 "data": {"shots": 8, "max_test": 16}, "prompt": {"private_len": 4},
                 "train": {"batch_size": 8, "patience": None}, "scaling": {"num_workers": 1, "in_process": True}},
        "space": {"prompt.label_semantics": {"type": "choice", "values": ["natural", "index"]},
                  "optim.prompt_lr": {"type": "loguniform", "low": 1e-7, "high": 1e-2}},
        "budget": {"num_samples": 2, "max_epochs": 4},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "search": {"algorithm": "random", "seed": 0,
                   "points": [{"prompt.label_semantics": "natural", "optim.prompt_lr": 1e-2},
                              {"prompt.label_semantics": "index", "optim.prompt_lr": 1e-7}]},
        "resources": {"max_concurrent_trials": 1},
    })
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_search(space, data_dir=str(data_dir), tracking_uri=uri,
                         storage_path=str(tmp_path / "ray_results"), verbose=0)
    epochs = sorted(t["epochs"] for t in summary["trials"])
    assert epochs[0] < 4 and epochs[-1] == 4, summary["trials"]
    assert summary["num_stopped"] == 1
    children = experiments.child_runs(uri, summary["experiment_id"], summary["parent_run_id"])
    statuses = sorted((r.info.status, r.data.tags.get("pruned", "")) for r in children)
    # the stopped trial ended as the search meant it to: FINISHED, tagged pruned (KILLED draws a red cross)
    assert statuses == [("FINISHED", ""), ("FINISHED", "true")]
    # each trial's end is in its run, the stopped one's too: its best prompts (the result file only for the
    # trial that finished: the full end runs before the last report; no router here, so no heatmap) and timings
    c = store.client(uri)
    for r in children:
        pruned = r.data.tags.get("pruned") == "true"
        arts = {a.path for a in c.list_artifacts(r.info.run_id, "prompts")} | \
               {a.path for a in c.list_artifacts(r.info.run_id)}
        assert "prompts/prompts.safetensors" in arts, (pruned, arts)
        assert ("result.json" in arts) == (not pruned), (pruned, arts)
        assert "plots" not in arts, arts                   # one candidate prompt: no router, no heatmap
        m = r.data.metrics
        assert m["trial.wall_s"] > 0 and m["trial.start_to_first_step_s"] > 0 and 0 < m["trial.cpu_s"]
    # Optuna (random search goes through it too: the study exists) learns the same: the stopped trial is PRUNED at its last
    # rung, never COMPLETE with a partial value
    import optuna

    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = sorted((t.number, t.state.name, t.value, t.last_step) for t in study.trials)
    print("\noptuna trial states (number, state, value, last step):", states)
    assert sorted(s for _, s, _, _ in states) == ["COMPLETE", "PRUNED"], states
    assert all(last == 4 for _, s, _, last in states if s == "COMPLETE"), states
    pruned = next(t for t in study.trials if t.state.name == "PRUNED")
    assert pruned.last_step is not None and pruned.last_step < 4 and pruned.value is not None, states


@pytest.mark.slow
def test_ray_job_submit_smoke(ray_head, data_dir, tmp_path):
    """`ray job submit --working-dir . -- python jobs/search_glue.py --space search_spaces/smoke.yaml`."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ray_head.dashboard}
    cmd = [RAY_CLI, "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(REPO), "--",
           sys.executable, "jobs/search_glue.py", "--space", "search_spaces/smoke.yaml",
           "--set", "budget.num_samples=2", "--set", "budget.max_epochs=2", "--set", "base.tasks=[sst2]",
           "--set", "search.design=auto", "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray_results"),
           "--data-dir", str(data_dir), "--summary-json", str(tmp_path / "summary.json")]
    for _ in range(12):      # a fresh head's job agent registers a few seconds after the dashboard answers
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(10)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    summary = json.loads((tmp_path / "summary.json").read_text())
    children = experiments.child_runs(uri, summary["experiment_id"], summary["parent_run_id"])
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)


@pytest.mark.slow
def test_the_demo_search_finds_the_real_effect_and_bounds_the_others(data_dir, tmp_path):
    """`make demo` as shipped (search_spaces/smoke.yaml, about a minute on 2 quiet CPUs): its report stands on
    the 12 design trials, all finished, scored on the held-out assessment rows; it finds the one large real
    effect (natural label words beat learned indices on MiniLM, ~12 pts) with an interval that excludes 0, and
    for every factor it does not call an effect it states the difference it could have found."""
    cmd = [sys.executable, "jobs/search_glue.py", "--space", "search_spaces/smoke.yaml", "--tracking-uri",
           f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", str(tmp_path / "ray_results"),
           "--data-dir", str(data_dir)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "RAY_ADDRESS": "local"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rep = json.loads((tmp_path / "ray_results" / "smoke_report" / "report.json").read_text())
    assert rep["family"]["kind"] == "design" and rep["family"]["tested"] == "assess_score"
    assert len(rep["family"]["trials"]) == 12 and rep["counts"]["FINISHED"] == 14
    verdicts = {f["factor"]: f for f in rep["factors"]}
    label = verdicts["prompt.label_semantics"]
    assert (label["verdict"], label["best"], label["n"]) == ("effect", "natural", 12)
    assert label["ci_low"] > 0 and label["estimate"] > 5
    others = [f for k, f in verdicts.items() if k != "prompt.label_semantics"]
    assert others and all(f["verdict"] == "none" and f["mde_80"] is not None for f in others)
    assert "natural beats index by" in out.stdout and "80% power only for" in out.stdout


def test_validating_the_decoder_space_prepares_no_backbone(tmp_path, monkeypatch):
    """Validating a space resolves each factor's liveness, some by the backbone's family. For the built-in
    backbones that family is known by name: validating `decoder_smollm2.yaml` with an empty backbone cache
    leaves it empty (it used to dequantise SmolLM2 into it, minutes on a busy CPU, just to learn 'decoder')."""
    from crosspt.config import liveness

    cache = tmp_path / "cache"
    monkeypatch.setenv("CROSSPT_CACHE_DIR", str(cache))
    liveness._FAMILIES.clear()
    space = load_space(REPO / "search_spaces" / "decoder_smollm2.yaml")
    assert "backbone.template" in space.space
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))


@pytest.mark.slow
def test_shipped_spaces_validate():
    for f in sorted((REPO / "search_spaces").glob("*.yaml")):
        space = load_space(f)
        assert space.space, f


@pytest.mark.slow
def test_impossible_space_rejected_before_any_trial(tmp_path):
    from crosspt.errors import ConfigError

    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"name": "bad", "base": {"prompt": {"n_sources": 1, "private_len": 0,
                                                                    "source_bank": "random"}},
                                 "space": {"prompt.top_k": {"type": "int", "low": 1, "high": 3}}}))
    with pytest.raises(ConfigError, match="top_k"):
        load_space(f)
    f.write_text(yaml.safe_dump({"name": "bad", "space": {"prompt.bogus": {"type": "int", "low": 1, "high": 3}}}))
    with pytest.raises(ConfigError, match="prompt.bogus"):
        load_space(f)
    f.write_text("name: bad\nspace:\n  prompt.private_len: {type: int, low: 8, high: 2}\n")
    with pytest.raises(ConfigError, match="low"):
        load_space(f)


def test_inactive_factors_are_logged_as_inactive():
    """A trial without sources logs source/routing keys as `inactive`, not their base values; what the
    searcher sampled stays as sampled, and a factor whose `when:` failed is inactive too."""
    from crosspt.search.params import trial_params

    space = tiny_space(Path("minilm"), "params")
    sampled = {"prompt.n_sources": 0, "prompt.composition": "wavg", "optim.prompt_lr": 0.01}
    params = trial_params(space.config_for(sampled), space, sampled)
    inactive = sorted(k for k, v in params.items() if v == "inactive")
    print("\ninactive with n_sources=0:", inactive)
    for key in ("prompt.source_len", "optim.router_lr", "prompt.temperature.start", "prompt.temperature.rate",
                "prompt.top_k", "prompt.learn_sources"):
        assert params[key] == "inactive", key
    assert params["prompt.composition"] == "wavg" and params["optim.prompt_lr"] == 0.01
    assert params["prompt.n_sources"] == 0 and params["prompt.private_len"] == 4
    sampled = {"prompt.n_sources": 2, "prompt.top_k": 1, "prompt.composition": "cat", "optim.prompt_lr": 0.01}
    params = trial_params(space.config_for(sampled), space, sampled)
    assert params["optim.router_lr"] == 0.01 and params["prompt.source_len"] == 4 and params["prompt.top_k"] == 1


def test_search_identity_is_experiment_and_space_name(tmp_path):
    """The same space under another experiment is another search (own folder and study); URIs stay URIs."""
    from crosspt.search.state import search_paths

    space = tiny_space(Path("minilm"), "smoke")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    own, mine = search_paths(space, str(tmp_path), db, "smoke"), search_paths(space, str(tmp_path), db, "mine")
    print("\nsearch folders:", own.root, mine.root, "studies:", own.study_name, mine.study_name)
    assert own.root == f"{tmp_path}/smoke" and own.study_name == "smoke"
    assert mine.root != own.root and mine.study_name != own.study_name
    assert own.optuna_url == mine.optuna_url == f"sqlite:///{tmp_path / 'optuna.db'}"
    own.write_state({"parent_run_id": "p"})
    assert own.exists() and own.read_state() == {"parent_run_id": "p"} and not mine.exists()
    s3 = search_paths(space, "s3://bucket/searches/", db, "smoke")
    assert s3.root == "s3://bucket/searches/smoke" and s3.storage == "s3://bucket/searches"
    local = search_paths(space, f"file://{tmp_path}/uri", db, "mine")
    assert local.root == f"file://{tmp_path}/uri/smoke--mine"
    local.write_state({"parent_run_id": "q"})
    assert (tmp_path / "uri" / "smoke--mine" / "crosspt_search.json").is_file() and local.read_state()["parent_run_id"] == "q"
    assert not local.has_tune_state()


def test_runs_page_link_opens_the_runs_table_not_the_genai_overview():
    """MLflow 3.17's UI defaults to its GenAI workflow, which wins over the experimentKind tag: the link the
    search prints names the model-training workflow and the runs tab."""
    from crosspt.search.summary import runs_page

    assert runs_page({"tracking_uri": "http://127.0.0.1:5055/", "experiment_id": "7"}) == \
        "http://127.0.0.1:5055/#/experiments/7/runs?workflowType=machine_learning"
    assert runs_page({"tracking_uri": "sqlite:////x/mlflow.db", "experiment_id": "1"}).startswith(
        "http://127.0.0.1:5000/#/experiments/1/runs?")

"""Trust at the edges (issue 23): searches started at once on a new store, what the registry promises
(the search a promotion compares, what a version holds, an environment pip can build, the backbone's
revision, a store every node reaches, validation rows no source prompt saw), and MLflow runs that read as
a search. Real components throughout: sqlite stores, `crosspt` CLI processes, local Ray, real GLUE rows.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from crosspt.config.schema import build_config, config_hash, config_to_yaml, load_config, upgrade_stored_tree
from crosspt.registry import best_run, experiments, provenance, run_log, store, ui_view

HERE = Path(__file__).resolve().parent


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from crosspt.cli.main import main

    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- 1. a new store opened by several processes at once ---------------------------------------------------
RACE = """
import sys
from crosspt.registry import experiments
from crosspt.search.optuna_glue import fail_stale_trials
uri, optuna_url, name = sys.argv[1:4]
experiments.ensure_experiment(uri, name)                   # creates/migrates the MLflow store on first use
fail_stale_trials(optuna_url, name)              # opens (creates) the Optuna store
print("ok")
"""


@pytest.mark.slow
def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """Four processes open the same NEW sqlite MLflow store and Optuna store at once, twice over. Before the
    lock, MLflow's migrations raced (`CommandError: Online migration expected to match one row ...`,
    `duplicate column name`) and so did Optuna's table creation (`UNIQUE constraint failed:
    alembic_version.version_num`): most processes died."""
    for round_ in range(2):
        d = tmp_path / f"round{round_}"
        d.mkdir()
        uri, optuna_url = f"sqlite:///{d / 'mlflow.db'}", f"sqlite:///{d / 'optuna.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", RACE, uri, optuna_url, f"exp{i}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(4)]
        results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
        failed = [err.strip().splitlines()[-1] for rc, _, err in results if rc != 0]
        assert not failed, f"round {round_}: {len(failed)} of 4 died: {failed}"
        assert sorted(e.name for e in store.client(uri).search_experiments()) == ["Default", "exp0", "exp1", "exp2", "exp3"]


@pytest.mark.slow
def test_two_searches_started_at_once_on_a_new_store(ray_head, tmp_path):
    """The drill (tests/concurrent_drill.py) at N=2 on a new sqlite store: both `crosspt search` processes
    exit 0, each with its finished search."""
    from concurrent_drill import run

    codes = run(2, "sqlite", tmp_path, timeout=600)
    assert codes == [0, 0], [(tmp_path / f"drill{i}.log").read_text()[-3000:] for i in range(2)]
    c = store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for i in range(2):
        exp = c.get_experiment_by_name(f"drill-{i}")
        parents = c.search_runs([exp.experiment_id], filter_string=f"tags.`{experiments.SEARCH_TAG}` = 'drill{i}'")
        assert [p.info.status for p in parents] == ["FINISHED"]


# ---- 2. the registry's promises ------------------------------------------------------------------------------
def _search(uri: str, exp_id: str, name: str, scores: list[float], pruned: tuple[int, ...] = ()) -> tuple[str, list[str]]:
    """A search as MLflow holds it once it has ended: a parent run and child runs with these best_val_scores,
    closed as the search closes them (`reconcile_child_runs`, from Tune's record: the trials in `pruned`
    stopped early by the scheduler, the others ran their last epoch)."""
    from types import SimpleNamespace

    from crosspt.search.reconcile import reconcile_child_runs

    c = store.client(uri)
    parent = c.create_run(exp_id, run_name=f"search-{name}", tags={experiments.SEARCH_TAG: name}).info.run_id
    kids, trials = [], []
    for i, s in enumerate(scores):
        rid = c.create_run(exp_id, run_name=f"trial{i:03d}", tags={"mlflow.parentRunId": parent,
                                                                   experiments.TRIAL_TAG: f"{name}{i}"}).info.run_id
        run_log.log_metrics(c, rid, {"best_val_score": s})
        if i in pruned:      # as ASHA's stop decision tags it (`optuna_glue.DesignASHA`)
            c.set_tag(rid, best_run.STOPPED_BY_TAG, best_run.STOPPED_BY_SCHEDULER)
        trials.append(SimpleNamespace(trial_id=f"{name}{i}", status="TERMINATED",
                                      last_result={"final_epoch": i not in pruned, "epoch": 0}))
        kids.append(rid)
    reconcile_child_runs(uri, exp_id, parent, trials, search_ended=True)
    c.set_terminated(parent, "FINISHED")
    return parent, kids


def test_promotion_compares_the_latest_search_only(tmp_path):
    """`crosspt promote --experiment E` picks among the runs of E's latest search, as `crosspt report` reads
    it; an older search's better run (other tasks, shots, split) does not compete unless asked for. Before:
    the best run of every search ever made in E."""
    import time

    from crosspt.registry.models import _pick_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = store.client(uri)
    exp = experiments.ensure_experiment(uri, "E")
    _, old_kids = _search(uri, exp, "old", [0.9])
    time.sleep(0.01)
    latest, new_kids = _search(uri, exp, "new", [0.6, 0.7])
    pick = dict(experiment="E", metric="best_val_score", mode="max", run_id=None, parent_run_id=None)
    assert _pick_run(c, uri, **pick).info.run_id == new_kids[1]
    assert _pick_run(c, uri, **pick, all_searches=True).info.run_id == old_kids[0]


def test_a_pruned_trial_is_finished_but_never_the_best(tmp_path):
    """A trial ASHA stopped ends FINISHED (the UI draws KILLED like FAILED) with the `pruned` tag, and its
    score, from fewer epochs, never makes it the best trial. Before: pruned runs were KILLED, and a FINISHED
    run was always a candidate."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = store.client(uri)
    exp = experiments.ensure_experiment(uri, "E")
    parent, kids = _search(uri, exp, "s", [0.5, 0.95, 0.7], pruned=(1,))
    pruned = c.get_run(kids[1])
    assert pruned.info.status == "FINISHED" and pruned.data.tags["pruned"] == "true"
    assert "stopped this trial after epoch 0" in pruned.data.tags["mlflow.note.content"]
    assert best_run.best_finished_child(c, exp, "best_val_score", "max", parent).info.run_id == kids[2]


def test_sqlite_store_refused_on_a_multi_node_cluster_unless_shared():
    store.check_store_reaches_nodes("sqlite:////x/mlflow.db", 1)
    store.check_store_reaches_nodes("http://127.0.0.1:5000", 3)
    store.check_store_reaches_nodes("sqlite:////shared/mlflow.db", 3, shared=True)
    from crosspt.errors import ConfigError

    with pytest.raises(ConfigError, match="has 3 nodes: trials on the others would log to their own local file"):
        store.check_store_reaches_nodes("sqlite:////x/mlflow.db", 3)


@pytest.mark.slow
def test_search_with_a_sqlite_store_on_two_nodes_is_refused_before_anything_is_written(tiny_t5_path, data_dir,
                                                                                       tmp_path):
    """A two-node cluster (head on 127.0.0.2, worker on 127.0.0.3) and a sqlite tracking URI: `crosspt search`
    exits 2 with one error line, and neither a run, nor an experiment, nor the search's state was written."""
    from concurrent_drill import space_file
    from ray_cluster import RayHead, RayNode
    from test_reliability import cli_env, run

    head = RayHead(tmp_path, num_cpus=1, node_ip="127.0.0.2")
    node = RayNode(head, tmp_path, node_ip="127.0.0.3", num_cpus=1)
    try:
        import ray

        from crosspt.run.trainer import init_ray
        from ray_cluster import wait_for_nodes

        os.environ["RAY_ADDRESS"] = head.address
        if ray.is_initialized():        # an earlier test's connection (to the session's head): init_ray keeps it
            ray.shutdown()
        try:
            init_ray()
            wait_for_nodes(2)
        finally:
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS")
        space = space_file(tmp_path, "twonodes", tiny_t5_path)
        db = tmp_path / "mlflow.db"
        cmd = [sys.executable, "-m", "crosspt.cli", "search", "--space", str(space), "--tracking-uri", f"sqlite:///{db}",
               "--storage-path", str(tmp_path / "ray_results")]
        out = run(cmd, cli_env(RAY_ADDRESS=head.address, CROSSPT_DATA_DIR=str(data_dir)), tmp_path, 300)
        err = out.stderr.strip().splitlines()
        assert out.returncode == 2 and err[-1].startswith("error: tracking store sqlite:") and \
            "the Ray cluster has 2 nodes" in err[-1], out.stderr[-3000:]
        assert not db.exists() and not (tmp_path / "ray_results").exists()
    finally:
        node.stop()
        head.stop()


def _model_run(c, exp_id: str, backbone: Path, tmp: Path, metrics: dict) -> str:
    """A trial's child run as promotion reads it (config.yaml, prompts artifact, metrics, the backbone
    revision tag), made from a freshly built model instead of a training."""
    from crosspt.run.artifacts import save_prompt_artifact
    from crosspt.run.model import build_model
    from crosspt.tasks.specs import resolve_tasks

    cfg = load_config(None, {"tasks": ["sst2", "rte"], "backbone.name": str(backbone), "backbone.max_length": 32,
                             "prompt.private_len": 4, "name": "trial000"})
    model = build_model(cfg, resolve_tasks(cfg.tasks))
    (tmp / "prompts").mkdir(parents=True)
    save_prompt_artifact(tmp / "prompts" / "prompts.safetensors", model, config_hash=config_hash(cfg),
                         backbone=cfg.backbone.name)
    parent = c.create_run(exp_id, run_name="search-r", tags={experiments.SEARCH_TAG: "r"}).info.run_id
    rid = c.create_run(exp_id, run_name="trial000", tags={"mlflow.parentRunId": parent}).info.run_id
    try:                                   # what a trial records when it starts (not before issue 23)
        from crosspt.registry.revision import backbone_revision

        c.set_tag(rid, provenance.BACKBONE_REVISION_TAG, backbone_revision(str(backbone)))
    except ImportError:
        pass
    c.log_artifact(rid, str(tmp / "prompts" / "prompts.safetensors"), "prompts")
    c.log_text(rid, config_to_yaml(cfg), "config.yaml")
    run_log.log_metrics(c, rid, metrics)
    c.set_terminated(rid, "FINISHED")
    c.set_terminated(parent, "FINISHED")
    return rid


def test_promoted_version_holds_what_it_is_tagged_with_and_its_backbone_revision(tiny_t5_path, tmp_path, capsys,
                                                                                 monkeypatch):
    """A trial with `budget.repeats` 3 reports the mean over its repeats; its prompts are repeat 0's. The
    version is tagged with repeat 0's value (the prompts it holds), the mean beside it. The model's
    environment names no `crosspt==...` (no index has it): crosspt travels as the model's code. The
    backbone's revision (a local folder: its content hash) is recorded, and loading refuses a folder whose
    files changed. Before: tagged with the mean, `crosspt==0.1.0` required, no revision."""
    import mlflow

    from crosspt.errors import ArtifactError
    from crosspt.registry.models import _client, load_predictor

    monkeypatch.setenv("CROSSPT_CACHE_DIR", str(tmp_path / "cache"))
    backbone = tmp_path / "tiny_t5"
    shutil.copytree(tiny_t5_path, backbone)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = store.client(uri)
    exp = experiments.ensure_experiment(uri, "R")
    rid = _model_run(c, exp, backbone, tmp_path / "run", {"best_val_score": 0.6, "best_val_score_r0": 0.5,
                                                          "best_val_score_r1": 0.7, "best_val_score_r2": 0.6})
    code, out, err = run_cli(["promote", "--experiment", "R", "--model-name", "rep", "--tracking-uri", uri,
                              "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    mv = _client(uri).get_model_version("rep", result["version"])
    assert result["run_id"] == rid and result["value"] == 0.5 and result["selected_by_mean"] == 0.6
    assert mv.tags["metric.best_val_score"] == "0.5" and mv.tags["holds_repeat"] == "0"
    assert mv.tags["metric.best_val_score.mean_over_repeats"] == "0.6" and mv.tags["repeats"] == "3"

    mlflow.set_tracking_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts("models:/rep@champion", dst_path=str(tmp_path / "dl")))
    finally:
        mlflow.set_tracking_uri(None)
    reqs = (local / "requirements.txt").read_text().split()
    assert not [r for r in reqs if r.startswith("crosspt")] and any(r.startswith("torch==") for r in reqs), reqs
    assert (local / "code" / "crosspt" / "registry" / "pyfunc.py").is_file()
    manifest = json.loads((local / "artifacts" / "bundle" / "manifest.json").read_text())
    assert manifest["backbone"]["revision"].startswith("sha256:") and mv.tags["backbone_revision"] == \
        manifest["backbone"]["revision"] and manifest["backbone"]["revision_recorded"] == "at training"

    assert load_predictor("models:/rep@champion", uri, device="cpu").task_names == ["sst2", "rte"]
    config = backbone / "config.json"
    config.write_text(config.read_text() + "\n")               # the same model name, other files
    with pytest.raises(ArtifactError, match="is not the one this model was trained with"):
        load_predictor("models:/rep@champion", uri, device="cpu")


def test_a_metric_logged_only_as_a_mean_is_not_said_of_repeat_0(tiny_t5_path, tmp_path):
    from crosspt.registry.models import RegistryError, promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = store.client(uri)
    exp = experiments.ensure_experiment(uri, "R")
    _model_run(c, exp, tiny_t5_path, tmp_path / "run", {"best_val_score": 0.6, "best_val_score_r0": 0.5,
                                                        "best_val_score_r1": 0.7, "val_rte_accuracy": 0.6})
    with pytest.raises(RegistryError, match="trained 2 repeats and logs 'val_rte_accuracy' only as their mean"):
        promote(model_name="rep", experiment="R", metric="val_rte_accuracy", tracking_uri=uri)
    assert not c.search_registered_models()


# ---- 3. validation rows no source prompt has seen ------------------------------------------------------------
@pytest.mark.parametrize("task,shots", [("rte", 4), ("rte", 16), ("cb", 2), ("mrpc", 8)])
def test_source_pretraining_never_sees_a_target_validation_row(task, shots, data_dir):
    """Source pre-training (`source_config`) and a target run with the same seed and shots: the rows the
    source prompt trained on and was selected on (its train and val) and the target's validation rows are
    disjoint, for every seed. Before: the same seed drew the same rows, so an own-source init had been
    trained (and early-stopped) on the target's very validation rows."""
    from crosspt.registry.sources import source_config
    from crosspt.run.inputs import prepare_data

    for seed in range(4):
        target = load_config(None, {"tasks": [task], "data.shots": shots, "seed": seed,
                                    "data.data_dir": str(data_dir)})
        src = prepare_data(source_config(target, task))[1][task]
        tgt = prepare_data(target)[1][task]
        seen = {e.uid for e in src["train"] + src["val"]}
        shared = seen & {e.uid for e in tgt["val"]}
        assert not shared, f"{task} seed {seed}: {len(shared)} of {len(tgt['val'])} target validation rows " \
                           f"were source pre-training rows"
        from crosspt.tasks.data import TrainPool, pool_half

        assert {pool_half(u) for u in seen} == {TrainPool.SOURCE}
        assert {pool_half(e.uid) for e in tgt["val"]} == {TrainPool.TARGET}
        # the target's train rows are those it drew before the cut: only its validation sample moved
        before = prepare_data(target.model_copy(update={"data": target.data.model_copy(update={"train_pool": "all"})}))
        assert [e.uid for e in tgt["train"]] == [e.uid for e in before[1][task]["train"]]


def test_config_before_train_pool_keeps_its_rows_and_hash(data_dir):
    """A config.yaml written before `data.train_pool` (a run's, a bundle's) reads as `all`: the hash it had,
    the validation rows it drew. Read as a new config, the same file draws its validation rows from the
    target half: another configuration, another hash."""
    from crosspt.run.inputs import prepare_data
    from crosspt.tasks.data import make_splits

    text = (HERE / "stored_configs" / "before_train_pool.yaml").read_text()
    old_hash = text.splitlines()[0].split()[-1]
    stored = yaml.safe_load(text)
    tree = {**stored, "tasks": ["rte"], "data": {**stored["data"], "shots": 4, "data_dir": str(data_dir)}}
    cfg = build_config(upgrade_stored_tree(stored), "stored")
    assert cfg.data.train_pool == "all" and config_hash(cfg) == old_hash == "9b2af8f045a47fde"
    assert config_hash(build_config(yaml.safe_load(text), "new")) != old_hash
    old_val = make_splits("rte", str(data_dir), shots=4, seed=0)["val"]
    assert [e.uid for e in prepare_data(build_config(upgrade_stored_tree(tree), "stored"))[1]["rte"]["val"]] == \
        [e.uid for e in old_val]
    assert [e.uid for e in prepare_data(build_config(tree, "new"))[1]["rte"]["val"]] != [e.uid for e in old_val]


# ---- 4. MLflow that reads like a search ----------------------------------------------------------------------
@pytest.mark.slow
def test_a_search_reads_as_a_search_in_mlflow_and_optuna(ray_head, tiny_t5_path, data_dir, tmp_path, monkeypatch):
    """Two trials, one with a router (a source + the private prompt) and one without. Each child run: named
    `trialNNN` as Tune names the trial and as Optuna numbers it (whose user attributes give the name and the
    MLflow run id); params = the searched factors only; trainable_params logged once, not per epoch; the
    temperature and the router heatmap only where there is a router. The parent's objective is named
    `best_val_score`, and the experiment holds a saved runs-table view with the factors and scores that the
    summary's link opens."""
    import optuna

    from crosspt.config.space import SearchSpace
    from crosspt.search.driver import run_search
    from crosspt.search.summary import runs_page

    monkeypatch.chdir(tmp_path)
    space = SearchSpace.model_validate({
        "name": "reads",
        "base": {"tasks": ["sst2", "rte"], "seed": 0, "backbone": {"name": str(tiny_t5_path), "max_length": 32},
                 "data": {"shots": 2, "max_test": 8},
                 "prompt": {"private_len": 2, "source_len": 2, "source_bank": "random"},
                 "train": {"batch_size": 8, "eval_batch_size": 32, "patience": None},
                 "scaling": {"num_workers": 1, "in_process": True}},
        "space": {"prompt.n_sources": {"type": "int", "low": 0, "high": 1},
                  "optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.1}},
        "objective": {"metric": "best_val_score", "mode": "max"},
        "budget": {"num_samples": 2, "max_epochs": 2}, "scheduler": {"type": "fifo"},
        "search": {"algorithm": "random", "seed": 0,
                   "points": [{"prompt.n_sources": 0, "optim.prompt_lr": 0.03},
                              {"prompt.n_sources": 1, "optim.prompt_lr": 0.03}]}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = run_search(space, data_dir=str(data_dir), tracking_uri=uri, storage_path=str(tmp_path / "rr"), verbose=0)
    c = store.client(uri)
    kids = {r.info.run_name: r for r in experiments.child_runs(uri, s["experiment_id"], s["parent_run_id"])}
    assert sorted(kids) == ["trial000", "trial001"] == sorted(t["trial"] for t in s["trials"])
    study = optuna.load_study(study_name="reads", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.metric_names == ["best_val_score"]
    for t in study.trials:
        run = kids[f"trial{t.number:03d}"]
        assert t.user_attrs["trial_name"] == run.info.run_name and t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert t.user_attrs["tune_trial_id"] == run.data.tags[experiments.TRIAL_TAG]
    for name, routed in (("trial000", False), ("trial001", True)):
        run = kids[name]
        assert set(run.data.params) == {"prompt.n_sources", "optim.prompt_lr"}, run.data.params
        assert run.data.tags[provenance.CONFIG_HASH_TAG] and run.data.tags[provenance.BACKBONE_REVISION_TAG].startswith("sha256:")
        local = c.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
        assert yaml.safe_load(Path(local).read_text())["name"] == name
        assert [m.step for m in c.get_metric_history(run.info.run_id, "trainable_params")] == [0]
        assert len(c.get_metric_history(run.info.run_id, "val_score")) == 3          # step -1 (untrained), 0, 1
        assert ("temperature" in run.data.metrics) == routed
        plots = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
        assert (plots == {"plots/router_heatmap.png"}) == routed, plots
    parent = c.get_run(s["parent_run_id"])
    assert "best_val_score" in parent.data.metrics and "best_best_val_score" not in parent.data.metrics
    assert parent.data.params["best.trial"] in kids
    view = json.loads(c.get_experiment(s["experiment_id"]).tags[ui_view.VIEW_TAG_PREFIX + "crosspt-reads"])
    columns = json.loads(view["state"])["selectedColumns"]
    assert {"metrics.`best_val_score`", "params.`prompt.n_sources`", "params.`optim.prompt_lr`",
            "tags.`pruned`"} <= set(columns)
    assert runs_page(s).endswith("&viewStateShareKey=crosspt-reads")


HUB_CHECK = """
import sys
from crosspt.backbones.loader import load_backbone
from crosspt.errors import ArtifactError
from crosspt.registry.revision import backbone_revision, pinned_source
from crosspt.tasks.specs import resolve_tasks

name, sha = sys.argv[1:3]
assert backbone_revision(name) == sha, backbone_revision(name)
folder = pinned_source(name, sha)
assert folder.endswith("/snapshots/" + sha), folder
assert load_backbone(folder, resolve_tasks(["sst2"])).embed_dim == 64
try:
    pinned_source(name, "f" * 40)
except ArtifactError as e:
    print("refused:", e)
"""


def test_a_hub_backbone_is_pinned_to_the_commit_it_was_trained_at(tiny_t5_path, tmp_path):
    """A hub id resolves to the commit of the snapshot it loads (here from a local HF cache, offline);
    loading a model pins that commit's snapshot, and a commit the cache does not hold is refused in one line
    (online it would be downloaded)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--crosspt-test--tiny-t5"
    shutil.copytree(tiny_t5_path, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", HUB_CHECK, "crosspt-test/tiny-t5", sha], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    refused = [line for line in out.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 1 and "at commit ffffffff" in refused[0] and "not available offline" in refused[0], out.stdout

"""Past one machine: fractional GPUs per trial, what a cluster can place at once, and a search over a
head and a worker node with no shared disk (S3 storage through moto, MLflow through its server).

Fast: the `scaling.gpus_per_worker` rules and the concurrency arithmetic over given nodes. Slow: real Ray
heads started here (fake GPUs: Ray schedules `--num-gpus` without CUDA behind them)."""
from __future__ import annotations

import contextlib
import json
import shutil
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from crosspt.config.schema import ScalingConfig, config_hash, load_config
from crosspt.config.space import SearchSpace
from crosspt.errors import ConfigError
from crosspt.registry import experiments, store
from crosspt.search.driver import run_search
from crosspt.search.resources import derive_concurrency, trial_resources, trials_that_fit


# ---- fast: the config rules ----------------------------------------------------------------------------
def test_gpus_per_worker_defaults_to_one_gpu_with_use_gpu():
    assert ScalingConfig(use_gpu=True).gpus == 1.0
    assert ScalingConfig().gpus == 0.0
    assert ScalingConfig(use_gpu=True, gpus_per_worker=0.25).worker_resources() == {"CPU": 1.0, "GPU": 0.25}
    assert ScalingConfig(cpus_per_worker=2).worker_resources() == {"CPU": 2.0}      # no GPU key without use_gpu
    assert ScalingConfig(use_gpu=True, gpus_per_worker=2).gpus == 2.0


@pytest.mark.parametrize("overrides,message", [
    ({"scaling.gpus_per_worker": 0.25}, "use_gpu is false"),
    ({"scaling.use_gpu": True, "scaling.gpus_per_worker": 1.5}, "must be a whole number"),
    ({"scaling.use_gpu": True, "scaling.gpus_per_worker": 0}, "greater than 0"),
    ({"scaling.use_gpu": True, "scaling.gpus_per_worker": -0.5}, "greater than 0"),
])
def test_gpus_per_worker_rejected_where_meaningless(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, overrides)
    assert "scaling" in str(e.value)


def test_gpu_share_does_not_change_the_config_hash():
    """Placement is not part of what is learned (and hashes computed before the key existed stay)."""
    a = load_config(None, {"scaling.use_gpu": True})
    b = load_config(None, {"scaling.use_gpu": True, "scaling.gpus_per_worker": 0.25})
    assert config_hash(a) == config_hash(b)


def test_trial_resources_ask_the_gpu_share():
    cfg = load_config(None, {"scaling.use_gpu": True, "scaling.gpus_per_worker": 0.25, "scaling.cpus_per_worker": 2})
    assert trial_resources(cfg) == {"cpu": 2, "gpu": 0.25}
    assert trial_resources(load_config(None, {}))["gpu"] == 0
    group = load_config(None, {"scaling.num_workers": 2, "scaling.use_gpu": True, "scaling.gpus_per_worker": 0.5})
    assert trial_resources(group) == {"cpu": 0, "memory": 1}      # the worker group asks for its own


def test_train_worker_group_asks_the_gpu_share():
    from crosspt.run.trainer import train_scaling

    sc = train_scaling(ScalingConfig(num_workers=2, use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=3))
    assert sc.num_workers == 2 and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 3.0, "GPU": 0.5}


def test_driver_credentials_reach_workers_unless_the_job_sets_them(monkeypatch):
    """init_ray's runtime_env: the driver's MLFLOW_TRACKING_* and AWS_* join the env vars every worker of
    the job gets (explicit ones win); under `ray job submit` a variable the job already sets is left out
    (Ray refuses the same key from job and driver)."""
    from crosspt.run.trainer import _not_in_job_env, with_forwarded_env

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("UNRELATED_SECRET", "no")
    env = with_forwarded_env({"env_vars": {"MLFLOW_TRACKING_URI": "http://m:5000", "AWS_ENDPOINT_URL": "http://s3"}})
    assert env["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == "pw" and "UNRELATED_SECRET" not in env["env_vars"]
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://s3" and env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://m:5000"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"MLFLOW_TRACKING_URI": "x"}}}))
    assert "MLFLOW_TRACKING_URI" not in _not_in_job_env(env)["env_vars"]
    assert _not_in_job_env(env)["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == "pw"


# ---- fast: how many trials the cluster can place -------------------------------------------------------
def _node(alive: bool = True, **resources) -> dict:
    return {"Alive": alive, "Resources": {k: float(v) for k, v in resources.items()}}


def _space(max_concurrent="auto", **scaling) -> SearchSpace:
    return SearchSpace.model_validate({
        "name": "fit", "base": {"scaling": scaling}, "space": {"optim.prompt_lr": {"type": "loguniform",
                                                                                   "low": 1e-3, "high": 0.3}},
        "objective": {"metric": "best_val_score", "mode": "max"}, "resources": {"max_concurrent_trials": max_concurrent}})


@pytest.mark.parametrize("nodes,scaling,expected", [
    ([_node(CPU=4, GPU=1)], {"use_gpu": True, "gpus_per_worker": 0.25}, 4),        # four trials share GPU 0
    ([_node(CPU=16, GPU=1)], {"use_gpu": True, "gpus_per_worker": 0.25}, 4),       # GPU-bound
    ([_node(CPU=2, GPU=1)], {"use_gpu": True, "gpus_per_worker": 0.25}, 2),        # CPU-bound
    ([_node(CPU=16, GPU=1)], {"use_gpu": True}, 1),                                # the old default: 1 GPU
    ([_node(CPU=16, GPU=1)], {"use_gpu": True, "gpus_per_worker": 0.3}, 3),        # floor(1 / 0.3)
    ([_node(CPU=64, GPU=8)], {"use_gpu": True, "gpus_per_worker": 0.125}, 64),     # 8 per GPU, 8 GPUs
    ([_node(CPU=3), _node(CPU=3)], {"cpus_per_worker": 2}, 2),                     # per node, not 6 // 2
    ([_node(CPU=0, head=1), _node(CPU=4)], {}, 4),                                 # a head without CPUs
    ([_node(CPU=8), _node(alive=False, CPU=8)], {}, 8),                            # dead nodes do not count
    ([_node(CPU=8, GPU=2)], {"num_workers": 2, "in_process": False, "use_gpu": True, "gpus_per_worker": 0.5}, 2),
    ([_node(CPU=8)], {"use_gpu": True}, 1),                       # nothing fits: one (Tune waits, autoscaler adds)
])
def test_derive_concurrency_from_what_the_nodes_can_place(nodes, scaling, expected):
    space = _space(**scaling)
    assert derive_concurrency(space, space.base_config(), nodes) == expected


def test_explicit_concurrency_is_capped_by_what_fits():
    nodes = [_node(CPU=8, GPU=1)]
    space = _space(max_concurrent=6, use_gpu=True, gpus_per_worker=0.25)
    assert derive_concurrency(space, space.base_config(), nodes) == 4
    space = _space(max_concurrent=2, use_gpu=True, gpus_per_worker=0.25)
    assert derive_concurrency(space, space.base_config(), nodes) == 2


def test_trials_that_fit_counts_whole_trials_of_workers():
    assert trials_that_fit([_node(CPU=5)], {"CPU": 1.0}, num_workers=2) == 2
    assert trials_that_fit([_node(CPU=1, GPU=1)] * 3, {"CPU": 1.0, "GPU": 1.0}, num_workers=2) == 1


# ---- slow: four trials on one (fake) GPU ---------------------------------------------------------------
@contextlib.contextmanager
def joined(address: str):
    """This process as a driver of the cluster at `address` (and out of it afterwards)."""
    import ray

    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.environ.pop("RAY_ADDRESS") if old is None else os.environ.__setitem__("RAY_ADDRESS", old)


def _placement_probe():
    """The probe trainable, built here so Ray pickles it by value (workers cannot import this test
    module)."""
    def probe(config: dict) -> None:
        """A Tune trial that records where Ray placed it: its GPU ids, its time window, and the device the
        crosspt trial session picks (CPU: no CUDA behind the fake GPU). It waits (bounded) until all
        `config["n"]` probes have started, so the window check cannot pass by luck of timing."""
        import ray
        import torch
        from ray import tune

        from crosspt.search.trainable import TuneSession

        start = time.time()
        device = TuneSession(None, use_gpu=True).device()
        x = torch.ones(4, device=device) * 2                   # the loop's tensors live on that device
        barrier = Path(config["dir"])
        (barrier / f"{tune.get_context().get_trial_id()}.started").touch()
        while len(list(barrier.glob("*.started"))) < config["n"] and time.time() - start < 60:
            time.sleep(0.2)
        tune.report({"start": start, "end": time.time(), "device": str(device), "sum": float(x.sum()),
                     "gpu_ids": json.dumps([str(g) for g in ray.get_gpu_ids()]),
                     "accelerator_ids": json.dumps(ray.get_runtime_context().get_accelerator_ids().get("GPU", [])),
                     "cuda_available": torch.cuda.is_available()})

    return probe


@pytest.mark.slow
def test_four_trials_share_one_fake_gpu(tiny_t5_path, data_dir, tmp_path, monkeypatch):
    """A head with 1 (fake) GPU and 4 CPUs: at `gpus_per_worker: 0.25` the derived concurrency is 4, four
    trials run at once, all on GPU id 0, each on CPU inside (torch.cuda is not available); a real crosspt
    search at that share finishes its four trials with overlapping child runs."""
    from ray import tune

    from ray_cluster import RayHead
    from test_search import tiny_space

    monkeypatch.chdir(tmp_path)
    head = RayHead(tmp_path, num_cpus=4, num_gpus=1)
    try:
        with joined(head.address):
            from crosspt.run.trainer import init_ray

            init_ray()
            # 10 epochs: a trial outlasts the staggered start of the others (Ray starts one actor after another;
            # with 2 epochs on the tiny model the first trial could end before the fourth began)
            space = _with_scaling(tiny_space(tiny_t5_path, "fracgpu", num_samples=4, budget={"max_epochs": 10}), use_gpu=True,
                                  gpus_per_worker=0.25)
            cfg = space.base_config()
            assert derive_concurrency(space, cfg) == 4
            (tmp_path / "barrier").mkdir()
            tuner = tune.Tuner(tune.with_resources(_placement_probe(), trial_resources(cfg)),
                               param_space={"dir": str(tmp_path / "barrier"), "n": 4},
                               tune_config=tune.TuneConfig(num_samples=4, max_concurrent_trials=derive_concurrency(space, cfg)),
                               run_config=tune.RunConfig(name="probe", storage_path=str(tmp_path / "probe"), verbose=0))
            results = tuner.fit()
            assert not results.errors, results.errors
            rows = [r.metrics for r in results]
            t0 = min(m["start"] for m in rows)
            print("\nplacement at gpus_per_worker=0.25 on 1 fake GPU:")
            for m in sorted(rows, key=lambda m: m["start"]):
                print(f"  trial {m['trial_id']}: gpu_ids={m['gpu_ids']} accelerator_ids={m['accelerator_ids']} "
                      f"device={m['device']} cuda={m['cuda_available']} window "
                      f"{m['start'] - t0:+.1f}s..{m['end'] - t0:+.1f}s")
            assert len(rows) == 4
            assert all(json.loads(m["gpu_ids"]) == ["0"] for m in rows), rows
            assert all(json.loads(m["accelerator_ids"]) == ["0"] for m in rows), rows
            assert all(m["device"] == "cpu" and not m["cuda_available"] for m in rows)
            assert max(m["start"] for m in rows) < min(m["end"] for m in rows), "the four trials did not overlap"

            uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
            summary = run_search(space, data_dir=str(data_dir), tracking_uri=uri,
                                 storage_path=str(tmp_path / "ray_results"), verbose=0)
        assert summary["num_trials"] == 4 and summary["num_failed"] == 0
        children = experiments.child_runs(uri, summary["experiment_id"], summary["parent_run_id"])
        assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
        configs = [yaml.safe_load(Path(store.client(uri).download_artifacts(r.info.run_id, "config.yaml", str(tmp_path / r.info.run_id))).read_text())
                   for r in children]
        assert all(cfg["scaling"]["gpus_per_worker"] == 0.25 for cfg in configs)
        windows = sorted((r.info.start_time, r.info.end_time) for r in children)
        print("search child runs (s from the first start): "
              + ", ".join(f"{(a - windows[0][0]) / 1e3:.1f}..{(b - windows[0][0]) / 1e3:.1f}" for a, b in windows))
        assert max(a for a, _ in windows) < min(b for _, b in windows), "the search's trials did not run at once"
    finally:
        head.stop()


def _with_scaling(space: SearchSpace, **scaling) -> SearchSpace:
    tree = space.model_dump(mode="json")
    tree["base"]["scaling"].update(scaling)
    return SearchSpace.model_validate(tree)


# ---- slow: a head and a worker node, no shared disk for Tune or MLflow ----------------------------------
@pytest.mark.slow
def test_search_on_a_worker_node_with_s3_storage_and_resume(tiny_t5_path, data_dir, tmp_path, monkeypatch):
    """A head that offers no CPUs (nothing but GCS, the driver's home) and a worker node on its own loopback
    address that has neither the S3 nor the MLflow settings in its environment (none is needed there: Tune
    ships its storage filesystem to the trials, MLflow goes through the server). Tune keeps its state in an
    S3 bucket (moto), MLflow runs behind
    `mlflow server` with proxied artifacts. The `crosspt search` driver is SIGKILLed once a trial has
    finished; `--resume` reads the search's state back from the bucket and finishes: every trial ran on
    the worker node, every child run is FINISHED, checkpoints and experiment state are in the bucket."""
    from ray_cluster import MlflowServer, RayHead, RayNode, S3Server
    from test_reliability import cli_env, run, tiny_tree, trial_runs, wait_for

    t0 = time.time()
    s3, mlflow_server = S3Server(tmp_path), MlflowServer(tmp_path)
    # the driver's data folder: a copy the worker node cannot see (an empty tmpfs over it in its namespace)
    driver_data = tmp_path / "driver_data"
    shutil.copytree(Path(data_dir) / "glue_data" / "RTE", driver_data / "glue_data" / "RTE")
    node_cache = tmp_path / "node_cache"
    head = RayHead(tmp_path, num_cpus=0, node_ip="127.0.0.2", resources={"head": 1})
    node = RayNode(head, tmp_path, node_ip="127.0.0.3", num_cpus=2, drop=("AWS_", "MLFLOW_"),
                   env={"CROSSPT_CACHE_DIR": str(node_cache)}, hide=(driver_data,))
    driver = None
    try:
        samples, epochs, name = 4, 2, "multinode"
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump(tiny_tree(tiny_t5_path, name, samples=samples, epochs=epochs)))
        storage = f"s3://{s3.bucket}/ray_results"
        env = cli_env(RAY_ADDRESS=head.address, CROSSPT_DATA_DIR=str(driver_data), **s3.env)
        cmd = [sys.executable, "-m", "crosspt.cli", "search", "--space", str(space),
               "--tracking-uri", mlflow_server.url, "--storage-path", storage]
        db = tmp_path / "server.db"                              # the MLflow server's own store, read-only here
        log = tmp_path / "driver1.log"
        with open(log, "w") as out:
            driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        state_key = f"ray_results/{name}/experiment_state"
        wait_for(lambda: any(s == "FINISHED" for _, s, _, _ in trial_runs(db))
                 and any(k.startswith(state_key) for k in s3.keys(f"ray_results/{name}/")),
                 150, "a FINISHED trial in MLflow and Tune's state in the bucket", driver, log, every=1)
        os.killpg(driver.pid, signal.SIGKILL)                    # the driver dies: no cleanup at all
        driver.wait(30)
        killed_at = time.time() - t0
        finished_before = sum(s == "FINISHED" for _, s, _, _ in trial_runs(db))

        t1 = time.time()
        out = run([*cmd, "--resume", "--summary-json", str(tmp_path / "resumed.json")], env, tmp_path, 180)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        resume_s = time.time() - t1
        summary = json.loads((tmp_path / "resumed.json").read_text())
        assert summary["num_trials"] == samples and summary["num_failed"] == 0
        assert all(t["status"] == "FINISHED" and t["epochs"] == epochs for t in summary["trials"]), summary["trials"]

        # MLflow: one FINISHED child run per trial, nothing RUNNING, artifacts stored by the server
        children = experiments.child_runs(mlflow_server.url, summary["experiment_id"], summary["parent_run_id"])
        # every trial of the search has one FINISHED child run, and only those are in the default view: a
        # trial the killed driver had started but Tune never saved is not resumed (a new trial takes its
        # place), and its run is an orphan (soft-deleted) whether the reconciliation ended it or it had
        # finished on its own before the kill
        assert sorted(r.data.tags[experiments.TRIAL_TAG] for r in children) == sorted(t["trial_id"] for t in summary["trials"]), \
            [(r.info.run_name, r.info.status) for r in children]
        assert all(r.info.status == "FINISHED" for r in children), [(r.info.run_name, r.info.status) for r in children]
        assert store.client(mlflow_server.url).get_run(summary["parent_run_id"]).info.status == "FINISHED"
        assert len(list((tmp_path / "server_artifacts").rglob("prompts.safetensors"))) >= samples

        # the bucket: the search's state, Tune's experiment state and every trial's checkpoints
        keys = s3.keys(f"ray_results/{name}/")
        assert f"ray_results/{name}/crosspt_search.json" in keys and f"ray_results/{name}/tuner.pkl" in keys
        assert any(k.startswith(state_key) for k in keys)
        # every trial of the search has its checkpoints there, under its one name (`trialNNN_<id>`, restored
        # trials too); a trial the killed driver had started but Tune never saved may leave an orphan folder
        ckpt_trials = {k.split("/")[2] for k in keys if "/checkpoint_" in k}
        by_id = {d.rsplit("_", 1)[1]: d for d in ckpt_trials}
        assert {t["trial_id"] for t in summary["trials"]} <= set(by_id), sorted(ckpt_trials)
        assert all(re.fullmatch(r"trial\d{3}_" + t["trial_id"], by_id[t["trial_id"]]) for t in summary["trials"]), \
            sorted(ckpt_trials)

        # where the trials ran: Tune's record (read back from the bucket) of each trial's node
        from crosspt.search.reconcile import tune_trials

        for k, v in s3.env.items():                              # pyarrow reads the bucket's endpoint from env
            monkeypatch.setenv(k, v)
        per_node: dict[str, int] = {}
        for t in tune_trials(f"{storage}/{name}"):
            ip = (t.last_result or {}).get("node_ip", "?")
            per_node[ip] = per_node.get(ip, 0) + 1
        assert per_node == {"127.0.0.3": samples}, per_node
        # the data reached the worker node through the object store as the k-shot splits the driver drew once:
        # the space searches no key they depend on, so no task file was shipped (the node, which cannot see
        # the driver's folder, has none in its cache); the runs still name the driver's folder
        shipped = sorted(str(f.relative_to(node_cache)) for f in node_cache.rglob("*.tsv"))
        assert shipped == [], shipped
        assert all(r.data.tags["crosspt.data_source"] == str(driver_data) for r in children)
        print(f"\nmulti-node: trials per node {per_node}; driver killed at {killed_at:.0f}s with {finished_before} "
              f"FINISHED; resume {resume_s:.0f}s -> {samples} trials FINISHED; {len(keys)} objects in the bucket "
              f"({len(ckpt_trials)} trials with checkpoints); wall {time.time() - t0:.0f}s")
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        for service in (node, head, mlflow_server, s3):
            service.stop()


def test_shipped_inputs_land_in_a_node_cache_only_where_missing(tmp_path, data_dir, monkeypatch):
    """What a trial on a node without the driver's disk reads: the task files and bank, written once to a
    content-addressed cache; where the paths exist nothing is fetched (an unusable ref is never touched)."""
    from crosspt.run import shipping
    from crosspt.tasks.data import task_files
    from crosspt.tasks.specs import get_task

    monkeypatch.setenv("CROSSPT_CACHE_DIR", str(tmp_path / "cache"))
    files = task_files(get_task("rte"), data_dir)
    assert sorted(f.name for f in files) == ["dev.tsv", "train.tsv"]
    bank = tmp_path / "bank.safetensors"
    bank.write_bytes(b"not really a bank")
    packed = shipping.pack_search_inputs(files, str(data_dir), [str(bank), str(tmp_path / "absent")])
    assert set(packed["data"]) == {"glue_data/RTE/train.tsv", "glue_data/RTE/dev.tsv"}
    assert list(packed["banks"]) == [str(bank)]
    first = shipping.materialise(packed["data"])
    assert first == shipping.materialise(packed["data"])                   # content-addressed: written once
    assert (first / "glue_data/RTE/train.tsv").read_bytes() == (Path(data_dir) / "glue_data/RTE/train.tsv").read_bytes()

    here = load_config(None, {"tasks": ["rte"], "data.data_dir": str(data_dir), "prompt.n_sources": 1,
                              "prompt.source_bank": str(bank)})
    unusable = shipping.manifest(packed, ref="not an object ref")
    assert shipping.missing_here(here, unusable) == (False, False)
    assert shipping.localise(here, unusable) is here                          # nothing missing: no fetch
    empty = tmp_path / "empty"                                               # a folder without the files
    empty.mkdir()
    gone = here.model_copy(update={"data": here.data.model_copy(update={"data_dir": str(empty)})})
    assert shipping.missing_here(gone, unusable) == (True, False)
    assert shipping.missing_here(gone, None) == (False, False)               # nothing shipped: read as given


def test_k_shot_splits_are_drawn_once_per_data_key_and_shipped_by_key(data_dir, monkeypatch):
    """The driver draws a search's k-shot splits once per data key (tasks, seed, shots, ...), not per trial:
    configurations that differ in anything else share one draw; a trial whose key was not drawn draws its
    own (nothing is fetched for it)."""
    from crosspt.run import inputs, shipping

    seeds = []
    real = inputs.prepare_data
    monkeypatch.setattr(inputs, "prepare_data", lambda cfg, splits=None: seeds.append(cfg.seed) or real(cfg, splits))
    base = load_config(None, {"tasks": ["rte"], "data.data_dir": str(data_dir), "data.shots": 4})
    other_lr = load_config(None, {"tasks": ["rte"], "data.data_dir": str(data_dir), "data.shots": 4,
                                  "optim.prompt_lr": 0.2, "prompt.private_len": 3})
    repeat = load_config(None, {"tasks": ["rte"], "data.data_dir": str(data_dir), "data.shots": 4, "seed": 1000})
    drawn = shipping.draw_splits([(base, None), (other_lr, None), (repeat, None)])
    assert seeds == [0, 1000] and len(drawn) == 2
    assert shipping.split_key(other_lr) == shipping.split_key(base) != shipping.split_key(repeat)
    assert drawn[shipping.split_key(base)]["rte"]["train"] == real(base)[1]["rte"]["train"]
    shipped = shipping.manifest({"data": {}, "banks": {}}, ref=None, splits=drawn, splits_ref="not an object ref")
    more_shots = load_config(None, {"tasks": ["rte"], "data.data_dir": str(data_dir), "data.shots": 8})
    assert shipping.shipped_splits(more_shots, shipped) is None and shipping.shipped_splits(base, None) is None

"""Past one machine: fractional GPUs per trial, what a cluster can place at once, and a search over a
head and a worker node with no shared disk (S3 storage through moto, MLflow through its server).

Fast: the `scaling.gpus_per_worker` rules and the concurrency arithmetic over given nodes. Slow: real Ray
heads started here (fake GPUs: Ray schedules `--num-gpus` without CUDA behind them)."""
from __future__ import annotations

import pytest

from crosspt.config.schema import ScalingConfig, config_hash, load_config
from crosspt.config.space import SearchSpace
from crosspt.errors import ConfigError
from crosspt.search.driver import derive_concurrency, trial_resources, trials_that_fit


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

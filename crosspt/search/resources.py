"""How many trials run at once, and what Tune reserves for each."""
from __future__ import annotations

import math

from crosspt.config.schema import RunConfig
from crosspt.config.space import SearchSpace


def derive_concurrency(space: SearchSpace, cfg: RunConfig, nodes: list[dict] | None = None) -> int:
    """Trials that fit at once (`resources.max_concurrent_trials: auto`), capped by an explicit number:
    Train V2 worker groups sit outside Tune's accounting, so a higher value than the cluster can place
    deadlocks the search. `nodes`: Ray's `ray.nodes()` (read from the running cluster when None)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    fit = max(1, trials_that_fit(nodes, cfg.scaling.worker_resources(), cfg.scaling.num_workers))
    asked = space.resources.max_concurrent_trials
    return fit if asked == "auto" else max(1, min(int(asked), fit))


def trials_that_fit(nodes: list[dict], per_worker: dict[str, float], num_workers: int) -> int:
    """How many trials of `num_workers` workers of `per_worker` resources the alive `nodes` can place:
    per node the minimum over the asked resources of floor(node total / per worker), summed, over the
    workers a trial needs. Counted per node, since a worker's bundle cannot straddle two machines
    (two nodes of 3 CPUs hold two 2-CPU trials, not three)."""
    workers = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources", {})
        # Ray keeps resources in 1e-4 units: 1 / 0.25 GPU is 4 there, floor() must not see 3.9999
        workers += min(math.floor(have.get(k, 0.0) / v + 1e-6) for k, v in per_worker.items() if v > 0)
    return workers // num_workers


def trial_resources(cfg: RunConfig) -> dict:
    """What Tune reserves for one trial: the in-process trial runs the loop itself and holds one worker's
    CPUs and (possibly fractional) GPU; a worker-group trial only drives the group, which asks for its own."""
    if cfg.scaling.num_workers == 1 and cfg.scaling.in_process:
        return {"cpu": cfg.scaling.cpus_per_worker, "gpu": cfg.scaling.gpus}
    return {"cpu": 0, "memory": 1}

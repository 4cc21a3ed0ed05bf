"""What a trial's child run logs as params: the searched factors (`logged_params`; a single `crosspt train`
run: the whole run config as flat `section.key` params), where a factor that does nothing in this
trial's configuration reads `inactive` instead of its base value.

Why: MLflow's parallel-coordinates and param-comparison views plot every param value they get. A trial
without source prompts would show `prompt.source_len = 16` or `optim.router_lr = 0.01` as if those had
been chosen, and the plot would draw lines through values that never acted. What acts where is the one
liveness table (`crosspt.config.liveness`), which the sampler also obeys: a sampled value always acts.
"""
from __future__ import annotations

from typing import Any

from crosspt.config.liveness import dead_keys
from crosspt.config.schema import RunConfig, flatten
from crosspt.config.space import SearchSpace

INACTIVE = "inactive"


def inactive_keys(cfg: RunConfig, space: SearchSpace | None = None, sampled: dict[str, Any] | None = None) -> set[str]:
    """Config keys that do not act in `cfg` (the liveness table, `crosspt.config.liveness`) and were not
    sampled, plus the space's factors this trial did not sample (their `when:` failed, or they were dead)."""
    off = dead_keys(cfg)
    if space is not None:
        off |= set(space.space)
    return off - set(sampled or {})


def trial_params(cfg: RunConfig, space: SearchSpace | None = None,
                 sampled: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat config of one trial (or of a single `crosspt train` run: no space, nothing sampled) with its
    inactive keys as `inactive`."""
    off = inactive_keys(cfg, space, sampled)
    return {k: INACTIVE if k in off else v for k, v in flatten(cfg.model_dump(mode="json")).items()}


def logged_params(cfg: RunConfig, space: SearchSpace, sampled: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a search trial's child run logs as MLflow params: the space's factors (`inactive` where they did
    not act), nothing else. The runs table and its charts then show the factors, not a hundred keys
    that are the same in every trial; the full configuration is the run's `config.yaml`."""
    params = trial_params(cfg, space, sampled)
    return {k: params[k] for k in space.space if k in params}

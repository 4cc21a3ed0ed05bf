"""What a trial's child run logs as params: the whole run config as flat `section.key` params, where a
factor that does nothing in this trial's configuration reads `inactive` instead of its base value.

Why: MLflow's parallel-coordinates and param-comparison views plot every param value they get. A trial
without source prompts would show `prompt.source_len = 16` or `optim.router_lr = 0.01` as if those had
been chosen, and the plot would draw lines through values that never acted. Values the searcher sampled
are logged as sampled, even where they happen not to act: they are the searcher's choices.
"""
from __future__ import annotations

from typing import Any

from crosspt.config.schema import RunConfig, flatten
from crosspt.config.space import SearchSpace

INACTIVE = "inactive"

# act only when there are source prompts to read
SOURCE_KEYS = frozenset({"prompt.source_len", "prompt.learn_sources", "prompt.source_bank",
                         "prompt.source_selection"})
# act only when there are two or more candidate prompts to route between (one candidate gets weight 1)
ROUTING_KEYS = frozenset({"prompt.composition", "prompt.top_k", "prompt.router", "optim.router_lr",
                          "prompt.temperature.start", "prompt.temperature.floor", "prompt.temperature.rate"})


def inactive_keys(cfg: RunConfig, space: SearchSpace | None = None, sampled: dict[str, Any] | None = None) -> set[str]:
    """Config keys that do not act in `cfg` and were not sampled: source and routing keys without
    sources or routing, `init_text` unless the init is text, and space factors whose `when:` failed."""
    p = cfg.prompt
    off = set()
    if p.n_sources == 0:
        off |= SOURCE_KEYS
    if p.n_candidates < 2:
        off |= ROUTING_KEYS
    if p.init != "text":
        off.add("prompt.init_text")
    if space is not None:
        off |= set(space.space)
    return off - set(sampled or {})


def trial_params(cfg: RunConfig, space: SearchSpace | None = None,
                 sampled: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat config of one trial (or of a single `crosspt train` run: no space, nothing sampled) with its
    inactive keys as `inactive`."""
    off = inactive_keys(cfg, space, sampled)
    return {k: INACTIVE if k in off else v for k, v in flatten(cfg.model_dump(mode="json")).items()}

"""One table of liveness: for every config key that is not always read, when it is read.

A key is *live* in a configuration when the code reads it there: `prompt.temperature.rate` only under
the `step` schedule, the routing keys only when there are two or more candidate prompts to route between,
`prompt.placement` only on a backbone family whose prompt has a choice of place. Everything that asks
"does this key act here?" asks this table:

* the search space: a factor is sampled only where it is live (`crosspt.config.space.sample` skips a dead
  one, as if its `when:` had failed), so Optuna never records a value that did nothing, and validation
  refuses a factor that no sampled configuration would read (`dead_factor_error`);
* MLflow: a key dead in a trial's configuration is logged as `inactive` (`crosspt.search.params`);
* the report: a factor absent from a trial's sampled values is inactive there (the trials' `crosspt.sampled`
  tags are what `sample` drew, so they follow this table too).

Each rule names the keys its predicate looks at (`depends`): a space must sample those before the factor
(validation says so), the same ordering rule as for `when:`. Some rules need the backbone family, which
only the backbone's config file knows: `family_of` resolves it once per backbone; where it cannot be
resolved the family-dependent keys count as live (never refuse what might act).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from crosspt.backbones.base import Family
from crosspt.method.composition import Schedule
from crosspt.method.prompts import RouterKind


@dataclass(frozen=True)
class Rule:
    """When a key is read: `reads(cfg, family)` (cfg a `RunConfig`, family a concrete `Family` value or
    None when unknown), in words (`why`), and the keys the predicate looks at (`depends`)."""
    reads: Callable[[object, str | None], bool]
    why: str
    depends: tuple[str, ...]


def _sources(cfg, _family) -> bool:
    return cfg.prompt.n_sources > 0


def _routed(cfg, _family) -> bool:
    return cfg.prompt.n_candidates >= 2


def _normalised(cfg, family) -> bool:
    # ATTEMPT as published (`attention`) is a plain softmax: no normalization rule, top-k or temperature
    return _routed(cfg, family) and cfg.prompt.router != RouterKind.ATTENTION


def _family_is(*families: Family):
    def reads(_cfg, family) -> bool:
        return family is None or family in {f.value for f in families}
    return reads


def _placement_choice(_cfg, family) -> bool:
    from crosspt.backbones.loader import fixed_placement

    return family is None or fixed_placement(family) is None


_N = ("prompt.n_sources", "prompt.private_len")
_ROUTER = (*_N, "prompt.router")
SOURCES = Rule(_sources, "acts only with source prompts (prompt.n_sources > 0)", ("prompt.n_sources",))
ROUTING = Rule(_routed, "acts only with two or more candidate prompts to route between "
                        "(prompt.n_sources + a private prompt >= 2)", _N)
NORMALISED = Rule(_normalised, "acts only when a task or attention_gated router weighs two or more candidates "
                               "(prompt.router 'attention' is a plain softmax)", _ROUTER)

LIVENESS: dict[str, Rule] = {
    "prompt.source_len": SOURCES,
    "prompt.learn_sources": SOURCES,
    "prompt.source_selection": SOURCES,
    "prompt.include_own_source": SOURCES,
    "prompt.source_bank": Rule(lambda c, f: c.prompt.n_sources > 0 or c.prompt.init == "own_source",
                               "acts only with source prompts or prompt.init 'own_source'",
                               ("prompt.n_sources", "prompt.init")),
    "optim.source_lr": Rule(lambda c, f: c.prompt.n_sources > 0 and c.prompt.learn_sources,
                            "acts only on learned source prompts (prompt.learn_sources with prompt.n_sources > 0)",
                            ("prompt.n_sources", "prompt.learn_sources")),
    "prompt.composition": ROUTING,
    "prompt.router": ROUTING,
    "optim.router_lr": ROUTING,
    "prompt.top_k": NORMALISED,
    "prompt.normalization": NORMALISED,
    "prompt.temperature.schedule": NORMALISED,
    "prompt.temperature.start": NORMALISED,
    "prompt.temperature.floor": NORMALISED,
    "prompt.temperature.rate": Rule(lambda c, f: _normalised(c, f) and c.prompt.temperature.schedule == Schedule.STEP,
                                    "acts only under prompt.temperature.schedule 'step' (exp and linear anneal "
                                    "over training progress)", (*_ROUTER, "prompt.temperature.schedule")),
    "prompt.router_bias": Rule(lambda c, f: _normalised(c, f) and c.prompt.private_len > 0,
                               "acts only when a private prompt is routed against sources (its initial logit)",
                               _ROUTER),
    "prompt.init": Rule(lambda c, f: c.prompt.private_len > 0,
                        "initialises the private prompt: acts only with prompt.private_len > 0",
                        ("prompt.private_len",)),
    "prompt.init_text": Rule(lambda c, f: c.prompt.private_len > 0 and (
        c.prompt.init == "text" or (c.prompt.init == "auto" and _family_is(Family.DECODER)(c, f))),
        "acts only under prompt.init 'text' (a decoder's 'auto')",
        ("prompt.private_len", "prompt.init", "backbone.name", "backbone.family")),
    "prompt.placement": Rule(_placement_choice, "acts only on a backbone family whose prompt has a choice of "
                                                "place (seq2seq); encoders and decoders place it themselves",
                             ("backbone.name", "backbone.family")),
    "backbone.pair_encoding": Rule(_family_is(Family.ENCODER), "acts only on an encoder backbone",
                                   ("backbone.name", "backbone.family")),
    "backbone.template": Rule(_family_is(Family.DECODER), "acts only on a decoder backbone (how its input is written)",
                              ("backbone.name", "backbone.family")),
    "optim.head_lr": Rule(_family_is(Family.ENCODER), "acts only on an encoder backbone (its scoring heads)",
                          ("backbone.name", "backbone.family")),
    "train.generated_metrics": Rule(_family_is(Family.SEQ2SEQ, Family.DECODER),
                                    "acts only on a backbone that generates (seq2seq, decoder)",
                                    ("backbone.name", "backbone.family")),
}


_FAMILIES: dict[tuple[str, str], str] = {}      # resolved families; a failure is not kept: it may pass later


def _resolved_family(name: str, family: str) -> str | None:
    from crosspt.backbones.loader import builtin_family, resolve_backbone
    from crosspt.errors import ConfigError, UnknownBackboneError

    if (known := builtin_family(name)) is not None:
        return known
    key = (name, family)
    if key not in _FAMILIES:
        try:
            _FAMILIES[key] = resolve_backbone(name, family=family)["family"]
        # what resolve_backbone raises for a backbone it cannot resolve here (offline and not cached, not yet
        # prepared): family-dependent keys count as live, and the next call tries again; anything else is a bug
        except (UnknownBackboneError, ConfigError):
            return None
    return _FAMILIES[key]


def family_of(cfg) -> str | None:
    """The concrete backbone family of `cfg` (`Family` value), None when it cannot be resolved here."""
    b = cfg.backbone
    return b.family if b.family != Family.AUTO else _resolved_family(b.name, b.family)


def is_live(key: str, cfg, family: str | None = None) -> bool:
    """Whether `cfg` reads `key` (a key without a rule is always read). `family`: the concrete backbone
    family when the caller knows it (default: `family_of(cfg)`, resolved only for the keys that need it)."""
    rule = LIVENESS.get(key)
    if rule is None:
        return True
    if family is None and any(d.startswith("backbone.") for d in rule.depends):
        family = family_of(cfg)
    return bool(rule.reads(cfg, family))


def dead_keys(cfg, family: str | None = None) -> set[str]:
    """The keys of the table that `cfg` does not read."""
    return {k for k in LIVENESS if not is_live(k, cfg, family)}


def why_dead(key: str) -> str:
    rule = LIVENESS.get(key)
    return rule.why if rule else "always read"

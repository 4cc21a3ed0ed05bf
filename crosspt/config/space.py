"""Search spaces: a base run config plus distributions over its dotted keys, read from YAML.

    name: smoke
    base: {tasks: [sst2, rte], backbone: {name: minilm}, train: {epochs: 4}}
    space:
      prompt.n_sources: {type: int, low: 0, high: 2}
      prompt.top_k:     {type: int, low: 1, high: prompt.n_sources, when: {prompt.n_sources: ">1"}}
      optim.prompt_lr:  {type: loguniform, low: 1.0e-3, high: 0.3}
      prompt.composition: {type: choice, values: [cat, wavg]}
    objective: {metric: best_val_score, mode: max}
    budget: {num_samples: 3, max_epochs: 4}
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}

Parameters are sampled in file order (define-by-run), so a bound may name an earlier key (`high:
prompt.n_sources`, optionally `+ 1`) and `when` makes a factor exist only given another. The whole space
is validated before any trial starts: every key must exist in the run schema, every sampled config
must validate, and errors name the key.
"""
from __future__ import annotations

import copy
import math
import operator
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from crosspt.config.schema import RunConfig, Strict, apply_overrides, build_config, read_yaml, source_bank_problem
from crosspt.errors import ConfigError
from crosspt.tasks.data import ASSESS_AUTO

_REF = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(?:([+-])\s*(\d+))?\s*$")
_COND = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
        "!=": operator.ne}


class Param(Strict):
    type: Literal["loguniform", "uniform", "int", "choice"]
    low: float | int | str | None = None
    high: float | int | str | None = None
    step: int | None = Field(None, ge=1)
    log: bool = False
    values: list[Any] | None = None
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.type == "choice":
            if not self.values:
                raise ValueError("a 'choice' needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a 'choice' takes 'values', not 'low'/'high'")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a '{self.type}' needs 'low' and 'high'")
            if self.values is not None:
                raise ValueError(f"a '{self.type}' takes 'low'/'high', not 'values'")
            lo, hi = self.low, self.high
            for name, b in (("low", lo), ("high", hi)):
                if isinstance(b, float) and not math.isfinite(b):
                    raise ValueError(f"{name} must be a finite number (got {b})")
            if self.type == "int" and self.log and (self.step or 1) != 1:
                raise ValueError("an int with log: true cannot take a step other than 1 (Optuna refuses it)")
            if self.type != "int" and self.step is not None:
                raise ValueError(f"'step' applies to int factors only, not '{self.type}'")
            if not isinstance(lo, str) and not isinstance(hi, str):
                if lo > hi:
                    raise ValueError(f"low ({lo}) is greater than high ({hi})")
                if self.type == "loguniform" and lo <= 0:
                    raise ValueError(f"loguniform needs low > 0 (got {lo})")
                if self.type == "int" and (int(lo) != lo or int(hi) != hi):
                    raise ValueError("int bounds must be integers")
        return self


_OBJECTIVE = re.compile(r"^(best_val_score|val_score|val_\w+)$")


class Objective(Strict):
    """What the search maximises (or minimises): a validation metric every epoch reports. Never a test
    metric: a search that selects on test reports a test score it has tuned on."""
    metric: str = "best_val_score"
    mode: Literal["max", "min"] = "max"

    @field_validator("metric")
    @classmethod
    def _validation_only(cls, metric: str) -> str:
        if metric.startswith("test_") or "_test_" in metric:
            raise ValueError(f"{metric!r} selects on the test split: a search chooses on validation "
                             f"(best_val_score, val_score or val_<task>_<metric>)")
        if not _OBJECTIVE.match(metric):
            raise ValueError(f"{metric!r} is not a metric every epoch reports "
                             f"(use best_val_score, val_score or val_<task>_<metric>)")
        return metric


class Budget(Strict):
    num_samples: int = Field(8, ge=1)
    max_epochs: int | None = Field(None, ge=1)        # overrides base train.epochs
    time_budget_s: float | None = Field(None, gt=0)
    # k-shot samples per trial (seeds seed, seed+1000, ...): the objective is their mean, in-process trials only
    repeats: int = Field(1, ge=1)
    # test examples a trial scores per task when the base sets no `data.max_test` (the same seeded subset in
    # every trial; a base `data.max_test: null` scores the whole dev split). The search ranks trials on
    # validation, so its test scores are informational: scoring all of QQP's 40k dev rows in every trial
    # costs more than its few-shot training. `crosspt evaluate` and the benchmarks score what they are given.
    max_test: int | None = Field(1000, ge=1)


class Scheduler(Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)
    # ASHA ranks trials at each rung by the objective's metric, in the objective's mode (derived: a rung
    # decided on another signal than the one the search selects on stops trials for the wrong reason);
    # set only to restate it
    metric: str | None = None


class Searcher(Strict):
    # optuna: TPE (adaptive: it samples more where scores were high, so level means are confounded);
    # random: Optuna's RandomSampler; qmc: Optuna's QMCSampler (scrambled Sobol), the design mode for
    # attributing effects to factors (crosspt.search.optuna_glue.make_sampler)
    algorithm: Literal["optuna", "random", "qmc"] = "optuna"
    # TPE's `group` mode (multivariate with one joint model per set of co-occurring factors, meant for
    # conditional spaces). Off by default: on CrossPT-shaped conditional spaces it reached the optimum
    # later than Optuna's default TPE, not sooner (benchmarks/search_signal.md, 20 seeds, two objectives)
    tpe_group: bool = False
    seed: int = 0
    constant_liar: bool = True
    n_startup_trials: int = Field(4, ge=1)
    points: list[dict[str, Any]] = []                  # configurations to try first (warm start), in order
    # the design phase (`crosspt.search.design`): the search's first `design` trials are a randomised
    # balanced design (levels balanced, assigned by a seeded random permutation, never pruned) that the
    # report's tests stand on; the optimiser continues after them and learns from them. 0: no design phase
    # (the report then tests nothing it cannot: every verdict is a hint unless all trials were drawn at
    # random and all finished). `auto`: half the budget (`budget.num_samples // 2`), see `design_count`.
    design: int | Literal["auto"] = "auto"

    @field_validator("design")
    @classmethod
    def _design(cls, v):
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            raise ValueError(f"design must be a number of trials >= 0 or 'auto' (got {v})")
        return v


class Resources(Strict):
    max_concurrent_trials: int | Literal["auto"] = "auto"
    max_retries: int = Field(0, ge=0)                  # per trial, for crashes (not for divergence)


class SourcePretrain(Strict):
    """`base.prompt.source_bank: {pretrain: {...}}`: the search pre-trains its source bank first (one
    vanilla prompt per task, `crosspt pretrain-sources`) unless a bank of the same spec is registered as a
    version of `model_name` already, and the trials read that version. The other settings of the
    pre-training runs are the search's base config."""
    tasks: list[str] = Field(min_length=1)
    shots: int | Literal["all"] = Field(16)
    epochs: int | None = Field(None, ge=1)
    seed: int | None = None
    model_name: str = "glue-sources"
    alias: str = "current"

    @model_validator(mode="after")
    def _shots(self):
        if self.shots == "all":
            # the run schema's data.shots is a positive int: full-data source training has no config yet
            raise ValueError("shots: all is not supported yet (data.shots takes a number of examples)")
        if self.shots < 1:
            raise ValueError(f"shots must be >= 1 (got {self.shots})")
        return self

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{self.alias}"


class SearchSpace(Strict):
    name: str = "search"
    description: str = ""
    base: dict[str, Any] = {}
    space: dict[str, Param] = {}
    objective: Objective = Objective()
    budget: Budget = Budget()
    scheduler: Scheduler = Scheduler()
    search: Searcher = Searcher()
    resources: Resources = Resources()
    storage_path: str | None = None                    # Ray results; default ./ray_results

    @model_validator(mode="after")
    def _scheduler_metric(self):
        if self.scheduler.metric is not None and self.scheduler.metric != self.objective.metric:
            raise ValueError(f"scheduler.metric {self.scheduler.metric!r} differs from objective.metric "
                             f"{self.objective.metric!r}: ASHA stops trials on the objective (leave it unset)")
        return self

    @model_validator(mode="after")
    def _design_fits(self):
        d = self.search.design
        if isinstance(d, int) and d > self.budget.num_samples:
            raise ValueError(f"search.design ({d}) is more trials than budget.num_samples "
                             f"({self.budget.num_samples}): the design is the search's first trials")
        return self

    @model_validator(mode="after")
    def _source_pretrain(self):
        try:
            self.source_pretrain()
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"base.prompt.source_bank.pretrain.{'.'.join(map(str, first['loc']))}: "
                             f"{first['msg']}") from None
        bank = (self.base.get("prompt") or {}).get("source_bank") if isinstance(self.base.get("prompt"), dict) else None
        if bank is not None and "prompt.source_len" in self.space:
            # a bank holds prompts of one length: a trial asking another one would fail at its first step
            raise ValueError("space.prompt.source_len: the source bank (base.prompt.source_bank) holds prompts of "
                             "one length, base prompt.source_len; fix it there, or search banks of other lengths "
                             "as prompt.source_bank choices")
        return self

    # ---- derived -----------------------------------------------------------------------------
    def design_count(self) -> int:
        """How many of the first trials form the design: `search.design`, or for `auto` half the budget
        (`num_samples // 2`, the other half left to the optimiser; 0 below 4 trials, where a design of
        1 trial per level tests nothing). A search without factors has no design."""
        if not self.space:
            return 0
        d = self.search.design
        if d == "auto":
            n = self.budget.num_samples // 2
            return n if n >= 2 else 0
        return int(d)

    @property
    def scheduler_metric(self) -> str:
        """The per-epoch metric ASHA ranks by: the objective's."""
        return self.objective.metric

    def source_pretrain(self) -> SourcePretrain | None:
        """The bank to pre-train (`base.prompt.source_bank: {pretrain: {...}}`), or None."""
        bank = (self.base.get("prompt") or {}).get("source_bank") if isinstance(self.base.get("prompt"), dict) else None
        if not isinstance(bank, dict):
            return None
        if set(bank) != {"pretrain"}:
            raise ValueError(f"base.prompt.source_bank as a mapping takes one key, 'pretrain' (got {sorted(bank)})")
        return SourcePretrain.model_validate(bank["pretrain"])

    def source_pretrain_config(self) -> RunConfig | None:
        """The config `crosspt pretrain-sources` trains the bank from: the base config with the pretrain
        form's tasks, shots, epochs and seed (None without a pretrain form)."""
        p = self.source_pretrain()
        if p is None:
            return None
        tree = self.base_tree()
        tree.update(name=f"{self.name}-bank", tasks=list(p.tasks), **({"seed": p.seed} if p.seed is not None else {}))
        tree.setdefault("data", {})["shots"] = p.shots
        tree["data"]["assess_rows"] = 0         # sources are not assessed: they train on the other half
        if p.epochs is not None:
            tree.setdefault("train", {})["epochs"] = p.epochs
        return build_config(tree, f"space '{self.name}' source bank")

    def with_source_bank(self, ref: str) -> "SearchSpace":
        """This space with `base.prompt.source_bank` set to `ref` (a file or models:/ URI)."""
        space = self.model_copy(deep=True)
        space.base["prompt"]["source_bank"] = ref
        return space

    def base_tree(self) -> dict:
        tree = copy.deepcopy(self.base)
        pretrain = self.source_pretrain()
        if pretrain is not None:
            # until the driver pins the bank's version: the alias it will be registered under
            tree["prompt"]["source_bank"] = pretrain.model_uri
        if self.budget.max_epochs:
            if not isinstance(tree.get("train", {}), dict):
                raise ConfigError(f"space '{self.name}': base.train must be a section (a mapping of training "
                                  f"settings), not {type(tree['train']).__name__}")
            tree.setdefault("train", {})["epochs"] = self.budget.max_epochs
        if isinstance(tree.get("data", {}), dict) and self.budget.max_test is not None:
            tree.setdefault("data", {}).setdefault("max_test", self.budget.max_test)
        if isinstance(tree.get("train", {}), dict):
            # the generated metrics are a second, token-by-token test pass: opt-in for trials
            tree.setdefault("train", {}).setdefault("generated_metrics", False)
        if isinstance(tree.get("data", {}), dict):
            # every trial also scores its selected state on the fixed assessment rows (what the report tests)
            tree.setdefault("data", {}).setdefault("assess_rows", ASSESS_AUTO)
        return tree

    def base_config(self) -> RunConfig:
        return build_config(self.base_tree(), f"space '{self.name}' base")

    def config_for(self, params: dict[str, Any]) -> RunConfig:
        tree = apply_overrides(self.base_tree(), dict(params))
        return build_config(tree, f"space '{self.name}'")


# ---- sampling (define-by-run, shared by Optuna and validation) -----------------------------------
def _resolve_bound(value, sampled: dict, base: dict, key: str):
    if not isinstance(value, str):
        return value
    m = _REF.match(value)
    if not m:
        raise ConfigError(f"space key '{key}': bound {value!r} is neither a number nor 'other.key [+|- N]'")
    ref, sign, num = m.groups()
    if ref in sampled:
        v = sampled[ref]
    else:
        v = _lookup(base, ref)
        if v is _MISSING:
            raise ConfigError(f"space key '{key}': bound refers to '{ref}', which is neither an earlier "
                              f"space key nor set in base")
    if not _is_number(v):
        raise ConfigError(f"space key '{key}': bound refers to '{ref}', whose value {v!r} is not a number")
    off = int(num) if num else 0
    return v + off if sign == "+" else v - off if sign == "-" else v


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_MISSING = object()


def _lookup(tree: dict, dotted: str):
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def parse_condition(cond: Any, where: str) -> tuple[str, Any]:
    """A `when:` condition as (operator, operand): a list means membership, `">1"` a comparison,
    anything else equality. Ordering comparisons need a number (YAML-parsed) on the right."""
    if isinstance(cond, list):
        return "in", cond
    if isinstance(cond, str):
        m = _COND.match(cond)
        if m:
            op, rhs = m.groups()
            import yaml

            try:
                operand = yaml.safe_load(rhs)
            except yaml.YAMLError:
                raise ConfigError(f"{where}: condition {cond!r} is not '<op> <value>' with a YAML value") from None
            if op in ("==", "!="):
                return op, operand
            if not _is_number(operand):
                raise ConfigError(f"{where}: condition {cond!r} compares with {operand!r}, which is not a number")
            return op, operand
    return "==", cond


def _holds(cond: Any, value: Any, where: str) -> bool:
    op, operand = parse_condition(cond, where)
    if op == "in":
        return value in operand
    if op in ("==", "!="):
        return bool(_OPS[op](value, operand))
    if not _is_number(value):
        raise ConfigError(f"{where}: condition {cond!r} needs a number but the value is {value!r}")
    return bool(_OPS[op](value, operand))


def active(param: Param, sampled: dict, base: dict, key: str = "?") -> bool:
    for ref, cond in (param.when or {}).items():
        v = sampled[ref] if ref in sampled else _lookup(base, ref)
        if v is _MISSING or not _holds(cond, v, f"space key '{key}': when '{ref}'"):
            return False
    return True


def live_given(key: str, sampled: dict, base: dict, family: str | None = None) -> bool:
    """Whether `key` is read (`crosspt.config.liveness`) in the configuration of `base` with the values
    `sampled` so far. A partial configuration that does not validate yet (a later factor completes it)
    counts as live: the full configuration is validated anyway, and a factor is never dropped on a guess."""
    from crosspt.config.liveness import LIVENESS, is_live

    if key not in LIVENESS:
        return True
    try:
        cfg = build_config(apply_overrides(copy.deepcopy(base), dict(sampled)))
    except ConfigError:
        return True
    return is_live(key, cfg, family)


def sample(space: SearchSpace, suggest, family: str | None = None,
           skipped: dict[str, str] | None = None) -> dict[str, Any]:
    """Walk the space in order; `suggest(kind, key, **kw)` draws one value (Optuna trial or RNG).

    A factor is drawn only where it exists (its `when:` holds) and acts (`live_given`: the liveness table
    says the configuration so far reads it); otherwise it keeps its base value and is not in the result,
    so neither Optuna nor the report ever sees a value that did nothing. `family`: the backbone family,
    when the caller resolved it (default: resolved from the configuration, once per backbone).
    `skipped`, when given, gets why each factor not drawn was left out (`when` or `dead`)."""
    base = space.base_tree()
    sampled: dict[str, Any] = {}
    for key, p in space.space.items():
        if not active(p, sampled, base, key):
            if skipped is not None:
                skipped[key] = "when"
            continue
        if not live_given(key, sampled, base, family):
            if skipped is not None:
                skipped[key] = "dead"
            continue
        if p.type == "choice":
            sampled[key] = suggest("choice", key, values=p.values)
            continue
        lo = _resolve_bound(p.low, sampled, base, key)
        hi = _resolve_bound(p.high, sampled, base, key)
        if lo > hi:
            raise ConfigError(f"space key '{key}': low ({lo}) > high ({hi}) given {sampled}")
        if p.type == "int":
            sampled[key] = suggest("int", key, low=int(lo), high=int(hi), step=p.step or 1, log=p.log)
        else:
            sampled[key] = suggest("float", key, low=float(lo), high=float(hi), log=p.type == "loguniform")
    return sampled


class OptunaDefineByRun:
    """A define-by-run function for `OptunaSearch` (both algorithms): conditional factors become
    conditional suggests.

    A class (not a closure) because Tune pickles the searcher when it checkpoints the search."""

    def __init__(self, space: SearchSpace, family: str | None = None):
        self.space = space
        self.family = family

    def __call__(self, trial) -> None:
        def suggest(kind, key, **kw):
            if kind == "choice":
                return trial.suggest_categorical(key, kw["values"])
            if kind == "int":
                return trial.suggest_int(key, kw["low"], kw["high"], step=kw["step"], log=kw["log"])
            return trial.suggest_float(key, kw["low"], kw["high"], log=kw["log"])
        sample(self.space, suggest, self.family)
        return None


def random_sampler(seed: int):
    import random

    rng = random.Random(seed)

    def suggest(kind, key, **kw):
        if kind == "choice":
            return rng.choice(kw["values"])
        if kind == "int":
            return rng.randrange(kw["low"], kw["high"] + 1, kw["step"])
        if kw["log"]:
            import math

            return math.exp(rng.uniform(math.log(kw["low"]), math.log(kw["high"])))
        return rng.uniform(kw["low"], kw["high"])
    return suggest


def extremes_sampler(which: str):
    """Always the low (or high) end: checks the corners of the space."""
    def suggest(kind, key, **kw):
        if kind == "choice":
            return kw["values"][0 if which == "low" else -1]
        return kw[which]
    return suggest


# ---- loading and validation --------------------------------------------------------------------
def _schema_keys(model=RunConfig, prefix="") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = prefix + name
        keys.add(key)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _schema_keys(ann, key + ".")
    return keys


def _check_numeric_refs(space: SearchSpace, key: str, p: Param) -> None:
    """Bounds and ordering conditions need numbers: refuse a reference to a choice with a
    non-numeric value up front, whichever values the validation samples happen to draw."""
    def non_numbers(ref: str) -> list:
        other = space.space.get(ref)
        return [v for v in other.values if not _is_number(v)] if other is not None and other.type == "choice" else []

    for bound in (p.low, p.high):
        m = _REF.match(bound) if isinstance(bound, str) else None
        if m and non_numbers(m.group(1)):
            raise ConfigError(f"space key '{key}': bound refers to '{m.group(1)}', whose values include "
                              f"{non_numbers(m.group(1))[0]!r}, not a number")
    for ref, cond in (p.when or {}).items():
        op, _ = parse_condition(cond, f"space key '{key}': when '{ref}'")
        if op not in ("in", "==", "!=") and non_numbers(ref):
            raise ConfigError(f"space key '{key}': when '{ref}': condition {cond!r} orders values, but "
                              f"'{ref}' can be {non_numbers(ref)[0]!r}")


def check_repeats(space: SearchSpace, cfg: RunConfig) -> None:
    """Repeats run one after another inside the Tune trial: a worker-group trial cannot host them."""
    s = cfg.scaling
    if space.budget.repeats > 1 and not (s.num_workers == 1 and s.in_process):
        raise ConfigError(f"space '{space.name}': budget.repeats > 1 needs in-process one-worker trials "
                          f"(scaling.num_workers: 1, scaling.in_process: true)")


def _check_liveness_order(space: SearchSpace, key: str) -> None:
    """Whether a factor is read depends on other keys (`crosspt.config.liveness`): a factor among them must
    be sampled first, or `sample` could not tell whether this one acts."""
    from crosspt.config.liveness import LIVENESS

    rule, order = LIVENESS.get(key), list(space.space)
    for dep in rule.depends if rule else ():
        if dep in space.space and order.index(dep) > order.index(key):
            raise ConfigError(f"space key '{key}': whether it acts depends on '{dep}', which is sampled later "
                              f"(list '{dep}' before '{key}')")


def dead_factor_error(space: SearchSpace, key: str, family: str | None, when_held: bool) -> str:
    """The one line refusing factor `key`, which no sampled configuration reads (or whose `when:` never
    holds): a search that rates a no-op factor reports noise as a finding."""
    from crosspt.config.liveness import LIVENESS, why_dead

    if not when_held:
        reason = f"its when: {space.space[key].when} never holds"
    else:
        on_family = family and any(d.startswith("backbone.") for d in LIVENESS[key].depends)
        reason = f"it {why_dead(key)}" + (f"; this backbone is a {family}" if on_family else "")
    return (f"space '{space.name}': factor '{key}' is never read by any sampled configuration: {reason}; "
            f"remove it, or change what it depends on")


def validate_space(space: SearchSpace, n_random: int = 64) -> None:
    """Reject an impossible or malformed space before any trial starts (errors name the key)."""
    known = _schema_keys()
    for key, p in space.space.items():
        if key not in known:
            raise ConfigError(f"space '{space.name}': unknown config key '{key}'")
        order = list(space.space)
        for ref in list((p.when or {}).keys()) + [b for b in (p.low, p.high) if isinstance(b, str)]:
            m = _REF.match(ref) if isinstance(ref, str) else None
            name = m.group(1) if m else ref
            if name in space.space and order.index(name) >= order.index(key):
                raise ConfigError(f"space key '{key}': refers to '{name}', which is sampled later "
                                  f"(list it before '{key}')")
            if name not in space.space and name not in known:
                raise ConfigError(f"space key '{key}': refers to unknown key '{name}'")
        _check_numeric_refs(space, key, p)
        _check_liveness_order(space, key)
    base = space.base_config()
    from crosspt.config.liveness import family_of

    family = family_of(base)
    samplers = [extremes_sampler("low"), extremes_sampler("high")] + \
        [random_sampler(space.search.seed + i) for i in range(n_random)]
    drawn, when_held = set(), set()
    for s in samplers:
        skipped: dict[str, str] = {}
        params = sample(space, s, family, skipped)
        drawn |= set(params)
        when_held |= set(params) | {k for k, why in skipped.items() if why == "dead"}
        try:
            cfg = space.config_for(params)
            check_repeats(space, cfg)
            problem = source_bank_problem(cfg)
            if problem:
                raise ConfigError(f"space '{space.name}': {problem}")
        except ConfigError as e:
            raise ConfigError(f"{e} — sampled with {params}") from None
    for key in space.space:
        if key not in drawn:
            raise ConfigError(dead_factor_error(space, key, family, key in when_held))
    for i, point in enumerate(space.search.points):
        unknown = [k for k in point if k not in space.space]
        if unknown:
            raise ConfigError(f"space '{space.name}': search.points[{i}] sets '{unknown[0]}', which is not a "
                              f"key of the space")
        space.config_for(point)


def load_space(path: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """Read, override (`--set base.tasks=[rte]`, `--set budget.num_samples=4`) and validate a space."""
    tree = read_yaml(path)
    apply_overrides(tree, overrides)
    try:
        space = SearchSpace.model_validate(tree)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: '{key}': {msg}" if key else f"{path}: {msg}") from None
    validate_space(space)
    return space

"""What a run reads before it trains: its tasks' k-shot splits and the source prompts of its bank."""
from __future__ import annotations

import torch

from crosspt.config.schema import RANDOM_BANK, RunConfig, source_bank_problem
from crosspt.errors import ConfigError
from crosspt.run.artifacts import load_bank, select_sources
from crosspt.tasks.data import make_splits, resolve_data_dir
from crosspt.tasks.specs import register_task_file, resolve_tasks

_prepared = 0         # k-shot draws from task files in this process (`data_preparations`)


def data_preparations() -> int:
    """How many times this process has read task files to draw k-shot splits (`prepare_data` without
    `splits`): a trial reads them once, or not at all when it is handed its splits."""
    return _prepared


def prepare_data(cfg: RunConfig, splits: dict | None = None):
    """Task specs and k-shot splits `{task: {"train"|"val"|"test"[|"assess"]: [Example]}}`: deterministic from
    cfg.seed, identical on every worker ("assess" with `data.assess_rows`: the same rows for every seed).

    `splits`: the same dict computed before (`prepare_data(cfg)[1]`, e.g. memoised by a caller that
    runs many configs over one k-shot sample); taken as is once it is checked to cover cfg's tasks."""
    for f in cfg.data.task_files:
        register_task_file(f)
    tasks = resolve_tasks(cfg.tasks)
    if splits is not None:
        if set(splits) != {t.name for t in tasks}:
            raise ConfigError(f"precomputed splits cover tasks {sorted(splits)}, the config trains {cfg.tasks}")
        return tasks, splits
    global _prepared
    _prepared += 1
    data_dir = resolve_data_dir(cfg.data.data_dir)
    splits = {t.name: make_splits(t, data_dir, shots=cfg.data.shots, per=cfg.data.shots_per,
                                  val_shots=cfg.data.val_shots, seed=cfg.seed, max_test=cfg.data.max_test,
                                  pool=cfg.data.train_pool, assess_rows=cfg.data.assess_rows)
              for t in tasks}
    return tasks, splits


def load_source_bank(cfg: RunConfig, dim: int, tasks) -> torch.Tensor | None:
    """The source prompts `[n_sources, L_s, d]` this run composes from (selected from the bank by the
    configured rule, the targets' own sources left out unless `prompt.include_own_source`); None for
    no sources or a random (untrained) bank."""
    if cfg.prompt.n_sources == 0:
        return None
    problem = source_bank_problem(cfg)
    if problem:
        raise ConfigError(problem)
    if cfg.prompt.source_bank == RANDOM_BANK:
        return None                      # untrained random sources: the explicit ablation
    bank, meta = _read_bank(cfg, dim)
    targets = [t.name for t in tasks]
    chosen, _ = select_sources(bank, meta, cfg.prompt.n_sources, rule=cfg.prompt.source_selection,
                               target_tasks=targets, exclude=None if cfg.prompt.include_own_source else targets)
    return chosen


def load_own_sources(cfg: RunConfig, dim: int, tasks) -> torch.Tensor | None:
    """Each task's own source prompt from the bank `[n_tasks, L_s, d]` (for `prompt.init: own_source`;
    None for any other init). ConfigError naming the tasks the bank has no prompt for."""
    if cfg.prompt.init != "own_source":
        return None
    bank, meta = _read_bank(cfg, dim)
    names = list(meta["tasks"])
    missing = [t.name for t in tasks if t.name not in names]
    if missing:
        raise ConfigError(f"prompt.init is 'own_source' but the bank {cfg.prompt.source_bank} has no source "
                          f"prompt for {', '.join(missing)} (it has {', '.join(names)})")
    return torch.stack([bank[names.index(t.name)] for t in tasks])


def _read_bank(cfg: RunConfig, dim: int) -> tuple[torch.Tensor, dict]:
    return load_bank(cfg.prompt.source_bank, backbone=cfg.backbone.name, dim=dim, source_len=cfg.prompt.source_len)
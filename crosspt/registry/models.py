"""The MLflow model registry side of crosspt: source-prompt banks and promoted models.

Two kinds of registered model, told apart by the registered-model tag `crosspt.kind`:

* **source banks** (`source-bank`): a version's files are the run artifact folder `bank/` holding
  `sources.safetensors` (`crosspt.artifacts.save_bank`). Written by `crosspt pretrain-sources`, which moves
  the alias `current` to each new version (MLflow reserves the alias name `latest`: it is refused by the
  registry; `models:/NAME/latest` still names the newest version). Searches name a bank as
  `models:/glue-sources@current`; `resolve_bank` turns that into a local file.
* **models** (`model`): an MLflow pyfunc (`crosspt.pyfunc_model.CrossPTPyfunc`) whose artifact `bundle`
  holds everything needed to predict without the search (see `crosspt.pyfunc_model`). Written by
  `promote`, one version per source run (version tag `source_run_id`), never moving an alias that
  points to another version unless forced.

MLflow is imported lazily, inside the functions: resolving a plain bank path needs no MLflow.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from crosspt.errors import ArtifactError, CrossPTError

KIND_TAG = "crosspt.kind"
KIND_BANK = "source-bank"
KIND_MODEL = "model"
SOURCE_RUN_TAG = "source_run_id"
CONFIG_HASH_TAG = "config_hash"
BANK_DIR = "bank"                   # run artifact folder registered as a bank version
BANK_FILE = "sources.safetensors"
MODEL_ARTIFACT = "model"            # name of the logged pyfunc model
DEFAULT_BANK_ALIAS = "current"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))?/?$")


class RegistryError(CrossPTError):
    """A registered model, version, alias or source run is missing, or an operation would be unsafe."""


# ---- small helpers -----------------------------------------------------------------------------------
def tracking_uri_of(uri: str | None) -> str:
    from crosspt.registry.store import resolve_tracking_uri

    return resolve_tracking_uri(uri)


def _client(uri: str):
    from mlflow import MlflowClient

    from crosspt.registry.store import prepare_store

    prepare_store(uri)              # a new sqlite store is created once, under its lock
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def mlflow_uris(uri: str):
    """Point MLflow's global tracking and registry URIs at `uri` for the block, then restore them.

    Some MLflow calls (pyfunc.log_model, register_model, models:/ downloads) read the global URIs only."""
    import mlflow

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        # public setters only: the setters keep the env vars in step with the URIs they set, so the env
        # vars as they were say what to go back to (None: unset, MLflow's defaults apply again)
        mlflow.set_tracking_uri(saved_env["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved_env["MLFLOW_REGISTRY_URI"])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(e).lower()


def cache_dir() -> Path:
    """Where downloaded banks/models are kept: $CROSSPT_CACHE_DIR, else ~/.cache/crosspt."""
    from crosspt.run.shipping import cache_root

    return cache_root()


def is_model_uri(ref: str | None) -> bool:
    return isinstance(ref, str) and ref.startswith("models:/")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@alias` | `models:/NAME/<version>` | `models:/NAME/latest` -> (name, alias, version)."""
    m = _MODEL_URI.match(uri.strip())
    if not m:
        raise RegistryError(f"'{uri}' is not a registered-model URI (models:/NAME@alias or models:/NAME/VERSION)")
    name, alias, version = m.group("name"), m.group("alias"), m.group("version")
    if alias is None and version is None:
        raise RegistryError(f"'{uri}' names no version: use models:/{name}@ALIAS or models:/{name}/VERSION")
    return name, alias, version


def get_registered(c, name: str, uri: str):
    """The registered model or a RegistryError that lists what the registry holds."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_registered_model(name)
    except MlflowException as e:
        if not _not_found(e):
            raise
    known = sorted(m.name for m in c.search_registered_models(max_results=50))
    raise RegistryError(f"no registered model '{name}' in {uri}"
                        + (f" (registered: {', '.join(known)})" if known else " (the registry is empty)"))


def get_version(c, model_uri: str, uri: str):
    """The ModelVersion a models:/ URI names, or one clear RegistryError."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(model_uri)
    rm = get_registered(c, name, uri)
    if alias is not None:
        try:
            return c.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            if not _not_found(e) and getattr(e, "error_code", "") != "INVALID_PARAMETER_VALUE":
                raise
        have = ", ".join(f"@{a} -> v{v}" for a, v in sorted(dict(rm.aliases or {}).items())) or "none"
        raise RegistryError(f"registered model '{name}' has no alias '{alias}' (aliases: {have})")
    versions = [v for v in c.search_model_versions(f"name='{name}'")]
    if version == "latest":
        if not versions:
            raise RegistryError(f"registered model '{name}' has no versions")
        return max(versions, key=lambda v: int(v.version))
    if not str(version).isdigit():
        raise RegistryError(f"'{model_uri}': version must be a number, 'latest' or @alias")
    try:
        return c.get_model_version(name, str(version))
    except MlflowException as e:
        if not _not_found(e):
            raise
        have = ", ".join(sorted((v.version for v in versions), key=int)) or "none"
        raise RegistryError(f"registered model '{name}' has no version {version} (versions: {have})") from None


def _kind(rm) -> str | None:
    return (rm.tags or {}).get(KIND_TAG)


def _download_version(c, mv, uri: str, dest: Path) -> Path:
    """Download a model version's files into `dest` (kept as a cache: reused when complete)."""
    import mlflow

    done = dest / ".complete"
    if done.is_file():
        return dest / "files"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with mlflow_uris(uri):
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                    dst_path=str(dest / "files"), tracking_uri=uri)
    local = Path(local)
    if local != dest / "files":      # a single-file source comes back as the file itself
        (dest / "files").mkdir(exist_ok=True)
        if local.is_file() and local.parent != dest / "files":
            shutil.move(str(local), dest / "files" / local.name)
    done.write_text(json.dumps({"name": mv.name, "version": mv.version, "source": mv.source}))
    return dest / "files"


def _cache_key(uri: str, mv) -> str:
    return hashlib.sha256(f"{uri}|{mv.name}|{mv.version}|{mv.source}|{mv.run_id}".encode()).hexdigest()[:16]


# ---- source banks -----------------------------------------------------------------------------------
def resolve_bank(uri_or_path: str, tracking_uri: str | None = None, *, dest_dir: str | Path | None = None) -> str:
    """A source-prompt bank reference -> a local safetensors path.

    `models:/NAME@alias` / `models:/NAME/VERSION` / `models:/NAME/latest`: the registered bank version's
    file, downloaded once into `dest_dir` (default: the crosspt cache, `$CROSSPT_CACHE_DIR`); a plain
    path: the path itself (absolute). The file is checked to be a crosspt source-prompt bank."""
    from crosspt.run.artifacts import load_bank

    if not is_model_uri(uri_or_path):
        path = Path(str(uri_or_path)).expanduser().resolve()
        if not path.is_file():
            raise ArtifactError(f"source bank not found: {path}")
        return str(path)
    uri = tracking_uri_of(tracking_uri)
    c = _client(uri)
    mv = get_version(c, uri_or_path, uri)
    rm = c.get_registered_model(mv.name)
    kind = (mv.tags or {}).get(KIND_TAG) or _kind(rm)
    if kind not in (None, KIND_BANK):
        raise RegistryError(f"'{uri_or_path}' is a crosspt {kind}, not a source-prompt bank")
    root = Path(dest_dir).expanduser().resolve() if dest_dir else cache_dir() / "banks"
    files = _download_version(c, mv, uri, root / f"{mv.name}-v{mv.version}-{_cache_key(uri, mv)}")
    found = sorted(files.rglob("*.safetensors"))
    if not found:
        raise RegistryError(f"'{uri_or_path}' (version {mv.version}) holds no safetensors bank file")
    path = next((p for p in found if p.name == BANK_FILE), found[0])
    load_bank(path)                  # refuses a file that is not a bank
    return str(path)


def resolve_space_banks(space, tracking_uri: str | None, dest_dir: str | Path | None = None):
    """A search space whose `prompt.source_bank` values (base and choices) that are models:/ URIs are
    replaced by local files, resolved once in the driver (put `dest_dir` on storage the trials see)."""
    base_bank = ((space.base or {}).get("prompt") or {}).get("source_bank")
    choice = space.space.get("prompt.source_bank")
    values = list(choice.values or []) if choice is not None else []
    if not is_model_uri(base_bank) and not any(is_model_uri(v) for v in values):
        return space
    space = space.model_copy(deep=True)
    if is_model_uri(base_bank):
        space.base["prompt"]["source_bank"] = resolve_bank(base_bank, tracking_uri, dest_dir=dest_dir)
    if choice is not None and any(is_model_uri(v) for v in values):
        space.space["prompt.source_bank"].values = [resolve_bank(v, tracking_uri, dest_dir=dest_dir)
                                                    if is_model_uri(v) else v for v in values]
    return space


def register_bank(tracking_uri: str, run_id: str, model_name: str, *, alias: str = DEFAULT_BANK_ALIAS,
                  tags: dict[str, str] | None = None, description: str | None = None):
    """Register the run's `bank/` artifact folder as a new version of `model_name` and point `alias`
    at it. Refuses a registered model that holds crosspt predictors."""
    from mlflow.exceptions import MlflowException

    c = _client(tracking_uri)
    _check_alias_name(alias)
    try:
        rm = c.get_registered_model(model_name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        rm = c.create_registered_model(model_name, tags={KIND_TAG: KIND_BANK},
                                       description="crosspt source-prompt banks (crosspt pretrain-sources)")
    if _kind(rm) not in (None, KIND_BANK):
        raise RegistryError(f"registered model '{model_name}' holds crosspt {_kind(rm)}s, not source banks: "
                            f"choose another --model-name")
    run = c.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{BANK_DIR}"
    mv = c.create_model_version(model_name, source=source, run_id=run_id,
                                tags={KIND_TAG: KIND_BANK, **(tags or {})}, description=description)
    c.set_registered_model_alias(model_name, alias, mv.version)
    return mv


def _check_alias_name(alias: str) -> None:
    if not alias or alias.lower() == "latest" or re.fullmatch(r"v\d+", alias, flags=re.I):
        raise RegistryError(f"alias '{alias}' is reserved by MLflow (latest, v<N>): use e.g. 'current' or 'champion'")


# ---- promoted models ----------------------------------------------------------------------------------
def fetch_model(model_ref: str, tracking_uri: str | None = None, *, dest_dir: str | Path | None = None
                ) -> tuple[Path, dict]:
    """A model reference -> (local bundle folder, info). `models:/...` are downloaded (cached per
    version); a local folder (bundle, or MLflow model folder holding one) is used as is."""
    from crosspt.registry.pyfunc import find_bundle

    if not is_model_uri(model_ref):
        p = Path(str(model_ref)).expanduser()
        if not p.exists():
            raise RegistryError(f"model '{model_ref}' is neither a models:/ URI nor an existing folder")
        return find_bundle(p), {"model": str(p)}
    uri = tracking_uri_of(tracking_uri)
    c = _client(uri)
    mv = get_version(c, model_ref, uri)
    rm = c.get_registered_model(mv.name)
    kind = (mv.tags or {}).get(KIND_TAG) or _kind(rm)
    if kind == KIND_BANK:
        raise RegistryError(f"'{model_ref}' is a source-prompt bank, not a model to predict with")
    root = Path(dest_dir).expanduser().resolve() if dest_dir else cache_dir() / "models"
    files = _download_version(c, mv, uri, root / f"{mv.name}-v{mv.version}-{_cache_key(uri, mv)}")
    info = {"model": model_ref, "name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
            "source_run_id": (mv.tags or {}).get(SOURCE_RUN_TAG), "tracking_uri": uri}
    return find_bundle(files), info


def load_predictor(model_ref: str, tracking_uri: str | None = None, *, device: str | None = None,
                   tasks: list[str] | None = None):
    """The CrossPTPredictor of a registered model (`models:/NAME@alias`) or a local model folder.

    `tasks`: names the caller will use; a task the model was not trained on fails before any weights load."""
    from crosspt.registry.pyfunc import CrossPTPredictor, match_task, stored_tasks

    bundle, info = fetch_model(model_ref, tracking_uri)
    if tasks:
        have = stored_tasks(bundle)
        for name in tasks:
            match_task(have, name)
    predictor = CrossPTPredictor(bundle, device=device)
    predictor.info = info
    return predictor


def _pick_run(c, uri: str, *, experiment: str | None, metric: str, mode: str, run_id: str | None,
              parent_run_id: str | None, all_searches: bool = False):
    """The run to promote: `run_id`; else the best FINISHED, unpruned child run of one search: the parent
    run `parent_run_id`, or the experiment's latest search (as `crosspt report` reads it). Runs of other
    searches (other tasks, shots, splits) are not comparable with these; `all_searches` compares every
    search's runs in the experiment anyway."""
    from mlflow.exceptions import MlflowException

    from crosspt.registry.best_run import best_finished_child
    from crosspt.registry.experiments import SEARCH_TAG, latest_search

    if run_id:
        try:
            return c.get_run(run_id)
        except MlflowException as e:
            if not _not_found(e):
                raise
            raise RegistryError(f"no run '{run_id}' in {uri}") from None
    if not experiment:
        raise RegistryError("give --experiment (to pick the best child run of its latest search) or --run-id")
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in c.search_experiments(max_results=50))
        raise RegistryError(f"no experiment '{experiment}' in {uri}"
                            + (f" (experiments: {', '.join(known)})" if known else ""))
    if parent_run_id is None and not all_searches:
        latest = latest_search(c, exp.experiment_id)
        if latest is None:
            raise RegistryError(f"experiment '{experiment}' holds no search (no run tagged {SEARCH_TAG}): "
                                f"name the run with --run-id")
        parent_run_id = latest.info.run_id
    best = best_finished_child(c, exp.experiment_id, metric, mode, parent_run_id)
    if best is None:
        where = f"search {parent_run_id}" if parent_run_id else f"experiment '{experiment}'"
        raise RegistryError(f"{where} has no FINISHED child run with metric '{metric}' (stopped and failed "
                            f"trials never count)")
    return best


_REPEAT_SUFFIX = re.compile(r"_r(\d+)$")


def repeat_metric(metric: str, i: int) -> str:
    """The child-run metric holding repeat `i`'s own value of `metric` (`best_val_score_r0`, ...), logged beside
    the mean; one name for the trainable that logs it and the report and the registry that read it."""
    return f"{metric}_r{i}"


def repeat_of(name: str) -> tuple[str, int] | None:
    """(metric, repeat) of a name `repeat_metric` made; None for any other metric name."""
    m = _REPEAT_SUFFIX.search(name)
    return (name[:m.start()], int(m.group(1))) if m else None


def repeats_of(run, metric: str) -> int:
    """How many k-shot repeats (`budget.repeats`) the run trained: its `repeat_metric` metrics (1 without
    repeats)."""
    repeats = [i for name, i in filter(None, map(repeat_of, run.data.metrics)) if name in (metric, "best_val_score")]
    return 1 + max(repeats, default=0)


def promoted_value(run, metric: str) -> tuple[float | None, float | None, int]:
    """(the value the promoted version holds, the value the search selected it by, repeats).

    A trial with `budget.repeats` R reports the mean over its R k-shot samples, but its prompts (what a
    bundle holds) are repeat 0's, trained with the trial's own seed: the version is tagged with repeat 0's
    own value (`<metric>_r0`) and the mean beside it. A metric logged only as a mean cannot be said of
    repeat 0's prompts: refused."""
    mean = run.data.metrics.get(metric)
    repeats = repeats_of(run, metric)
    if repeats == 1:
        return mean, mean, 1
    own = run.data.metrics.get(f"{metric}_r0")
    if own is None:
        raise RegistryError(f"run {run.info.run_id} trained {repeats} repeats and logs '{metric}' only as their "
                            f"mean; the model would hold repeat 0's prompts: rank by a metric logged per repeat "
                            f"(best_val_score, val_score, test_score or the search's objective)")
    return own, mean, repeats


def _run_files(c, run) -> dict[str, bool]:
    names = {a.path for a in c.list_artifacts(run.info.run_id)}
    prompts = {a.path for a in c.list_artifacts(run.info.run_id, "prompts")} if "prompts" in names else set()
    return {"prompts": "prompts/prompts.safetensors" in prompts, "config": "config.yaml" in names,
            "result": "result.json" in names}


def promote(*, model_name: str, alias: str = "champion", experiment: str | None = None,
            metric: str = "best_val_score", mode: str = "max", run_id: str | None = None,
            parent_run_id: str | None = None, tracking_uri: str | None = None, force: bool = False,
            all_searches: bool = False) -> dict:
    """Register the best FINISHED child run of a search (the experiment's latest, or `parent_run_id`; every
    search in it with `all_searches`), or `run_id`, as a version of `model_name` and point `alias` at it.

    The version is tagged with what it holds: the run's prompts, so with `budget.repeats` repeat 0's value
    of `metric` (`promoted_value`), the mean the search selected by beside it. Idempotent: a run already
    registered (version tag `source_run_id`) gets no second version. Safe: when `alias` points to a
    different version, nothing changes unless `force`. Every check runs before anything is written, so a
    refused promotion leaves the registry as it was."""
    from crosspt.config.schema import config_hash
    from crosspt.registry.pyfunc import read_manifest

    if mode not in ("max", "min"):
        raise RegistryError(f"mode must be 'max' or 'min', got '{mode}'")
    _check_alias_name(alias)
    uri = tracking_uri_of(tracking_uri)
    c = _client(uri)
    run = _pick_run(c, uri, experiment=experiment, metric=metric, mode=mode, run_id=run_id,
                    parent_run_id=parent_run_id, all_searches=all_searches)
    rid = run.info.run_id
    has_result = _check_promotable(c, run)
    value, selected_by, repeats = promoted_value(run, metric)
    rm = _model_registered_as(c, model_name)
    existing, current = _version_of_run_and_alias(c, rm, model_name, alias, rid, force)
    target = str(existing.version) if existing else None
    result = {"model_name": model_name, "alias": alias, "run_id": rid, "run_name": run.info.run_name,
              "parent_run_id": run.data.tags.get("mlflow.parentRunId"), "metric": metric, "value": value,
              "moved_alias_from": current if current != target else None,
              "tracking_uri": uri, "model_uri": f"models:/{model_name}@{alias}"}
    if repeats > 1:
        result.update(repeats=repeats, selected_by_mean=selected_by)
    if existing is not None:
        if current != target:
            c.set_registered_model_alias(model_name, alias, target)
        return {**result, "version": target, "created": False}
    # every check has passed: from here on the promotion writes
    with tempfile.TemporaryDirectory(prefix="crosspt_promote_") as tmp:
        source = {"tracking_uri": uri, "run_id": rid, "run_name": run.info.run_name,
                  "experiment_id": run.info.experiment_id,
                  "parent_run_id": run.data.tags.get("mlflow.parentRunId"), "selected_by": metric, "mode": mode,
                  **({"repeats": repeats, "repeat": 0, f"{metric}_mean": selected_by} if repeats > 1 else {})}
        cfg, bundle = _write_run_bundle(c, run, Path(tmp), source, has_result)
        chash = config_hash(cfg)
        model_uri, promotion_run_id = _log_promotion_run(c, uri, run, bundle, chash, model_name, cfg)
        tags = {KIND_TAG: KIND_MODEL, SOURCE_RUN_TAG: rid, CONFIG_HASH_TAG: chash,
                "backbone": cfg.backbone.name, "tasks": ",".join(cfg.tasks), f"metric.{metric}": str(value)}
        revision = read_manifest(bundle)["backbone"].get("revision")
        if revision:
            tags["backbone_revision"] = revision
        what = f"{metric}={value}"
        if repeats > 1:
            tags.update({f"metric.{metric}.mean_over_repeats": str(selected_by), "repeats": str(repeats),
                         "holds_repeat": "0"})
            what = f"{metric}={value} (repeat 0, whose prompts it holds; mean over {repeats} repeats {selected_by})"
        version = _register_version(c, uri, rm, model_name, model_uri, tags,
                                    description=f"run {rid} ({run.info.run_name}), {what}, config {chash}")
        c.set_registered_model_alias(model_name, alias, version)
    return {**result, "version": version, "created": True, "promotion_run_id": promotion_run_id}


def _check_promotable(c, run) -> bool:
    """Refuses a run without the artifacts a model is built from; whether it has a `result.json`."""
    rid = run.info.run_id
    files = _run_files(c, run)
    if not files["prompts"]:
        raise RegistryError(f"run {rid} ({run.info.run_name}) has no prompt artifact prompts/prompts.safetensors: "
                            f"nothing to promote")
    if not files["config"]:
        raise RegistryError(f"run {rid} ({run.info.run_name}) has no config.yaml artifact: cannot rebuild its model")
    return files["result"]


def _model_registered_as(c, model_name: str):
    """The registered model `model_name` (None when there is none yet); refuses one holding banks."""
    from mlflow.exceptions import MlflowException

    try:
        rm = c.get_registered_model(model_name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        return None
    if _kind(rm) not in (None, KIND_MODEL):
        raise RegistryError(f"registered model '{model_name}' holds crosspt {_kind(rm)}s: choose another --model-name")
    return rm


def _version_of_run_and_alias(c, rm, model_name: str, alias: str, rid: str, force: bool):
    """(the version already registered from run `rid` or None, the version `alias` points to or None).
    Refuses to move an alias that points to another version, unless `force`."""
    versions = list(c.search_model_versions(f"name='{model_name}'")) if rm is not None else []
    existing = next((v for v in sorted(versions, key=lambda v: int(v.version))
                     if (v.tags or {}).get(SOURCE_RUN_TAG) == rid), None)
    current = str((rm.aliases or {}).get(alias)) if rm is not None and alias in (rm.aliases or {}) else None
    target = str(existing.version) if existing else None
    if current is not None and current != target and not force:
        holder = next((v for v in versions if str(v.version) == current), None)
        held = (holder.tags or {}).get(SOURCE_RUN_TAG) if holder else None
        raise RegistryError(f"alias '{alias}' of '{model_name}' points to version {current}"
                            + (f" (run {held})" if held else "")
                            + f"; promoting run {rid} would move it: pass --force to move it")
    return existing, current


def _write_run_bundle(c, run, tmp: Path, source: dict, has_result: bool):
    """(the run's config, the model bundle folder written under `tmp` from the run's artifacts)."""
    import yaml

    from crosspt.config.schema import build_config, upgrade_stored_tree
    from crosspt.registry.pyfunc import BUNDLE_ARTIFACT, write_bundle

    rid = run.info.run_id
    prompts = Path(c.download_artifacts(rid, "prompts/prompts.safetensors", str(tmp)))
    cfg_path = Path(c.download_artifacts(rid, "config.yaml", str(tmp)))
    result_path = Path(c.download_artifacts(rid, "result.json", str(tmp))) if has_result else None
    try:
        tree = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as e:
        raise RegistryError(f"run {rid}: config.yaml is not valid YAML ({e})") from None
    cfg = build_config(upgrade_stored_tree(tree), f"run {rid} config.yaml")
    bundle = write_bundle(tmp / BUNDLE_ARTIFACT, config=cfg, prompts_path=prompts, source=source,
                          metrics=dict(run.data.metrics), result_path=result_path,
                          backbone_revision=_run_backbone_revision(run, cfg))
    return cfg, bundle


def _run_backbone_revision(run, cfg) -> dict:
    """The backbone revision the run recorded when it started (`crosspt.backbone.revision`); for a run
    from before runs recorded one, the revision the backbone resolves to now, marked as such."""
    from crosspt.registry.revision import backbone_revision
    from crosspt.registry.provenance import BACKBONE_REVISION_TAG

    recorded = run.data.tags.get(BACKBONE_REVISION_TAG)
    if recorded:
        return {"revision": recorded, "revision_recorded": "at training"}
    now = backbone_revision(cfg.backbone.name)
    return {"revision": now, "revision_recorded": "at promotion"} if now else {}


def _log_promotion_run(c, uri: str, run, bundle: Path, chash: str, model_name: str, cfg) -> tuple[str, str]:
    """Log the bundle as an MLflow pyfunc model in a new promotion run next to the source run (its
    params and metrics copied); (the logged model's URI, the promotion run's id).

    The crosspt package travels with the model as `code_paths` (MLflow puts it on `sys.path` when it
    loads the model), and the requirements name only what pip can install: `mlflow models serve
    --env-manager virtualenv` builds the environment from them."""
    import mlflow
    from importlib.util import find_spec

    from crosspt.registry.pyfunc import BUNDLE_ARTIFACT, model_signature, package_code, pip_requirements
    from crosspt.registry.run_log import log_metrics, log_params

    rid = run.info.run_id
    with mlflow_uris(uri):
        with mlflow.start_run(experiment_id=run.info.experiment_id,
                              run_name=f"promote-{run.info.run_name or rid[:8]}",
                              tags={"crosspt.promotion_of": rid, KIND_TAG: "promotion",
                                    "crosspt.registered_model": model_name}) as prun:
            log_params(c, prun.info.run_id, {**run.data.params, "promote.source_run_id": rid})
            log_metrics(c, prun.info.run_id, dict(run.data.metrics))
            with warnings.catch_warnings():       # "no input example": loading the backbone to
                warnings.simplefilter("ignore", UserWarning)   # validate one is not worth it here
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT, python_model=find_spec("crosspt.registry.pyfunc_entry").origin,   # code, not pickle
                    artifacts={BUNDLE_ARTIFACT: str(bundle)}, pip_requirements=pip_requirements(cfg),
                    code_paths=[str(package_code(bundle.parent / "code"))],
                    signature=model_signature(), metadata={"crosspt_bundle": BUNDLE_ARTIFACT,
                                                           CONFIG_HASH_TAG: chash, SOURCE_RUN_TAG: rid})
    return info.model_uri, prun.info.run_id


def _register_version(c, uri: str, rm, model_name: str, model_uri: str, tags: dict[str, str],
                      description: str) -> str:
    """Register the logged model as a new version of `model_name` (created, or tagged as crosspt
    models, when needed); returns the version."""
    import mlflow

    with mlflow_uris(uri):
        if rm is None:
            c.create_registered_model(model_name, tags={KIND_TAG: KIND_MODEL},
                                      description="crosspt models (crosspt promote)")
        elif _kind(rm) is None:
            c.set_registered_model_tag(model_name, KIND_TAG, KIND_MODEL)
        mv = mlflow.register_model(model_uri, model_name, tags=tags)
    c.update_model_version(model_name, mv.version, description=description)
    return str(mv.version)


def count_versions(tracking_uri: str, model_name: str) -> int:
    """Number of versions of a registered model (0 when it does not exist)."""
    c = _client(tracking_uri_of(tracking_uri))
    # an unknown name has no versions (an empty answer, not an error); a store that fails is the caller's error
    return len(list(c.search_model_versions(f"name='{model_name}'")))


def describe(result: dict[str, Any]) -> str:
    """One line for the CLI."""
    what = "registered" if result.get("created") else "already registered as"
    moved = f" (alias moved from version {result['moved_alias_from']})" if result.get("moved_alias_from") else ""
    value = f"{result['metric']}={result['value']}"
    if result.get("repeats"):
        value += f" of repeat 0, whose prompts it holds; mean over {result['repeats']} repeats {result['selected_by_mean']}"
    search = f" of search {result['parent_run_id']}" if result.get("parent_run_id") else ""
    return (f"{what} {result['model_name']} version {result['version']} from run {result['run_id']}{search} "
            f"({value}); {result['model_uri']} -> version {result['version']}{moved}")

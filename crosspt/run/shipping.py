"""What a search's trials read (their k-shot splits, task files, source-prompt banks) travels with the search
instead of assuming a shared disk.

A trial's k-shot splits are a pure function of a few config keys (`split_key`) and the task files, so the
driver draws them once per key (`draw_splits`) and ships the examples, not the files: a trial then reads
no task file at all (each read of SST-2's train file is a parse of 67k rows; QQP's and MNLI's files are
40-80 MB). The task files themselves travel only for a search whose space varies those keys.

Why: on a cluster the driver reads `--data-dir` and downloads `models:/` banks to its own disk, and a worker
node has neither path. The driver packs the files once (`pack_search_inputs`, a few MB of TSV/JSONL for
few-shot GLUE tasks and KB-sized banks), puts them in Ray's object store, and a trial (or Train worker)
whose node lacks a path writes them to a node-local cache (`localise`) and reads them from there. A node
that sees the same paths (one machine, an NFS mount) uses them as they are and never fetches the bytes.

The cache is content-addressed (`<cache>/shipped/<sha256 of the contents>/`) and written through a
temporary folder renamed into place, so concurrent trials on one node neither clash nor read half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

DATA, BANKS, SPLITS = "data", "banks", "splits"
SPLITS_REF = "splits_ref"


def split_key(cfg) -> str:
    """What a config's k-shot splits depend on besides the task files (`crosspt.run.inputs.prepare_data`)."""
    d = cfg.data
    return json.dumps({"tasks": list(cfg.tasks), "seed": cfg.seed, "shots": d.shots, "per": str(d.shots_per),
                       "val_shots": d.val_shots, "max_test": d.max_test, "task_files": list(d.task_files),
                       "pool": str(d.train_pool), "assess_rows": d.assess_rows},
                      sort_keys=True)


def draw_splits(cfgs) -> dict[str, dict]:
    """`{split_key: splits}` for configs (`(cfg, splits or None)` pairs: splits drawn already are kept), each
    key drawn once."""
    from crosspt.run.inputs import prepare_data

    out: dict[str, dict] = {}
    for cfg, splits in cfgs:
        key = split_key(cfg)
        if key not in out:
            out[key] = splits if splits is not None else prepare_data(cfg)[1]
    return out


def shipped_splits(cfg, shipped: dict | None) -> dict | None:
    """The k-shot splits the driver drew for `cfg` (`draw_splits`), fetched from the object store; None when
    it shipped none for its key (the run draws its own)."""
    key = split_key(cfg)
    if not shipped or key not in shipped.get(SPLITS, ()):
        return None
    import ray

    return ray.get(shipped[SPLITS_REF])[key]


def cache_root() -> Path:
    """Node-local cache for downloaded and shipped files: $CROSSPT_CACHE_DIR, else ~/.cache/crosspt."""
    return Path(os.environ.get("CROSSPT_CACHE_DIR") or Path.home() / ".cache" / "crosspt").expanduser()


def pack_search_inputs(task_files: list[Path], data_dir: str | None, banks: list[str]) -> dict:
    """`{"data": {path relative to data_dir: bytes}, "banks": {driver path: bytes}}` for the files given."""
    data = {}
    if data_dir:
        root = Path(data_dir)
        data = {str(f.relative_to(root)): f.read_bytes() for f in task_files if f.is_relative_to(root)}
    return {DATA: data, BANKS: {b: Path(b).read_bytes() for b in banks if Path(b).is_file()}}


def materialise(files: dict[str, bytes]) -> Path:
    """Write `{relative path: bytes}` under the node's cache once; returns the folder that holds them."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    dest = cache_root() / "shipped" / digest.hexdigest()[:24]
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".incoming-"))
    for rel, blob in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(blob)
    try:
        tmp.rename(dest)
    except OSError:                 # another trial on this node got there first: same contents
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def manifest(packed: dict, ref, splits: dict | None = None, splits_ref=None) -> dict:
    """What travels in every trial's context: the object refs and the names of what they hold (plain lists,
    so a node checks what it lacks without fetching any bytes): the files (`packed`, in `ref`) and the
    drawn k-shot splits by key (`splits`, in `splits_ref`)."""
    return {"ref": ref, DATA: sorted(packed[DATA]), BANKS: sorted(packed[BANKS]), SPLITS: sorted(splits or {}),
            SPLITS_REF: splits_ref}


def missing_here(cfg, shipped: dict | None) -> tuple[bool, bool]:
    """(a shipped data file is missing under the config's data folder on this node, the config's source
    bank is a shipped file missing on this node)."""
    if not shipped:
        return False, False
    data_dir, bank = cfg.data.data_dir, cfg.prompt.source_bank
    need_data = bool(data_dir) and any(not (Path(data_dir) / rel).is_file() for rel in shipped[DATA])
    need_bank = bank in shipped[BANKS] and not Path(bank).is_file()
    return need_data, need_bank


def localise(cfg, shipped: dict | None):
    """`cfg` with its data folder and source bank pointing at node-local copies where this node lacks
    them (fetched from the object store only then); the same object where nothing is missing."""
    need_data, need_bank = missing_here(cfg, shipped)
    if not (need_data or need_bank):
        return cfg
    import ray

    blobs = ray.get(shipped["ref"])
    cfg = cfg.model_copy(deep=True)
    if need_data:
        cfg.data.data_dir = str(materialise(blobs[DATA]))
    if need_bank:
        name = Path(cfg.prompt.source_bank).name
        cfg.prompt.source_bank = str(materialise({name: blobs[BANKS][cfg.prompt.source_bank]}) / name)
    return cfg

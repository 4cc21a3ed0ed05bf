"""The MLflow store: its URI, whether it answers, its sqlite file and one client per call.

Everything goes through an explicit `MlflowClient` and run ids (no global "active run"), because
trials log from Ray actors in other processes.

A new sqlite store is created and migrated by the first client of a process (MLflow runs its alembic
migrations on first use); two processes that open a new store at once race through those migrations and
one dies (`CommandError: Online migration expected to match one row ...`). `client` therefore opens a
sqlite store once per process under a file lock beside it (`prepare_store`): the first process creates
and migrates, the others wait and find it ready. A server migrates its own store when it starts.
"""
from __future__ import annotations

import contextlib
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

from crosspt.errors import ConfigError


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit > $MLFLOW_TRACKING_URI > sqlite store `mlflow.db` in the working directory (absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            return f"sqlite:///{path.resolve()}"
    if "://" not in uri:
        raise ConfigError(f"tracking URI {uri!r}: use an absolute sqlite:///... path or an http(s):// server "
                          f"(MLflow 3 refuses the plain file store)")
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer fails the search before any trial starts."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status >= 400:
                raise ConfigError(f"MLflow tracking server at {uri} answered HTTP {r.status}")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"MLflow tracking server not reachable at {uri} ({reason})") from None


def check_store_reaches_nodes(uri: str, nodes: int, shared: bool = False) -> None:
    """Refuse a sqlite store for a search on a cluster of several nodes: trials log from the node they run
    on, and a trial on another node would open (and create) a sqlite file at that path on its own disk,
    so its runs would never reach this store. `shared`: the path is on storage every node mounts at the
    same place (`tracking.shared_store: true`), which makes it one file."""
    if sqlite_path(uri) is not None and nodes > 1 and not shared:
        raise ConfigError(f"tracking store {uri} is a sqlite file on this machine but the Ray cluster has "
                          f"{nodes} nodes: trials on the others would log to their own local file; use an MLflow "
                          f"server (--tracking-uri http://HOST:PORT), or set tracking.shared_store: true when "
                          f"every node mounts that path from shared storage")


def client(uri: str):
    from mlflow import MlflowClient

    prepare_store(uri)
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def file_lock(path: str | Path):
    """An exclusive `flock` on `path` (created) for the block: processes on this machine (and on a shared
    filesystem that supports flock) take turns."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None

_PREPARED: set[str] = set()
_PREPARING = threading.Lock()


def prepare_store(uri: str) -> None:
    """Create or migrate a sqlite tracking store (tracking and model-registry tables) once, under a file
    lock beside it, so that searches started at once on a new store do not race through MLflow's
    migrations; once per process (MLflow keeps one engine per URI). Other URIs pass through."""
    db = sqlite_path(uri)
    if db is None or uri in _PREPARED:
        return
    from mlflow import MlflowClient

    with _PREPARING, file_lock(db.with_name(db.name + ".lock")):
        if uri in _PREPARED:
            return
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)             # the tracking store: created or migrated here
        c.search_registered_models(max_results=1)       # the registry store on the same file
        _PREPARED.add(uri)


def artifact_root_for(uri: str) -> str | None:
    """Absolute artifact folder beside a sqlite store; a server picks its own (proxied) location."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None

"""Where one search keeps its state, and whether a new, resumed or overwritten search may claim it.

A search is identified by (MLflow experiment, space name): the same space under another experiment is
another search, with its own Tune folder and Optuna study. Its folder holds Tune's experiment state and
`crosspt_search.json` (the parent run id and the URIs), written as soon as the parent run exists, so a
driver killed from then on leaves a search that `--resume` can continue.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from crosspt.config.space import SearchSpace
from crosspt.errors import ConfigError, SearchStateError

STATE_FILE = "crosspt_search.json"


def is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(root: str):
    """`(pyarrow filesystem, path)` for a local folder or a storage URI."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(root) if is_uri(root) else (fs.LocalFileSystem(), root)


def tune_state_saved(root: str) -> bool:
    """Tune saved its experiment state (an `experiment_state-*.json`) under `root` at least once."""
    from pyarrow import fs

    fsys, path = _filesystem(root)
    infos = fsys.get_file_info(fs.FileSelector(path, allow_not_found=True))
    return any(Path(i.path).name.startswith("experiment_state") for i in infos)


@dataclass
class SearchPaths:
    """`root` is a local folder or a storage URI (`s3://...`, `gs://...`, `file://...`) handed to Tune as it
    is; the small files crosspt reads itself go through pyarrow's filesystem for that URI."""
    root: str           # Tune experiment folder
    study_name: str     # Optuna study (and Tune experiment name)
    optuna_url: str

    def _fs(self):
        return _filesystem(self.root)

    @property
    def storage(self) -> str:
        return self.root.rsplit("/", 1)[0]

    @property
    def local_base(self) -> Path:
        """A local folder beside the search for what crosspt writes itself (report, fetched banks): the
        storage folder, or the working directory when storage is a URI."""
        return Path.cwd() if is_uri(self.root) else Path(self.storage)

    def exists(self) -> bool:
        from pyarrow import fs

        fsys, path = self._fs()
        return fsys.get_file_info(path).type != fs.FileType.NotFound

    def read_state(self) -> dict | None:
        fsys, path = self._fs()
        try:
            with fsys.open_input_stream(f"{path}/{STATE_FILE}") as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return None

    def write_state(self, state: dict) -> None:
        fsys, path = self._fs()
        fsys.create_dir(path, recursive=True)
        with fsys.open_output_stream(f"{path}/{STATE_FILE}") as f:
            f.write(json.dumps(state).encode())

    def remove(self) -> None:
        fsys, path = self._fs()
        fsys.delete_dir(path)

    def has_tune_state(self) -> bool:
        """Tune saved its experiment state (trials) at least once: a resume restores it; before that a
        resume starts the trials afresh."""
        return tune_state_saved(self.root)

    def banks_dir(self) -> Path:
        """Local folder for source banks fetched from the registry (trials read them as files)."""
        if is_uri(self.root):
            from crosspt.registry.models import cache_dir

            return cache_dir() / "source_banks"
        return Path(self.storage) / "_source_banks"


def search_paths(space: SearchSpace, storage_path: str | None, tracking_uri: str, experiment: str) -> SearchPaths:
    """The search's folder `<storage>/<space name>` (`<space name>--<experiment>` when the experiment is not
    the space's own name) and its Optuna study, in `optuna.db` beside a sqlite MLflow store, else in the
    local storage folder (or the working directory when storage is a URI)."""
    storage = storage_path or space.storage_path or "ray_results"
    if is_uri(storage):
        storage = storage.rstrip("/")
        local = Path.cwd().resolve()
    else:
        storage = str(Path(storage).expanduser().resolve())
        local = Path(storage)
    slug = re.sub(r"[^\w.-]+", "_", experiment)
    name = space.name if experiment == space.name else f"{space.name}--{slug}"
    if tracking_uri.startswith("sqlite:///"):
        optuna_db = Path(tracking_uri[len("sqlite:///"):]).parent / "optuna.db"
    else:
        optuna_db = local / "optuna.db"
    return SearchPaths(f"{storage}/{name}", name, f"sqlite:///{optuna_db}")


# the claims this process holds: lock file -> its open handle (the flock lives as long as the handle)
_CLAIMS: dict[str, IO] = {}


def _claim_lock(paths: SearchPaths) -> Path:
    """The local file whose flock says a driver runs this search: beside its folder (not in it: --overwrite
    deletes the folder), or for a storage URI in the local folder beside the search (drivers on other
    machines are not seen there)."""
    base = paths.local_base if is_uri(paths.root) else Path(paths.storage)
    return base / f".{paths.study_name}.driver.lock"


def hold_claim(paths: SearchPaths, search_name: str, exp_name: str) -> None:
    """Take this search for this process until `release_claim` (or the process ends: a killed driver's
    flock goes with it, so `--resume` is never locked out). A search another driver holds is refused with
    one line naming that driver."""
    import fcntl
    import os
    import socket
    import time

    lock = _claim_lock(paths)
    if str(lock) in _CLAIMS:
        raise SearchStateError(f"search '{search_name}' in experiment '{exp_name}' is already being run by this "
                               f"process; one driver per search")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise SearchStateError(f"search '{search_name}' in experiment '{exp_name}' is being run by another driver "
                               f"({holder}); wait for it to end, or stop it, then --resume") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    fh.flush()
    _CLAIMS[str(lock)] = fh


def release_claim(paths: SearchPaths) -> None:
    """Let another driver take the search (a no-op where this process holds no claim on it)."""
    fh = _CLAIMS.pop(str(_claim_lock(paths)), None)
    if fh is not None:
        fh.close()            # closing the handle drops the flock


def claim_state(paths: SearchPaths, search_name: str, exp_name: str, resume: bool, overwrite: bool) -> dict | None:
    """The saved state of this search identity, claimed for this driver (`hold_claim`: a second driver of the
    same search is refused): refused without --resume/--overwrite, removed with --overwrite (its Optuna
    study too), read with --resume (None for a new search)."""
    from crosspt.search.optuna_glue import delete_study

    hold_claim(paths, search_name, exp_name)
    try:
        return _claimed_state(paths, search_name, exp_name, resume, overwrite, delete_study)
    except BaseException:
        release_claim(paths)
        raise


def _claimed_state(paths: SearchPaths, search_name: str, exp_name: str, resume: bool, overwrite: bool,
                   delete_study) -> dict | None:
    if paths.exists() and not resume:
        if not overwrite:
            raise ConfigError(f"search '{search_name}' in experiment '{exp_name}' already has saved state in "
                              f"{paths.root}; pass --resume to continue it or --overwrite to start it again")
        paths.remove()
        delete_study(paths.optuna_url, paths.study_name)
    if not resume:
        return None
    state = paths.read_state()
    if state is None:
        raise ConfigError(f"nothing to resume: no search '{search_name}' in experiment '{exp_name}' "
                          f"({paths.root})")
    return state

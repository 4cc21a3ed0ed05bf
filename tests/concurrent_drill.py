"""The concurrent-start drill: N `crosspt search` processes started at the same moment on a NEW store.

    python tests/concurrent_drill.py --n 4 --store sqlite --out /tmp/drill4
    python tests/concurrent_drill.py --n 2 --store server --out /tmp/drill2s

Each search is tiny (one trial, one epoch, the tiny random T5, a few RTE rows) and has its own experiment;
all share the tracking store (a fresh `sqlite:///OUT/mlflow.db`, or a fresh `mlflow server` on loopback
over its own sqlite file) and the storage folder, so the Optuna `optuna.db` beside the store (sqlite) or
in the storage folder (server) is new and shared too. Without RAY_ADDRESS each search starts its own local
Ray, as two terminals would; with it they all join that cluster. Prints each process's exit code and, for a
failed one, its last lines; exits 0 only when every search exited 0. `--code DIR` runs another checkout's
crosspt (e.g. the code before the fix) through PYTHONPATH.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def space_file(out: Path, name: str, backbone: Path) -> Path:
    tree = {"name": name,
            "base": {"tasks": ["rte"], "seed": 0, "backbone": {"name": str(backbone), "max_length": 32},
                     "data": {"shots": 2, "max_test": 8},
                     "prompt": {"private_len": 2, "init": "vocab"},
                     "train": {"epochs": 1, "batch_size": 4, "eval_batch_size": 16, "patience": None},
                     "scaling": {"num_workers": 1, "in_process": True, "cpus_per_worker": 0.5}},
            "space": {"optim.prompt_lr": {"type": "loguniform", "low": 1e-3, "high": 0.1}},
            "objective": {"metric": "best_val_score", "mode": "max"},
            "budget": {"num_samples": 1, "max_epochs": 1}, "scheduler": {"type": "fifo"},
            "search": {"algorithm": "random", "seed": 0}}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(out: Path) -> tuple[subprocess.Popen, str]:
    """A fresh `mlflow server` on loopback over its own sqlite file (it creates its store when it starts)."""
    import urllib.request

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{out / 'server.db'}",
                             "--artifacts-destination", str(out / "server-artifacts")],
                            stdout=open(out / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"mlflow server did not answer on {url}; see {out / 'server.log'}")


def run(n: int, store: str, out: Path, code: Path | None = None, timeout: float = 900) -> list[int]:
    """Start the N searches at once; their exit codes (in order)."""
    out.mkdir(parents=True, exist_ok=True)
    backbone = out / "tiny_t5"
    if not (backbone / "config.json").is_file():
        sys.path.insert(0, str(HERE))
        from tiny_models import build_tiny_t5

        build_tiny_t5(backbone)
    server = None
    if store == "server":
        server, uri = start_server(out)
    else:
        uri = f"sqlite:///{out / 'mlflow.db'}"
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs = []
    try:
        for i in range(n):
            name = f"drill{i}"
            cmd = [sys.executable, "-m", "crosspt.cli", "search", "--space", str(space_file(out, name, backbone)),
                   "--tracking-uri", uri, "--storage-path", str(out / "ray_results"), "--experiment", f"drill-{i}"]
            procs.append((name, subprocess.Popen(cmd, cwd=out, env=env, stdout=open(out / f"{name}.log", "w"),
                                                 stderr=subprocess.STDOUT)))
        codes = []
        for name, p in procs:
            try:
                codes.append(p.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    for (name, _), rc in zip(procs, codes):
        print(f"{name}: exit {rc}")
        if rc != 0:
            tail = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
            print("    " + "\n    ".join(tail))
    return codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--store", choices=["sqlite", "server"], default="sqlite")
    ap.add_argument("--out", required=True, help="a new folder (the store must be new)")
    ap.add_argument("--code", help="the checkout whose crosspt runs (default: the importable one)")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    if (out / "mlflow.db").exists() or (out / "server.db").exists():
        ap.error(f"{out} holds a store already: the drill needs a new one")
    codes = run(a.n, a.store, out, Path(a.code).resolve() if a.code else None)
    print(f"{a.n} searches at once on a new {a.store} store: exit codes {codes}")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())

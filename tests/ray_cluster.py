"""Real local services for the slow tests: a Ray head and an MLflow server, both on loopback.

Each is started as our own child process (so teardown stops exactly what the tests started, nothing
else on the machine) and waited for until it answers.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:           # answering (e.g. 401 under Ray's token auth) means it is up
                return
            time.sleep(0.5)
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop a process group we started (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


class RayHead:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir; stopping it stops its processes."""

    def __init__(self, workdir: Path, num_cpus: int = 2):
        self.port, self.dash_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.log = open(workdir / "ray_head.log", "w")
        self.temp_dir = Path("/tmp") / f"ray_t{self.port}"     # short: Ray's socket paths are length-limited
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: single-node mode, so Linux Ray keeps GCS/raylet on 127.0.0.1
        # instead of turning --node-ip-address into the routable address and listening on every interface
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.proc = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--dashboard-port={self.dash_port}", "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}",
             "--include-dashboard=true", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
             # own ports for the agents, so another Ray on this machine cannot take them first
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_http(f"{self.dashboard}/api/version", timeout=180, proc=self.proc)

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "mlflow_server.log", "w")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}",
             "--artifacts-destination", str(workdir / "server_artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_http(f"{self.url}/health", timeout=120, proc=self.proc)

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()

"""Real local services for the slow tests: a Ray head (and worker nodes), an MLflow server and an S3
emulator, all on loopback.

Each is started as our own child process (so teardown stops exactly what the tests started, nothing
else on the machine) and waited for until it answers.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


# The `ray` console script of the interpreter running the tests (beside it in a venv's bin/), not whichever
# `ray` PATH finds first: `make test PY=venv/bin/python` runs without the venv activated.
RAY_CLI = str(Path(sys.executable).parent / "ray")


# Runs its arguments as a child in its own session (the guard leads it) and ends the whole session when the
# process that started the guard ends, however it ends: that process holds the write end of the guard's stdin,
# whose EOF comes on a normal exit, an exception, Ctrl-C or a SIGKILL alike. So a failed or interrupted test
# run leaves no server behind. The guard ignores SIGTERM (a `stop()` of the session reaches its child, and
# the guard exits with the child's status).
_GUARD = """
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
gone = threading.Event()
def orphaned():
    sys.stdin.buffer.read()
    gone.set()
    os.killpg(0, signal.SIGTERM)
    try:
        child.wait(20)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)
watcher = threading.Thread(target=orphaned, daemon=True)
watcher.start()
code = child.wait()
if gone.is_set():
    watcher.join()
sys.exit(code)
"""


def guarded(cmd: list[str], **popen_kw) -> subprocess.Popen:
    """`cmd` as a process group of its own that ends with this process (`_GUARD`); `stop()` ends it earlier.
    The returned process is the guard: its pid is the group's id."""
    return subprocess.Popen([sys.executable, "-c", _GUARD, *cmd], stdin=subprocess.PIPE, start_new_session=True,
                            **popen_kw)


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
        if proc.stdin:
            proc.stdin.close()
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
    if proc.stdin:
        proc.stdin.close()


def ensure_auth_token() -> None:
    """Token auth needs ~/.ray/auth_token before `ray start`; `ray.init` of a local cluster makes one, but
    on a fresh machine a test that starts a head first would find none."""
    if not (Path.home() / ".ray" / "auth_token").is_file() and not os.environ.get("RAY_AUTH_TOKEN"):
        subprocess.run([RAY_CLI, "get-auth-token", "--generate"], check=True, capture_output=True)


def _ray_start(args: list[str], log, env: dict, hide: tuple[Path, ...] = ()) -> subprocess.Popen:
    """`ray start --block ...`; with `hide`, in a mount namespace of its own where each of those folders
    is an empty tmpfs: that node cannot read what the driver can (a worker machine without the shared disk)."""
    ensure_auth_token()
    cmd = [RAY_CLI, "start", "--block", "--disable-usage-stats", *args]
    if hide:
        mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(str(h))}" for h in hide)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts} && exec {shlex.join(cmd)}"]
    return guarded(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _own_ports() -> list[str]:
    """Own ports for a node's agents, so another Ray on this machine cannot take them first."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


def _resource_args(num_cpus: float, num_gpus: float | None, resources: dict | None) -> list[str]:
    return ([f"--num-cpus={num_cpus:g}"] + ([f"--num-gpus={num_gpus:g}"] if num_gpus is not None else [])
            + ([f"--resources={json.dumps(resources)}"] if resources else []))


class RayHead:
    """`ray start --head --block` with its own temp dir; stopping it stops its processes.

    Single machine (default): on 127.0.0.1 in Ray's single-node mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0),
    so Linux Ray keeps GCS/raylet on 127.0.0.1 instead of turning --node-ip-address into the routable
    address. `node_ip="127.0.0.2"` (any loopback address but 127.0.0.1, which Ray replaces by the routable
    one) starts a cluster head instead, that `RayNode`s on 127.0.0.3, ... join: several nodes on one machine,
    each with its own node address. `num_gpus` declares GPUs Ray schedules without any CUDA behind them."""

    def __init__(self, workdir: Path, num_cpus: float = 2, num_gpus: float | None = None,
                 resources: dict | None = None, node_ip: str = "127.0.0.1", env: dict | None = None):
        self.port, self.dash_port = free_port(), free_port()
        self.address = f"{node_ip}:{self.port}"
        self.dashboard = f"http://{node_ip}:{self.dash_port}"
        self.log = open(workdir / "ray_head.log", "w")
        self.temp_dir = Path("/tmp") / f"ray_t{self.port}"     # short: Ray's socket paths are length-limited
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if node_ip == "127.0.0.1" else "1", **(env or {})}
        self.proc = _ray_start(
            ["--head", f"--port={self.port}", f"--node-ip-address={node_ip}", f"--dashboard-port={self.dash_port}",
             f"--dashboard-host={node_ip}", *_resource_args(num_cpus, num_gpus, resources),
             "--include-dashboard=true", f"--temp-dir={self.temp_dir}", *_own_ports()], self.log, self.env)
        wait_http(f"{self.dashboard}/api/version", timeout=180, proc=self.proc)

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


class RayNode:
    """A worker node joining a cluster `RayHead` (`ray start --address`) as its own process group, on its
    own loopback address; its environment is `env` over a copy of ours without the keys in `drop`
    (what a fresh machine would lack)."""

    def __init__(self, head: RayHead, workdir: Path, node_ip: str, num_cpus: float = 1,
                 num_gpus: float | None = None, resources: dict | None = None, env: dict | None = None,
                 drop: tuple[str, ...] = (), hide: tuple[Path, ...] = ()):
        self.node_ip = node_ip
        self.log = open(workdir / f"ray_node_{node_ip}.log", "w")
        base = {k: v for k, v in head.env.items() if not k.startswith(drop)} if drop else head.env
        self.proc = _ray_start(
            [f"--address={head.address}", f"--node-ip-address={node_ip}",
             *_resource_args(num_cpus, num_gpus, resources), f"--temp-dir={head.temp_dir}", *_own_ports()],
            self.log, {**base, **(env or {})}, hide)

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


def wait_for_nodes(n: int, timeout: float = 120.0) -> list[dict]:
    """The connected driver's view once `n` nodes are alive."""
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [x for x in ray.nodes() if x["Alive"]]
        if len(alive) >= n:
            return alive
        time.sleep(1)
    raise TimeoutError(f"fewer than {n} Ray nodes alive after {timeout}s")


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "mlflow_server.log", "w")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = guarded(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}",
             "--artifacts-destination", str(workdir / "server_artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_http(f"{self.url}/health", timeout=120, proc=self.proc)

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


class S3Server:
    """moto's S3 emulator (`moto_server`) on 127.0.0.1 with one bucket; `env` is what a client (boto3,
    pyarrow, Ray Tune's storage) needs to reach it as `s3://BUCKET/...`."""

    def __init__(self, workdir: Path, bucket: str = "crosspt"):
        self.port, self.bucket = free_port(), bucket
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self.log = open(workdir / "moto_server.log", "w")
        self.proc = guarded([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                            stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/moto-api/", timeout=60, proc=self.proc)
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()

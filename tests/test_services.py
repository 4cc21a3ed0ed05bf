"""The services the tests start are the tests' own: each one ends with the test process however that process
ends, and a driver joins the Ray cluster it was given or says which one it found."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_mlflow_server_ends_with_a_killed_test_process(tmp_path):
    """A process that started the `mlflow_server` fixture's server (`ray_cluster.MlflowServer`) is SIGKILLed
    (no finally, no atexit): its server and every process of its group are gone within seconds. Before:
    the server ran on with parent 1 after the test run had died."""
    code = (f"import sys, time; sys.path.insert(0, {str(TESTS)!r}); from pathlib import Path; "
            f"from ray_cluster import MlflowServer; s = MlflowServer(Path({str(tmp_path)!r})); "
            f"print(s.proc.pid, s.url, flush=True); time.sleep(600)")
    starter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pgid = None
    try:
        line = starter.stdout.readline().split()
        assert len(line) == 2, f"the server did not start: {line}"
        pgid, url = int(line[0]), line[1]
        assert _answers(f"{url}/health")
        starter.kill()
        starter.wait(10)
        deadline = time.time() + 45
        while time.time() < deadline and (_group_alive(pgid) or _answers(f"{url}/health")):
            time.sleep(0.5)
        assert not _answers(f"{url}/health"), "the server still answers after its test process died"
        assert not _group_alive(pgid), "processes of the server's group outlived its test process"
    finally:
        if starter.poll() is None:
            starter.kill()
        if pgid is not None and _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


@pytest.mark.slow
def test_init_ray_joins_the_cluster_it_was_given_or_says_which_it_found(ray_head, monkeypatch):
    """This process connected to another cluster already, then told RAY_ADDRESS=<the test's head>:
    `init_ray` refuses with one line naming both. Before: it kept the other connection silently (how a
    test derived a concurrency of 1 from the wrong cluster's resources)."""
    import ray

    from crosspt.errors import ClusterError
    from crosspt.run.trainer import init_ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    other = ray.get_runtime_context().gcs_address
    try:
        monkeypatch.setenv("RAY_ADDRESS", ray_head.address)
        with pytest.raises(ClusterError) as e:
            init_ray()
        assert other in str(e.value) and ray_head.address in str(e.value) and "\n" not in str(e.value)
    finally:
        ray.shutdown()
    assert init_ray() and ray.get_runtime_context().gcs_address == ray_head.address
    ray.shutdown()


@pytest.mark.slow
def test_init_ray_without_an_address_starts_its_own_ray(ray_head, monkeypatch):
    """Without RAY_ADDRESS, with a `ray start`ed cluster recorded as the machine's current one, `init_ray`
    starts a Ray of its own. Before: `ray.init()` read the record and joined that cluster, whoever had
    started it (another user's tests on the same machine)."""
    import ray

    from crosspt.run.trainer import init_ray

    if ray.is_initialized():
        ray.shutdown()
    # the head's temp dir records it as the machine's current cluster, as `ray start` does in /tmp/ray (Ray
    # writes the record some time after the head answers: written here at once, with what Ray writes)
    (ray_head.temp_dir / "ray_current_cluster").write_text(ray_head.address)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        assert init_ray(num_cpus=1, include_dashboard=False, _temp_dir=str(ray_head.temp_dir))
        assert ray.get_runtime_context().gcs_address != ray_head.address
    finally:
        ray.shutdown()

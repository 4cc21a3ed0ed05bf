"""One configuration as one training run: a Ray Train `TorchTrainer`, or in-process for one worker.

`scaling.in_process` lets a one-worker run skip the Train worker group (which costs ~15-20 s to start
on a small machine) and run the identical loop in the calling process.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from crosspt.config.schema import RunConfig, ScalingConfig, source_bank_problem
from crosspt.errors import ClusterError, ConfigError, CrossPTError
from crosspt.run.checkpoint import RESULT_FILE
from crosspt.run.faults import FAULT_ENV
from crosspt.tasks.data import resolve_data_dir


def pin_data_dir(cfg: RunConfig) -> RunConfig:
    """The config with its data folder (`resolve_data_dir`) pinned in as an absolute path: env vars of
    the driver don't reach remote workers, and their working directory is not the driver's."""
    data_dir = resolve_data_dir(cfg.data.data_dir)
    if data_dir:
        cfg = cfg.model_copy(deep=True)
        cfg.data.data_dir = str(Path(data_dir).expanduser().resolve())
    return cfg


def preflight(cfg: RunConfig) -> dict:
    """Fail fast in the driver on bad tasks/backbones/data/banks rather than inside a worker; returns the
    config's k-shot splits (`prepare_data`), drawn here once for whoever needs them next."""
    from crosspt.backbones.loader import resolve_backbone
    from crosspt.run.inputs import prepare_data

    problem = source_bank_problem(cfg)
    if problem:
        raise ConfigError(problem)
    resolve_backbone(cfg.backbone.name, family=cfg.backbone.family)
    return prepare_data(cfg)[1]


# Ray's switch for single-machine clusters (its default on Windows/macOS): with it off, Ray takes 127.0.0.1 as
# the node address, so GCS, raylet, workers and agents listen on loopback only. On Linux Ray otherwise
# replaces a loopback `_node_ip_address` by the machine's routable address and listens on every interface.
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# Driver env that trials on other nodes need and that no node has by itself: MLflow server credentials
# (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN / TLS settings) and S3 storage credentials and endpoint.
# And the fault-injection drill (`crosspt.run.faults`), which a worker reads from its own environment.
FORWARDED_ENV_PREFIXES = ("MLFLOW_TRACKING_", "AWS_", FAULT_ENV)


def init_ray(runtime_env: dict | None = None, **init_kwargs) -> bool:
    """Join the cluster under `ray job submit` (RAY_ADDRESS set), else start a local Ray on loopback only
    (every Ray port binds 127.0.0.1; set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 to opt out). Either way the
    job's workers get `runtime_env` plus the driver's `FORWARDED_ENV_PREFIXES` variables.

    A RAY_ADDRESS on loopback is joined in single-node mode (a client in cluster mode looks for its raylet
    on the routable address and never connects to a head started with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0);
    a cluster whose nodes sit on other loopback addresses (127.0.0.2, ...) is joined that way too.

    Returns whether this call connected (False: this process was connected already, with the
    runtime_env of that connection; whoever connected it disconnects it)."""
    import ray

    # RAY_ADDRESS=local is Ray's own word for "a Ray of this process's own": the same as no address
    address = os.environ.get("RAY_ADDRESS")
    address = None if address == "local" else address
    if ray.is_initialized():
        _check_connected_to(address)
        return False
    runtime_env = with_forwarded_env(runtime_env)
    if address:
        with _single_node_mode(enabled=_is_loopback(address)):
            ray.init(address=address, runtime_env=_not_in_job_env(runtime_env),
                     **{"log_to_driver": True, **init_kwargs})
        _check_connected_to(address)
        return True
    # "local": a Ray of its own. With no address, ray.init joins the cluster last started by `ray start` on
    # this machine (its /tmp/ray/ray_current_cluster), whoever started it
    with _single_node_mode():
        ray.init(address="local", runtime_env=runtime_env, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 **init_kwargs)
    return True


def _host_port(address: str) -> tuple[str, str]:
    host, _, port = address.split("://")[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")
    try:
        host = socket.gethostbyname(host)
    except OSError:             # not resolvable here: compared as written
        pass
    return host, port


def _check_connected_to(address: str | None) -> None:
    """ClusterError unless the connected cluster's GCS is at `address` (a `host:port` RAY_ADDRESS; `auto`, a
    `ray://` client or a dashboard URL name no GCS and are not checked)."""
    import ray

    if not address or address == "auto" or "://" in address:
        return
    found = ray.get_runtime_context().gcs_address
    if _host_port(found) != _host_port(address):
        raise ClusterError(f"this process is connected to the Ray cluster at {found}, not to RAY_ADDRESS={address}; "
                           f"disconnect it (ray.shutdown()) or unset RAY_ADDRESS")


def with_forwarded_env(runtime_env: dict | None) -> dict:
    """`runtime_env` with the driver's credential variables added to its `env_vars` (its own win)."""
    runtime_env = dict(runtime_env or {})
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    runtime_env["env_vars"] = {**forwarded, **runtime_env.get("env_vars", {})}
    return runtime_env


def _not_in_job_env(runtime_env: dict) -> dict:
    """Under `ray job submit` Ray merges the driver's runtime_env into the job's and refuses a variable
    set in both: drop those (the job's value already reaches every worker)."""
    from crosspt.run._ray_compat import job_runtime_env

    job = job_runtime_env()
    taken = set(job.get("env_vars") or {})
    return {**runtime_env, "env_vars": {k: v for k, v in runtime_env.get("env_vars", {}).items() if k not in taken}}


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@contextlib.contextmanager
def _single_node_mode(enabled: bool = True):
    """Ray's single-machine switch for this process and what it starts, unless the user set it."""
    from crosspt.run._ray_compat import cluster_mode_off

    if not enabled or _SINGLE_NODE_ENV in os.environ:
        yield
        return
    os.environ[_SINGLE_NODE_ENV] = "0"               # inherited by the processes ray.init starts
    try:
        with cluster_mode_off():                     # and this process, which read the variable at import
            yield
    finally:
        os.environ.pop(_SINGLE_NODE_ENV, None)


def train(cfg: RunConfig, *, output_dir: str | Path, resume_from: str | Path | None = None,
          on_report=None, max_failures: int = 0, callbacks=None) -> dict:
    """Run one configuration to the end; returns the loop's final result dict."""
    cfg = pin_data_dir(cfg)
    output_dir = Path(output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.scaling.num_workers == 1 and cfg.scaling.in_process:
        from crosspt.run.loop import LocalSession, run_loop

        session = LocalSession(output_dir, use_gpu=cfg.scaling.use_gpu, on_report=on_report,
                               resume_from=resume_from)
        return run_loop(cfg, session)
    return _train_with_ray(cfg, output_dir, resume_from, max_failures, callbacks)


def train_scaling(s: ScalingConfig):
    """Ray Train's worker group for `scaling`: `num_workers` workers of `{"CPU": c, "GPU": g}` each, `g`
    possibly a fraction (workers of *other* trials may share the GPU; the workers of one group should not:
    NCCL refuses two ranks on one device)."""
    import ray.train

    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                   resources_per_worker=s.worker_resources())


def _train_with_ray(cfg: RunConfig, output_dir: Path, resume_from, max_failures: int, callbacks) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from crosspt.run.loop import ray_worker_loop

    init_ray()
    trainer = TorchTrainer(
        ray_worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"),
                           "resume_from": str(Path(resume_from).resolve()) if resume_from else None},
        scaling_config=train_scaling(cfg.scaling),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=str(output_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise CrossPTError("training finished without a checkpoint")
    return json.loads((Path(result.checkpoint.path) / RESULT_FILE).read_text())

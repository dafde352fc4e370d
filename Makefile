# Two commands do all set-up on a fresh machine:
#   make demo   builds a tiny model, fine-tunes it on the bundled Vietnamese data, chats with it
#   make test   runs the test suite (CPU only)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Without an NVIDIA GPU we install PyTorch's CPU build, never the multi-GB CUDA build.
# On this project's machines torch==2.13.0 resolves to a local CPU wheel; elsewhere point
# PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index, or set TORCH_SPEC yourself.
HAS_GPU    := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo test test-all clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf runs .pytest_cache

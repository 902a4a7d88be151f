# make run: set up everything and start the app on http://127.0.0.1:7860.  make test: set up and run the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CONFIG ?= configs/default.yaml
ARGS ?=

.PHONY: setup run test test-slow bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

.cache/models/SmolLM2-135M-Instruct/model.safetensors: $(BIN)/.installed
	$(BIN)/python run.py prepare --config $(CONFIG)

setup: $(BIN)/.installed .cache/models/SmolLM2-135M-Instruct/model.safetensors

run: setup
	$(BIN)/python run.py serve --config $(CONFIG) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python run.py bench --config $(CONFIG) $(ARGS)

clean:
	rm -rf $(VENV) .cache adapters runs feedback.db feedback.db-wal feedback.db-shm

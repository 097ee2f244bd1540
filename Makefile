# labdaq developer commands. Each target creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SPEED ?= 100
HOST ?= 127.0.0.1
PORT ?= 8000
DATA_DIR ?= ./data

.PHONY: run test test-fast test-slow test-deep soak faults bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(VENV)/.installed $@

# make bench also measures the tools it compares with (cellpy, pandas: the bench extra).
$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed-dev
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/labdaq serve --sim --speed $(SPEED) --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

# Unit and protocol tests: protocol documents, the SCPI parser, the cell and impedance
# models, and every driver's command set against its simulator over TCP and a pty. No
# database, no engine, no subprocess.
FAST_TESTS := tests/test_protocol.py tests/test_scpi_parser.py tests/test_cell_model.py \
	tests/test_cell_heat.py tests/test_impedance_model.py tests/test_transport.py \
	tests/test_transport_blocks.py tests/test_cabinet.py tests/test_keithley2450.py \
	tests/test_daq970a.py tests/test_hioki_bt4560.py tests/test_espec_chamber.py

# Everything not marked slow (.ci/run runs this first; budget: 10 min on 2 cores). Most of
# these tests wait on simulated instruments and subprocesses, so TEST_WORKERS pytest-xdist
# workers (a whole file each: its module fixtures start once) keep both cores busy.
TEST_WORKERS ?= 3
test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow and not deep" -n $(TEST_WORKERS) --dist loadfile \
		--durations=25

# Most of their time is waiting on simulated instruments' timeouts: FAST_TEST_WORKERS
# pytest-xdist workers, a whole file each (its module fixtures start once).
FAST_TEST_WORKERS ?= 3
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "not slow and not deep" -n $(FAST_TEST_WORKERS) --dist loadfile \
		$(FAST_TESTS)

# The long suites (@pytest.mark.slow); .ci/run runs them after `make test`. The fault
# campaign's long form (@pytest.mark.long: 100 kills) runs in `make faults` instead.
# SLOW_TEST_WORKERS pytest-xdist workers, a whole file each: most of these tests wait on
# simulated instruments and subprocesses. Then schemathesis in depth on its own (make
# test-deep): its six runs and two services load both cores, and beside it the other
# slow tests would wait on a machine busier than they need.
SLOW_TEST_WORKERS ?= 2
test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "slow and not deep and not soak and not long" \
		-n $(SLOW_TEST_WORKERS) \
		--dist loadfile \
		--durations=15
	$(BIN)/python -m pytest -q -m deep

# The long form of the memory soak: 64 channels at 1 s under the standard API load for
# an hour of wall time, RSS of every serve process (tests/test_soak_api_load.py).
soak: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -s -m soak

# schemathesis in depth alone (the last part of test-slow): every operation, every phase,
# all checks, each role's token, SQLite and (with LABDAQ_TEST_PG_URL) PostgreSQL.
test-deep: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m deep

# The fault campaign: every test marked `faults` (kill -9 campaigns long and short, kills
# under serve, database outages on SQLite and PostgreSQL), then its table into the README.
FAULT_REPORT := .faults.jsonl
faults: $(VENV)/.installed-dev
	rm -f $(FAULT_REPORT)
	LABDAQ_FAULT_REPORT=$(abspath $(FAULT_REPORT)) \
		LABDAQ_TEST_PG_URL="$${LABDAQ_TEST_PG_URL:-$(BENCH_PG_URL)}" \
		$(BIN)/python -m pytest -q -m faults
	$(BIN)/python -m tests.fault_table $(FAULT_REPORT) --readme

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy labdaq drivers sims api

# The lab's PostgreSQL (every machine here runs one); override to measure another server.
BENCH_PG_URL ?= postgresql://postgres@127.0.0.1:5432/test

bench: $(VENV)/.installed-bench
	LABDAQ_BENCH_PG_URL="$${LABDAQ_BENCH_PG_URL:-$(BENCH_PG_URL)}" $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info

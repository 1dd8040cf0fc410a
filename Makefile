# callback-dispatcher. `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PY_DIRS := dispatcher tests $(wildcard bench)
# The suite starts many Python processes (xdist workers, worker and API processes, CLI
# runs): each one compiles the package again unless its bytecode is cached, so a
# PYTHONDONTWRITEBYTECODE in the caller's environment (some sandboxes set it) is dropped
# here. The fast tier took 137 s instead of 110 s with it, on two cores.
unexport PYTHONDONTWRITEBYTECODE
# pytest-xdist workers for the unit, service and repository tiers (0: one process): four
# on two cores, as the tests wait on real servers much of their time (three: 110 s; four:
# 93 s; five: 104 s, each worker collecting the suite again). The fault tier runs
# on two, a module to each (its processes wait out kills, pauses and restarts: ~0.5 of a
# core in one process); the browser tier in one.
WORKERS ?= 4
FAULT_WORKERS ?= 2
FAST_TIERS := tests/unit tests/service tests/repo

.PHONY: run test test-fast test-faults lint fmt typecheck pytest screenshots bench bench-quick deploy-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## API + worker on an embedded Redis (set DISPATCHER_REDIS_URL to use yours)
	$(BIN)/dispatcher run

test: lint typecheck pytest  ## everything CI runs

lint: $(STAMP)
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -n $(WORKERS) $(FAST_TIERS)
	$(BIN)/pytest -n $(FAULT_WORKERS) --dist loadfile tests/faults
	$(BIN)/pytest tests/browser

test-fast: $(STAMP)  ## the loop for every change: unit, service and repository tiers (~90 s on 2 cores)
	$(BIN)/pytest -q -n $(WORKERS) $(FAST_TIERS)

test-faults: $(STAMP)  ## the fault tier: workers, Redis and PostgreSQL killed and paused
	$(BIN)/pytest -q -n $(FAULT_WORKERS) --dist loadfile tests/faults

screenshots: $(STAMP)  ## refresh the README's console screenshots (docs/console/*.png)
	DISPATCHER_SCREENSHOTS=1 $(BIN)/pytest tests/browser/test_console_browser.py -q

fmt: $(STAMP)
	$(BIN)/ruff format $(PY_DIRS)
	$(BIN)/ruff check --fix $(PY_DIRS)

bench: $(STAMP)  ## full benchmark table (< 10 min), written to bench/results/
	$(BIN)/python -m bench

bench-quick: $(STAMP)  ## a smaller run (about 3 min)
	$(BIN)/python -m bench --quick

deploy-check: $(STAMP)  ## parse and check the deploy/ files
	$(BIN)/pytest tests/repo/test_deploy.py -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .dispatcher bench/results/*.json

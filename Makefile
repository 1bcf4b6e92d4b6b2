# Every target sets up its own pinned virtual environment first, and can be re-run safely.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.emvi-installed
WORKDIR ?= runs/main
PYTEST_WORKERS ?= 2

.PHONY: setup main test test-slow test-all lint format bench clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

## The headline experiment on the embedded digits data (results, figures and report in $(WORKDIR)).
main: $(STAMP)
	$(BIN)/python experiments/em_vs_vi.py --workdir $(WORKDIR) --overwrite

## The test suite less its slow tier (lint first: a style error fails CI as a test would), then the
## docstring examples of the library, run as a user would (JAX defaults: float32, no x64).
test: $(STAMP)
	$(BIN)/ruff check emvi experiments scripts tests docs
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -m "not slow"
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -p no:cacheprovider --doctest-modules emvi docs/examples

## Only the slow tier (tests marked slow, or listed in tests/slow.txt); CI runs it after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -m slow

## Every test, the slow tier included.
test-all: $(STAMP)
	$(BIN)/ruff check emvi experiments scripts tests docs
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -p no:cacheprovider --doctest-modules emvi docs/examples

lint: $(STAMP)
	$(BIN)/ruff check emvi experiments scripts tests docs
	$(BIN)/ruff format --check emvi experiments scripts tests docs

format: $(STAMP)
	$(BIN)/ruff format emvi experiments scripts tests
	$(BIN)/ruff check --fix emvi experiments scripts tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

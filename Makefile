# Every target sets up its own pinned virtual environment first, and can be re-run safely.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.emvi-installed
WORKDIR ?= runs/main
PYTEST_WORKERS ?= 2

.PHONY: setup main test lint format bench clean

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

## The whole test suite (lint first: a style error fails CI as a test would).
test: $(STAMP)
	$(BIN)/ruff check emvi experiments scripts tests
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

lint: $(STAMP)
	$(BIN)/ruff check emvi experiments scripts tests
	$(BIN)/ruff format --check emvi experiments scripts tests

format: $(STAMP)
	$(BIN)/ruff format emvi experiments scripts tests
	$(BIN)/ruff check --fix emvi experiments scripts tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

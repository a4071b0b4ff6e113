# make repro: the whole pipeline.  make quick: it at smoke size on a CPU, in minutes.
# make test: lint + the test suite.  All set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help setup test lint format repro quick bench clean

help:
	@echo "make repro   run the pipeline (creates .venv on first use)"
	@echo "make quick   the whole pipeline at smoke size in quick/ (minutes on a CPU)"
	@echo "make test    ruff + the whole test suite, slow end-to-end tests included"
	@echo "make lint    ruff check and format check"
	@echo "make bench   training-step time table (bench/step_time.py)"

# torch goes first and pinned: an unpinned resolve would pull the newest CUDA build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (log: $(VENV)/install.log)"
	@$(BIN)/python -m pip install --quiet torch==2.13.0 > $(VENV)/install.log 2>&1 \
		|| (tail -n 30 $(VENV)/install.log; exit 1)
	@$(BIN)/python -m pip install --quiet -e '.[dev]' >> $(VENV)/install.log 2>&1 \
		|| (tail -n 30 $(VENV)/install.log; exit 1)
	@touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

# dvc repro, with independent stages at once (pipeline/repro.py). The stages' commands run
# `python -m pipeline...`: the venv goes first on PATH.
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipeline.repro

quick: $(STAMP)
	$(BIN)/python -m pipeline.quick

bench: $(STAMP)
	$(BIN)/python bench/step_time.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis quick

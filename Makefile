# gref-serve — the front door. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SEED ?= 0
SEEDS ?= 3
TORCH_PIN := torch==2.13.0

.DEFAULT_GOAL := help

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the local CPU build. An unpinned torch pulls CUDA wheels.
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[train,cpu,dev]'
	touch $@

venv: $(BIN)/.installed  ## create .venv with torch (CPU) + the project [train,cpu,dev]

lint: venv  ## ruff (lint + format check) and mypy on service/ and export/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv  ## apply ruff format and autofixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: venv lint  ## set everything up, lint, run the test suite
	$(BIN)/pytest -q

results: venv  ## train everything on the simulated world over SEEDS seeds; writes results/
	$(BIN)/python -m model results --seed $(SEED) --seeds $(SEEDS)

results-quick: venv  ## a small version of `make results` (minutes)
	$(BIN)/python -m model results --seed $(SEED) --quick --out results/quick

.PHONY: help venv lint format test results results-quick

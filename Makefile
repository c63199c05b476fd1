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
	$(BIN)/pip install -q -e '.[train,cpu,dev,loadtest]'
	touch $@

venv: $(BIN)/.installed  ## create .venv with torch (CPU) + the project [train,cpu,dev,loadtest]

lint: venv  ## ruff (lint + format check) and mypy on service/ and export/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv  ## apply ruff format and autofixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: venv lint  ## set everything up, lint, run the test suite
	$(BIN)/pytest -q

HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 1

serve: bundle  ## set everything up (venv, default bundle if missing) and serve on 127.0.0.1:8000
	$(BIN)/python -m service --bundle artifacts --host $(HOST) --port $(PORT) --workers $(WORKERS)

DATA := data/default
CKPT := checkpoints/default
# The default model: a small simulated world, pre-train, DPO, then head alignment
# (a few minutes on 2 cores).
$(CKPT)/aligned/best/model.safetensors: | venv
	$(BIN)/python -m model generate --out $(DATA) --seed $(SEED) --n-requests 60000
	$(BIN)/python -m model train --stage pretrain --data $(DATA) --out $(CKPT)/pretrain --epochs 3
	$(BIN)/python -m model train --stage dpo --data $(DATA) --out $(CKPT)/dpo --init $(CKPT)/pretrain/best --epochs 1
	$(BIN)/python -m model train --stage distill --data $(DATA) --out $(CKPT)/aligned --init $(CKPT)/dpo/best --epochs 2

checkpoint: $(CKPT)/aligned/best/model.safetensors  ## train the default checkpoint if missing

artifacts/latest: $(CKPT)/aligned/best/model.safetensors
	$(BIN)/python -m export build $(CKPT)/aligned/best --items $(DATA)/items.parquet --out artifacts --fp16 --verify

bundle: artifacts/latest  ## the default ONNX bundle in artifacts/ (trained + exported + verified if missing)

bench: bundle  ## benchmarks (ratios in one run): engine vs torch decode; HTTP service vs echo floor
	$(BIN)/python tests/bench/bench_engine.py
	$(BIN)/python tests/bench/bench_decode.py --bundle artifacts
	$(BIN)/python tests/bench/bench_http.py --bundle artifacts
	$(BIN)/python tests/bench/bench_load.py --bundle artifacts
	$(BIN)/python tests/bench/bench_gpu.py --bundle artifacts

USERS ?= 16
DURATION ?= 60
SHAPE ?= steady
USER_RPS ?= 10

loadtest: venv bundle  ## locust vs Redis + the service (USERS DURATION SHAPE=steady|step|spike USER_RPS); report in loadtest/reports/
	$(BIN)/python -m loadtest.run --bundle artifacts --users $(USERS) --duration $(DURATION) \
		--shape $(SHAPE) --user-rps $(USER_RPS)

validate-ops: venv  ## check Dockerfile, compose, Prometheus rules, dashboard against /metrics (no Docker needed)
	$(BIN)/pytest -q tests/unit/test_ops.py

results: venv  ## train everything on the simulated world over SEEDS seeds; writes results/
	$(BIN)/python -m model results --seed $(SEED) --seeds $(SEEDS)

results-quick: venv  ## a small version of `make results` (minutes)
	$(BIN)/python -m model results --seed $(SEED) --quick --out results/quick

.PHONY: help venv lint format test serve checkpoint bundle bench loadtest validate-ops results results-quick

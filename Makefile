# gref-serve — the front door. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SEED ?= 0
TORCH_PIN := torch==2.13.0
# Where torch comes from. Empty (default): pip's own configuration, which on the
# development machine and in CI finds a local CPU wheel. On a machine without one, PyPI's
# torch pulls the CUDA packages: give the CPU index,
#   make serve TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# The onnxruntime build, the project's extra of that name: cpu (onnxruntime) or gpu
# (onnxruntime-gpu). The two packages share the `onnxruntime` module and must never be
# installed together: the install removes the other one first. The stamp carries the
# name, so `make ... ORT=gpu` on a cpu venv (or back) reinstalls.
ORT ?= cpu
ifeq ($(ORT),cpu)
ORT_OTHER := onnxruntime-gpu
else ifeq ($(ORT),gpu)
ORT_OTHER := onnxruntime
else
$(error ORT=$(ORT): want cpu or gpu)
endif
INSTALLED := $(BIN)/.installed-$(ORT)

.DEFAULT_GOAL := help

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build (see TORCH_INDEX). An unpinned torch pulls CUDA wheels.
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PIN)
	# never onnxruntime and onnxruntime-gpu together: remove the other build first
	$(BIN)/pip uninstall -q -y $(ORT_OTHER)
	$(BIN)/pip install -q -e '.[train,$(ORT),dev,loadtest]'
	rm -f $(BIN)/.installed $(BIN)/.installed-*
	touch $@

venv: $(INSTALLED)  ## create .venv: torch (CPU; TORCH_INDEX=URL to pick its index) + the project [train,ORT,dev,loadtest], ORT=cpu (default) or gpu

lint: venv  ## ruff (lint + format check) and mypy on contract/, service/ and export/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv  ## apply ruff format and autofixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian's prometheus package (prometheus + promtool): the alert-rule tests, the real
# Prometheus test and the fault suite run them. Installed when missing and root (CI).
prometheus:  ## install Debian's prometheus (promtool too) when missing and root
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; \
	else echo "prometheus/promtool missing (apt-get install prometheus, as root): their tests skip"; fi

test: venv lint prometheus  ## set everything up, lint, run the test suite
	$(BIN)/pytest -q

HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 1

serve: venv bundle  ## set everything up (venv, default bundle if missing) and serve on 127.0.0.1:8000
	$(BIN)/python -m service --bundle artifacts --host $(HOST) --port $(PORT) --workers $(WORKERS)

DATA := data/default
CKPT := checkpoints/default
# The default model: a small simulated world (its logs carry the logging policy's
# propensities), exposure pre-training, then the list-aware value stage, which selects its
# epoch on the debiased list estimate (a few minutes on 2 cores). The paper's recipe
# (pre-train, DPO, head alignment) is `make checkpoint-paper`.
$(CKPT)/value/best/model.safetensors: | venv
	$(BIN)/python -m model generate --out $(DATA) --seed $(SEED) --n-requests 60000
	$(BIN)/python -m model train --stage pretrain --data $(DATA) --out $(CKPT)/pretrain --epochs 3
	$(BIN)/python -m model train --stage value --data $(DATA) --out $(CKPT)/value --init $(CKPT)/pretrain/best --epochs 6

checkpoint: $(CKPT)/value/best/model.safetensors  ## train the default checkpoint if missing

checkpoint-paper: $(CKPT)/value/best/model.safetensors  ## the paper's recipe on the same data and pre-training
	$(BIN)/python -m model train --stage dpo --data $(DATA) --out $(CKPT)/dpo --init $(CKPT)/pretrain/best --epochs 1
	$(BIN)/python -m model train --stage distill --data $(DATA) --out $(CKPT)/aligned --init $(CKPT)/dpo/best --epochs 2

# Built only when artifacts/latest is missing: an existing bundle is used as is, whether or
# not the (gitignored) checkpoint it was exported from is still here. (Not a prerequisite:
# make would retrain a missing checkpoint, even order-only, before looking at the bundle.)
# To rebuild: rm artifacts/latest (and checkpoints/default to retrain).
artifacts/latest: | venv
	$(MAKE) --no-print-directory checkpoint
	$(BIN)/python -m export build $(CKPT)/value/best --items $(DATA)/items.parquet --out artifacts --fp16 --verify

bundle: artifacts/latest  ## the default ONNX bundle in artifacts/ (trained + exported + verified if missing)

bench: venv bundle  ## benchmarks (ratios in one run): engine vs torch decode; HTTP service vs echo floor; training 1 vs 2 processes; ORT=gpu for the GPU figures
	$(BIN)/python tests/bench/bench_engine.py
	$(BIN)/python tests/bench/bench_decode.py --bundle artifacts
	$(BIN)/python tests/bench/bench_http.py --bundle artifacts
	$(BIN)/python tests/bench/bench_load.py --bundle artifacts
	$(BIN)/python tests/bench/bench_gpu.py --bundle artifacts
	$(BIN)/python tests/bench/bench_ddp.py --plot docs/img/ddp.png

USERS ?= 16
DURATION ?= 60
SHAPE ?= steady
USER_RPS ?= 10
PIN ?= 1
# A running service to load instead (loopback only, e.g. the compose stack's
# http://127.0.0.1:8000): no bundle is built, no Redis or service started.
URL ?=

loadtest: venv $(if $(URL),,bundle)  ## locust vs Redis + the service, or URL=http://127.0.0.1:PORT (a running one) (USERS DURATION SHAPE=steady|step|spike USER_RPS; PIN=0: service and locust unpinned); report in loadtest/reports/
	$(BIN)/python -m loadtest.run $(if $(URL),--url $(URL),--bundle artifacts) --users $(USERS) \
		--duration $(DURATION) --shape $(SHAPE) --user-rps $(USER_RPS) $(if $(filter 0,$(PIN)),--no-pin)

chaos: venv bundle prometheus  ## the fault suite on loopback (Redis, the service, a real Prometheus; ~15 min): report in loadtest/reports/chaos-<time>/
	$(BIN)/pytest -q -m chaos tests/chaos -p no:cacheprovider

validate-ops: venv  ## check Dockerfile, compose, Prometheus rules, dashboard, Kubernetes manifests (no Docker, no cluster)
	$(BIN)/pytest -q tests/deploy

results: venv  ## every row on the 5 held-out worlds (+ list-effect sensitivity worlds); writes results/ (resumes)
	$(BIN)/python -m model results --worlds heldout --out results

results-size: venv  ## the list-aware recipe at two model sizes on 2 held-out worlds; results/size
	$(BIN)/python -m model results --worlds heldout --seeds 100,101 --strengths '' --large \
		--runs gref_value,gref_value_large --out results/size

results-dev: venv  ## the same on the development worlds (where recipes and settings are chosen); results/dev
	$(BIN)/python -m model results --worlds dev --out results/dev

results-quick: venv  ## a small version of `make results` (minutes)
	$(BIN)/python -m model results --quick --out results/quick

.PHONY: help venv lint format prometheus chaos test serve checkpoint checkpoint-paper bundle bench loadtest validate-ops results results-dev results-quick results-size

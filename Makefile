# EdgeRLHF: `make smoke` and `make test` are the quick start; `make all` is the real run on an 8 GB GPU.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here and installed before the lock: on a CPU-only machine `pip install torch==X` takes the
# CPU build; in the Docker image the CUDA build of the same version is installed (see Dockerfile).
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: setup all smoke test lint metrics diff plots clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

all: setup
	dvc repro

smoke: setup
	$(BIN)/python -m edgerlhf.smoke

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check edgerlhf stages tests

metrics: setup
	dvc metrics show

diff: setup
	dvc params diff
	dvc metrics diff

plots: setup
	dvc plots show -o reports/plots

clean:
	rm -rf .smoke .cache .pytest_cache .ruff_cache

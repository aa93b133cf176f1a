# EdgeRLHF: `make smoke` and `make test` are the quick start; `make all` is the real run on an 8 GB GPU.
SHELL := /bin/bash
# The lock is compiled for Python 3.11; the Docker image sets VENV=/opt/venv.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here and installed before the lock (which leaves it out): on a CPU-only machine
# `pip install torch==X` takes the CPU build; the Docker image installs the CUDA build of the same version.
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHONUNBUFFERED := 1

IMAGE ?= edgerlhf:latest
HF_CACHE ?= $(HOME)/.cache/huggingface
DOCKER_RUN := docker run --rm --init --user "$$(id -u):$$(id -g)" -v "$(CURDIR)":/workspace
TORCH_CPU_WHEELS ?= https://download.pytorch.org/whl/cpu/torch/

.PHONY: setup all smoke test test-extra lint metrics diff plots bench clean lock docker-build docker-all docker-smoke generate export

# Inside the image (EDGERLHF_IMAGE=1) the environment already exists: don't build a .venv in the mounted repo.
ifeq ($(EDGERLHF_IMAGE),1)
setup:
	@$(BIN)/python -m pip check
else
setup: $(STAMP)
endif

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

all: setup
	dvc repro

smoke: setup
	$(BIN)/python -m edgerlhf.smoke

# The suite (<= 5 min on 2 cores); test-extra adds the slower variants (CI runs both).
test: setup
	$(BIN)/python -m pytest -q -m "not extra" --durations=8

test-extra: setup
	$(BIN)/python -m pytest -q -m extra

lint: setup
	$(BIN)/ruff check edgerlhf stages tests
	$(BIN)/hadolint --config .hadolint.yaml Dockerfile

metrics: setup
	dvc metrics show

diff: setup
	dvc params diff
	dvc metrics diff

# reward/KL/loss curves and proxy-vs-gold against KL (dvc.yaml `plots:`) as HTML in RUN_DIR/reports/plots/
# (make plots RUN_DIR=.smoke for the offline run); reports/summary.md embeds PNG charts of the headline numbers.
plots: setup
	cd "$(or $(RUN_DIR),.)" && dvc plots show -o reports/plots

# Speed and memory per stage at distilgpt2 / Qwen2.5-0.5B shapes (random weights, no download) -> metrics/bench.json
# (+ metrics/bench_info.json). Full size under hardware.vram_budget_gb on a GPU; reduced automatically on CPU.
# make bench [BENCH_ARGS="--shapes distilgpt2 --precisions int4 --steps 5"]
bench: setup
	$(BIN)/python -m edgerlhf.bench $(BENCH_ARGS)

# Regenerate requirements.lock (offline: make lock TORCH_CPU_WHEELS=<a folder of torch wheels>). See requirements.in.
lock: setup
	CUSTOM_COMPILE_COMMAND="see the header of requirements.in" $(BIN)/pip-compile --quiet --unsafe-package torch \
	    --strip-extras --no-emit-index-url --no-emit-find-links --find-links $(TORCH_CPU_WHEELS) \
	    --output-file requirements.lock requirements.in

docker-build:
	docker build --build-arg TORCH_VERSION=$(TORCH_VERSION) -t $(IMAGE) .

docker-all:
	mkdir -p "$(HF_CACHE)"
	$(DOCKER_RUN) --gpus all --ipc=host -v "$(HF_CACHE)":/cache/huggingface $(IMAGE) make all

docker-smoke:
	$(DOCKER_RUN) --network none $(IMAGE) make smoke

clean:
	rm -rf .smoke .cache .pytest_cache .ruff_cache

# Use what a run trained (docs/generate-export.md). RUN_DIR: the run's root (.smoke for make smoke).
RUN_DIR ?= .

# make generate PROMPT="What color is the sky?" [POLICY=ppo@int4 | COMPARE=1] [RUN_DIR=.smoke] [ARGS="--seed 1"];
# without PROMPT the prompts are read from stdin, one per line (or ARGS="--file prompts.txt").
generate: setup
	$(BIN)/python -m edgerlhf.generate --root "$(RUN_DIR)" $(if $(POLICY),--policy "$(POLICY)") \
	    $(if $(COMPARE),--compare) $(ARGS) $(if $(PROMPT),-- "$$PROMPT")

# Standalone Hugging Face folders RUN_DIR/exports/ppo-P (PPO adapter merged, model card). Not a dvc.yaml stage:
# full weights per precision would be stored again in the DVC cache. make export [PRECISION=int4] [RUN_DIR=.smoke]
export: setup
	$(BIN)/python -m edgerlhf.export --root "$(RUN_DIR)" $(if $(PRECISION),--precision "$(PRECISION)") $(ARGS)

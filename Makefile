# EdgeRLHF: `make smoke` and `make test` are the quick start; `make all` is the real run on an 8 GB GPU.
SHELL := /bin/bash
# The lock is compiled for Python 3.11. `make setup` finds one (or has uv fetch one) by the rule in
# edgerlhf/bootstrap.py; PYTHON=/path/to/python overrides it. The Docker image sets VENV=/opt/venv.
PYTHON ?=
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here and installed before the lock (which leaves it out): on a CPU-only machine
# `pip install torch==X` takes the CPU build; the Docker image installs the CUDA build of the same version.
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed
# The PATH as the user has it: setup looks for interpreters there, not in the venv it is (re)building.
USER_PATH := $(PATH)
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHONUNBUFFERED := 1

IMAGE ?= edgerlhf:latest
HF_CACHE ?= $(HOME)/.cache/huggingface
DOCKER_RUN := docker run --rm --init --user "$$(id -u):$$(id -g)" -v "$(CURDIR)":/workspace
TORCH_CPU_WHEELS ?= https://download.pytorch.org/whl/cpu/torch/

.PHONY: setup all smoke test test-extra lint metrics diff exps plots bench gpu-check clean lock docker-build docker-all docker-smoke generate export

# Inside the image (EDGERLHF_IMAGE=1) the environment already exists: don't build a .venv in the mounted repo.
ifeq ($(EDGERLHF_IMAGE),1)
setup:
	@$(BIN)/python -m pip check
else
setup: $(STAMP)
endif

# Any python3 runs the bootstrap (standard library only); it picks the venv's interpreter itself.
$(STAMP): requirements.lock pyproject.toml edgerlhf/bootstrap.py
	@PATH='$(USER_PATH)'; command -v $(or $(PYTHON),python3) >/dev/null || { echo "make setup: no python3 on PATH: install Python 3 \
	(3.11 preferred; e.g. sudo apt install python3.11 python3.11-venv)" >&2; exit 1; }
	@PATH='$(USER_PATH)' $(or $(PYTHON),python3) edgerlhf/bootstrap.py --venv $(VENV) --torch $(TORCH_VERSION) --stamp $(STAMP) \
	    $(if $(PYTHON),--python $(PYTHON))

# The preflight names a misspelled params.yaml key (and the closest valid one) before DVC reports it as
# "Parameters '<the key it expected>' are missing" (README: the real run).
all: setup
	$(BIN)/python -m edgerlhf.config check params.yaml
	dvc repro

# SMOKE_ARGS: e.g. --reset (discard params.yaml edits made in .smoke and not committed there), --force
smoke: setup
	$(BIN)/python -m edgerlhf.smoke $(SMOKE_ARGS)

# The suite (<= 5 min on 2 cores); test-extra adds the slower variants (CI runs both).
# TESTS: a subset, e.g. make test TESTS=tests/test_config.py
test: setup
	$(BIN)/python -m pytest -q -m "not extra" --durations=8 $(TESTS)

test-extra: setup
	$(BIN)/python -m pytest -q -m extra

lint: setup
	$(BIN)/ruff check edgerlhf stages tests
	$(BIN)/hadolint --config .hadolint.yaml Dockerfile

# The comparison commands of a run folder: RUN_DIR=.smoke for the quick-start workspace (default: this one).
RUN_DIR ?= .

# The headline numbers (metrics/headline.json), one row per precision; details: RUN_DIR/metrics/*.json
metrics: setup
	$(BIN)/python -m edgerlhf.exps metrics --dir "$(RUN_DIR)"

# What changed against the last commit of RUN_DIR, and what it did to the headline numbers
diff: setup
	cd "$(RUN_DIR)" && dvc params diff && dvc metrics diff

# Every DVC experiment of RUN_DIR (dvc exp show): the params that differ, then the headline numbers per precision
exps: setup
	$(BIN)/python -m edgerlhf.exps show --dir "$(RUN_DIR)"

# The pipeline once per seed as DVC experiments of RUN_DIR (queued, one worker), then means, 95 % intervals and the
# paired int8/int4 - bf16 differences over seeds -> RUN_DIR/metrics/study.json, reports/study.md (docs/study.md).
# Completed seeds are reused. make study [SEEDS="1 2 3 4"] [RUN_DIR=.smoke] [STUDY_ARGS="--jobs 2 | --no-run"]
.PHONY: study
SEEDS ?= 1 2 3
study: setup
	$(BIN)/python -m edgerlhf.study --dir "$(RUN_DIR)" --seeds $(SEEDS) $(STUDY_ARGS)

# reward/KL/loss curves and proxy-vs-gold against KL (dvc.yaml `plots:`) as HTML in RUN_DIR/reports/plots/
# (make plots RUN_DIR=.smoke for the offline run); reports/summary.md embeds PNG charts of the headline numbers.
plots: setup
	cd "$(RUN_DIR)" && dvc plots show -o reports/plots

# Speed and memory per stage at distilgpt2 / Qwen2.5-0.5B shapes (random weights, no download) -> metrics/bench.json
# (+ metrics/bench_info.json). Full size under hardware.vram_budget_gb on a GPU; reduced automatically on CPU.
# make bench [BENCH_ARGS="--shapes distilgpt2 --precisions int4 --steps 5"]
bench: setup
	$(BIN)/python -m edgerlhf.bench $(BENCH_ARGS)

# Every stage for real (sft, reward@bf16/int8/int4, ppo@P, evaluate, + ppo@int4 in fp16) at distilgpt2 shapes on
# HH-shaped text under hardware.vram_budget_gb, <= 10 min on one GPU -> metrics/gpu_check.json (docs/gpu-check.md).
# Without CUDA: a reduced CPU mode (a few minutes; not GPU figures). make gpu-check [GPU_CHECK_ARGS="--reduced"]
gpu-check: setup
	$(BIN)/python -m edgerlhf.gpu_check $(GPU_CHECK_ARGS)

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

# Use what a run trained (docs/generate-export.md). RUN_DIR (above): the run's root (.smoke for make smoke).

# make generate PROMPT="What color is the sky?" [POLICY=ppo@int4 | COMPARE=1] [RUN_DIR=.smoke] [ARGS="--seed 1"];
# without PROMPT the prompts are read from stdin, one per line (or ARGS="--file prompts.txt").
generate: setup
	$(BIN)/python -m edgerlhf.generate --root "$(RUN_DIR)" $(if $(POLICY),--policy "$(POLICY)") \
	    $(if $(COMPARE),--compare) $(ARGS) $(if $(PROMPT),-- "$$PROMPT")

# Standalone Hugging Face folders RUN_DIR/exports/ppo-P (PPO adapter merged, chat template, model card). Not a
# dvc.yaml stage: full weights per precision would be stored again in the DVC cache.
# make export [PRECISION=int4] [RUN_DIR=.smoke] [ARGS="--push-to-hub you/edgerlhf-ppo-int4 --license mit"]
export: setup
	$(BIN)/python -m edgerlhf.export --root "$(RUN_DIR)" $(if $(PRECISION),--precision "$(PRECISION)") $(ARGS)

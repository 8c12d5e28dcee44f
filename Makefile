# One command to set up and run the main job, one to set up and run the tests (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed without their dependency sets, which pin 200+ packages the engine does not use; the
# packages they really import are in pyproject.toml.
NO_DEPS := stable-audio-tools==0.0.19 k-diffusion==0.1.1 laion-clap==1.1.7 dctorch==0.1.2 clean-fid==0.1.35 clip-anytorch==2.6.0

.PHONY: setup demo test lint browser
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(NO_DEPS)
	touch $@

demo: setup
	$(BIN)/amg demo --out out/demo

test: setup browser
	$(BIN)/python -m pytest

# A headless Chromium for the audit report's browser test (tests/test_audit.py), from the npm registry
# (@sparticuz/chromium ships the binary inside the package). Best effort: without node/npm the make
# goes on and that one test is skipped.
CHROMIUM_DIR := .cache/chromium
browser: $(CHROMIUM_DIR)/chromium.json
$(CHROMIUM_DIR)/chromium.json:
	-mkdir -p $(CHROMIUM_DIR) && cd $(CHROMIUM_DIR) && npm install --silent --no-audit --no-fund \
	  @sparticuz/chromium@153 && TMPDIR=$$(pwd) node --input-type=module -e "import c from '@sparticuz/chromium'; \
	  import fs from 'fs'; const exe = await c.executablePath(); \
	  fs.writeFileSync('chromium.json', JSON.stringify({executable: exe, args: c.args}))"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

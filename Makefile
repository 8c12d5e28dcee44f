# One command to set up and run the main job, one to set up and run the tests (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every dependency, exact and hashed (make lock writes it; README, "Set-up").
LOCK := requirements.lock

.PHONY: setup demo test lint browser lock test-latest
setup: $(VENV)/.installed

# Exactly the lock, nothing resolved: a fresh machine gets what CI tested. Then the project itself,
# editable, built with the lock's setuptools (no build isolation: nothing from outside the lock).
$(VENV)/.installed: $(LOCK) pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
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

# Regenerate the lock in a fresh environment. By default every package keeps its locked version
# (the lock is a constraint) and only what pyproject.toml added or dropped changes;
# UPGRADE="name other" lifts those packages to the newest their ranges allow, UPGRADE=all every one.
# Then `make test` (which reinstalls from the new lock) and commit the lock on its own.
LOCK_VENV := .venv-lock
UPGRADE ?=
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(PYTHON) .ci/lock.py constraints $(LOCK) $(UPGRADE) > $(LOCK_VENV)/constraints.txt
	$(LOCK_VENV)/bin/pip install -q -c $(LOCK_VENV)/constraints.txt --upgrade pip setuptools wheel
	$(LOCK_VENV)/bin/pip install -q -c $(LOCK_VENV)/constraints.txt -e '.[test]'
	$(LOCK_VENV)/bin/pip install -q -c $(LOCK_VENV)/constraints.txt --no-deps -r requirements-nodeps.in
	$(LOCK_VENV)/bin/python .ci/lock.py write $(LOCK_VENV) > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK); now run make test, then commit it on its own"

# Not CI (which must stay reproducible): a fresh environment resolved to the newest releases that
# pyproject.toml and requirements-nodeps.in allow, and the tests of every third-party integration
# (marker "integration"). Run it before changing the lock, and weekly to learn what upstream broke.
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(LATEST_VENV)/bin/pip install -q -e '.[test]'
	$(LATEST_VENV)/bin/pip install -q --no-deps --upgrade -r requirements-nodeps.in
	$(LATEST_VENV)/bin/pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	$(MAKE) browser
	$(LATEST_VENV)/bin/python -m pytest -m integration -p no:cacheprovider

# The two commands a newcomer needs: `make run` and `make test`.
#   make run [PORT=9000]   dev mode; installs only what running needs (pip install -e .)
#   make test              ruff, mypy --strict, pytest; adds the test toolchain (.[test], Node clients)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
SYSTEM := $(VENV)/.system-deps
# tests/clients/ drives the official Node clients, installed from this lock file (npm ci).
NODE_LOCK  := tests/clients/node/package-lock.json
NODE_STAMP := tests/clients/node/node_modules/.lock-sha256
PORT   ?=

.PHONY: run test lint typecheck pytest node-deps bench clean

$(RUN_STAMP): pyproject.toml
	@echo "==> $(VENV): creating a virtualenv with $(PYTHON)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> installing sts-broker and what it needs to run (pip install -e .)"
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on -e .
	touch $@

$(TEST_STAMP): $(RUN_STAMP) pyproject.toml
	@echo "==> installing the test toolchain (pip install -e '.[test]')"
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on -e '.[test]'
	touch $@

# The name this stamp had before run and test were installed apart.
$(VENV)/.installed: $(TEST_STAMP)
	touch $@

run: $(RUN_STAMP)  ## run the broker in dev mode: emulators, example policies, a printed dev key
	@echo "==> starting sts-broker dev (Ctrl-C stops it)"
	$(BIN)/sts-broker dev$(if $(PORT), --port $(PORT))

$(SYSTEM): tools/install-system-deps.sh | $(TEST_STAMP)
	bash tools/install-system-deps.sh
	touch $(SYSTEM)

# npm ci when node_modules is missing or the lock changed (the stamp holds the lock's SHA-256).
$(NODE_STAMP): $(NODE_LOCK) tools/install-node-deps.sh
	bash tools/install-node-deps.sh

node-deps: $(NODE_STAMP)  ## the Node clients tests/clients/ drives (ali-oss, @alicloud/credentials)

test: $(TEST_STAMP) $(SYSTEM) $(NODE_STAMP) lint typecheck pytest  ## ruff, mypy --strict and the whole pytest suite

lint: $(TEST_STAMP)
	$(BIN)/ruff check broker tests
	$(BIN)/ruff format --check broker

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

pytest: $(TEST_STAMP) $(SYSTEM) $(NODE_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# make bench: ratios against baselines measured in the same run (interleaved rounds, medians).
# Writes $(RESULTS), by default bench/results/latest.md (not tracked by git);
# make bench RESULTS=bench/RESULTS.md overwrites the committed results, and says so.
RESULTS ?= bench/results/latest.md
bench: $(TEST_STAMP)  ## ratios against baselines of the same run; writes $(RESULTS)
	bash tools/install-system-deps.sh
	$(BIN)/python bench/run.py --output $(RESULTS) $(if $(ROUNDS),--rounds $(ROUNDS))
	$(BIN)/python bench/fleet.py --append $(RESULTS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache tests/clients/node/node_modules

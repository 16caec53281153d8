# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SYSTEM := $(VENV)/.system-deps

.PHONY: run test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## run the broker in dev mode: emulators, example policies, a printed dev key
	$(BIN)/sts-broker dev

$(SYSTEM): tools/install-system-deps.sh | $(STAMP)
	bash tools/install-system-deps.sh
	touch $(SYSTEM)

test: $(STAMP) $(SYSTEM) lint typecheck pytest  ## ruff, mypy --strict and the whole pytest suite

lint: $(STAMP)
	$(BIN)/ruff check broker tests
	$(BIN)/ruff format --check broker

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) $(SYSTEM)
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)  ## ratios against baselines measured in the same run; writes bench/RESULTS.md
	bash tools/install-system-deps.sh
	$(BIN)/python bench/run.py
	$(BIN)/python bench/fleet.py --append bench/RESULTS.md

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

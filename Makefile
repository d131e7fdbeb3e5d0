# Set-up and checks on a fresh machine (Python 3.11, no torch installed):
#   make demo   install into .venv, then reweight the shipped 5,000-household fixture to 1,000
#   make test   install into .venv (with the dev extra), then run the test suite without the
#               tests marked slow (minutes); `make test-all` runs those too (as CI does)
# torch is installed first, pinned by constraints.txt to the local CPU wheel.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
STAMP := $(VENV)/.l0calib-installed

.PHONY: install demo test test-all lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

FIXTURE := data/fixtures/survey_5k

demo: $(STAMP)
	mkdir -p build/demo
	$(VENV)/bin/l0calib reweight $(FIXTURE)/households.parquet $(FIXTURE)/targets.csv \
		--persons $(FIXTURE)/persons.parquet --target-records 1000 --holdout-fraction 0.1 \
		-o build/demo/households_1000.parquet --force

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache .mypy_cache *.egg-info

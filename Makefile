# Every target that runs code creates or refreshes .venv itself, so a fresh clone needs only
# `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint unit bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/cmsync demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict consumer bench

unit: venv
	$(BIN)/pytest -q -n 4

test: lint unit

bench: venv
	$(BIN)/python -m bench

chaos: venv
	CMSYNC_CHAOS=1 $(BIN)/pytest -q -n 3 tests/faults

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Every target that runs code creates or refreshes .venv itself, so a fresh clone needs only
# `make demo` or `make test`.
#
# Dependencies come from the hashed locks in requirements/ (runtime.txt: what the image ships;
# build.txt: the build backend; dev.txt: all of that plus the test and lint tools), installed
# with --require-hashes; the project itself goes on top with --no-deps --no-build-isolation, so
# nothing unlocked is ever installed. `make lock` rewrites the locks from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCKS  := requirements/runtime.txt requirements/build.txt requirements/dev.txt
# uv resolves once for every platform and Python 3.11+ (--universal), so the same lock serves
# CI (x86_64), the image (amd64 or arm64) and a developer's laptop.
UV_COMPILE := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 \
	--generate-hashes --no-header --custom-compile-command "make lock"

.PHONY: venv demo test lint unit bench chaos lock manifests clean

# Re-runs when pyproject.toml or a lock changes. PIP_FIND_LINKS and extra indexes a machine may
# configure stay usable: with hashes pip accepts only the locked files, whatever their source.
$(STAMP): pyproject.toml $(LOCKS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/cmsync demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict consumer bench tests

unit: venv
	$(BIN)/pytest -q -n 4

test: lint unit

bench: venv
	$(BIN)/python -m bench

chaos: venv
	CMSYNC_CHAOS=1 $(BIN)/pytest -q -n 3 tests/faults

# Rewrites the locks: after changing a dependency in pyproject.toml, or to take upgrades
# (`make lock UV_FLAGS=--upgrade`). The dev lock is constrained by the other two, so the tests
# run the exact versions the image ships.
lock: venv
	$(UV_COMPILE) $(UV_FLAGS) pyproject.toml -o requirements/runtime.txt
	$(UV_COMPILE) $(UV_FLAGS) requirements/build.in -o requirements/build.txt
	$(UV_COMPILE) $(UV_FLAGS) pyproject.toml requirements/build.in --extra dev \
		-c requirements/runtime.txt -c requirements/build.txt -o requirements/dev.txt

# Rewrites the generated Kubernetes files from alerts/ and dashboards/ (tests/test_ops.py
# fails when they are stale).
manifests: venv
	$(BIN)/python k8s/components/render.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Two entry points for a fresh machine: `make demo` and `make test`.
# Both build .venv from scratch; torch is pinned first so nothing pulls the CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-checkpoints test lint bench-scan clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

demo-checkpoints: $(STAMP)
	$(BIN)/python scripts/demo_checkpoints.py

lint: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# The competitors (the `bench` extra, exact pins) get their own venv, torch pinned first as
# above, so they cannot change .venv; the runner itself runs in .venv.
bench-scan: $(STAMP)
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet --upgrade pip
	.venv-bench/bin/python -m pip install --quiet $(TORCH_PIN)
	.venv-bench/bin/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.scan --out benchmarks/scan/results --big-gb 1

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache

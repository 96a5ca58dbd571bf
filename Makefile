# Lightbox: `make run` sets up and serves with sample data; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck unit bench system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)
	$(BIN)/python scripts/fetch_viewer.py

run: install
	$(BIN)/lightbox demo

lint: install
	$(BIN)/ruff check src tests benchmarks

typecheck: install
	$(BIN)/mypy

unit: install system-deps
	$(BIN)/pytest -q -n 2 --dist loadfile

test: system-deps lint typecheck unit

system-deps:
	bash scripts/system-deps.sh

bench: install system-deps
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/qido_scale.py
	$(BIN)/python benchmarks/dimse.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-work

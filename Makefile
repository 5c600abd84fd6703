# The two commands of the README: `make run` and `make test`.
PY := .venv/bin/python
DATA_DIR ?= ./fallback-data

.PHONY: run test lint deps-run deps-test bench clean

run: deps-run
	.venv/bin/fallback up --demo --data-dir $(DATA_DIR)

test: deps-test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: deps-test
	.venv/bin/ruff check .
	.venv/bin/mypy

deps-run:
	./deploy/install-deps.sh run

deps-test:
	./deploy/install-deps.sh test

clean:
	rm -rf .venv .tools .pytest_cache .mypy_cache .ruff_cache

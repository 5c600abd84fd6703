# The two commands of the README: `make run` and `make test`.
PY := .venv/bin/python
DATA_DIR ?= ./fallback-data

.PHONY: run test test-cluster lint deps-run deps-test bench bench-deps clean

run: deps-run
	.venv/bin/fallback up --demo --data-dir $(DATA_DIR)

test: deps-test
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole suite again, on a real 3-primary Redis Cluster the fixtures start.
test-cluster: deps-test
	FALLBACK_TEST_REDIS=cluster $(PY) -m pytest $(PYTEST_ARGS)

lint: deps-test
	.venv/bin/ruff check .
	.venv/bin/mypy

deps-run:
	./deploy/install-deps.sh run

deps-test:
	./deploy/install-deps.sh test

# The benchmarks need the test dependencies (redis-server, smtp-source/smtp-sink) and zstandard.
bench-deps: deps-test
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,bench]"

clean:
	rm -rf .venv .tools .pytest_cache .mypy_cache .ruff_cache

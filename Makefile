# The two commands of the README: `make run` and `make test`.
PY := .venv/bin/python
DATA_DIR ?= ./fallback-data

.PHONY: run test test-cluster lint deps-run deps-test bench bench-deps clean translations

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

# The benchmarks need the test dependencies (redis-server, smtp-source/smtp-sink), zstandard and
# their peer tools (imapsync where Debian has it, else mbsync: deploy/install-deps.sh bench).
bench-deps:
	./deploy/install-deps.sh bench
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,bench]"

# The webmail's catalogues (docs/webmail.md "Languages"): English strings extracted from web/*.py and
# web/templates/*.html (babel.cfg; not the admin console), each language's .po updated (new or
# changed strings come out untranslated or fuzzy: tests/test_i18n.py fails until they are
# translated), then compiled to the .mo files the webmail reads (deploy/install-deps.sh compiles too).
POT := web/translations/messages.pot
translations: deps-run
	.venv/bin/pybabel extract -F babel.cfg -k lazy_gettext -k lazy_ngettext:1,2 --sort-output \
	  --add-location=file -w 100 --project fallback-mailbox --version 0.1.0 \
	  --copyright-holder "fallback-mailbox contributors" -o $(POT) .
	.venv/bin/pybabel update -i $(POT) -d web/translations -w 100 --ignore-obsolete
	.venv/bin/pybabel compile -d web/translations --statistics

clean:
	rm -rf .venv .tools .pytest_cache .mypy_cache .ruff_cache

# The two commands of ckms: `make test` and `make demo`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ckms-installed

.PHONY: test demo kafka-up kafka-down lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

## tools the tests check ckms with, from Debian: age (its output), headless Chromium and its
## driver (the console), promtool (metric names), and the PostgreSQL server the store tests run
## (ckms.devpostgres; Debian keeps its binaries off PATH, under /usr/lib/postgresql/<major>/bin);
## apt-get installs the missing ones as root
TOOL_PACKAGES := age:age chromium:chromium chromedriver:chromium-driver promtool:prometheus
.PHONY: tools
tools:
	@missing=""; for pair in $(TOOL_PACKAGES); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null 2>&1 \
	  || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing$$missing from Debian"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && \
	        apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	  else echo "make: missing$$missing (not root): the tests that need them skip" \
	    "(the PostgreSQL ones fail, naming what to install)"; fi; fi

## make test: lint, then every test (unit and integration against a real local Kafka)
test: $(STAMP) tools
	$(BIN)/ruff check .
	$(BIN)/pytest

## make demo: the end-to-end demo (see README)
demo: $(STAMP)
	$(BIN)/ckms demo

## make bench: quick fleet benchmark (N=100, ckms vs SSH-push baseline) and idle agent footprint
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/footprint.py --duration 10

## make faults: the fault suite against a real 3-node Kafka cluster (also part of make test)
.PHONY: faults
faults: $(STAMP)
	$(BIN)/pytest tests/faults -m faults

## make wire: regenerate the published wire artifacts after a model change (docs/schemas/, the
## Go consumer's embedded copy, docs/vectors/consumer.json); tests fail while they are stale
.PHONY: wire
wire: $(STAMP)
	$(BIN)/python -m ckms.protocol.schemas
	$(BIN)/python -m tests.support.consumer_vectors

lint: $(STAMP)
	$(BIN)/ruff check .

## a local Kafka for manual use; prints its bootstrap string
kafka-up: $(STAMP)
	$(BIN)/python -m ckms.devkafka up

kafka-down: $(STAMP)
	$(BIN)/python -m ckms.devkafka down

## a local PostgreSQL for manual use; prints its URL (the password file's path on stderr)
.PHONY: postgres-up postgres-down
postgres-up: $(STAMP) tools
	$(BIN)/python -m ckms.devpostgres up

postgres-down: $(STAMP)
	$(BIN)/python -m ckms.devpostgres down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info

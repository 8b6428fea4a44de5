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

## make test: lint, then every test (unit and integration against a real local Kafka)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

## make demo: the end-to-end demo (see README)
demo: $(STAMP)
	$(BIN)/ckms demo

lint: $(STAMP)
	$(BIN)/ruff check .

## a local Kafka for manual use; prints its bootstrap string
kafka-up: $(STAMP)
	$(BIN)/python -m ckms.devkafka up

kafka-down: $(STAMP)
	$(BIN)/python -m ckms.devkafka down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info

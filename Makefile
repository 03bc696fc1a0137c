# Everyday commands. `make` or `make help` lists them.
#
# Variables (override on the command line, e.g. `make serve PORT=9000`):
#   VENV      virtualenv folder                      (.venv)
#   PORT      port for serve                         (8000)
#   WORKERS   gunicorn workers for serve             (2)
#   GEN_DIR   where bench-generate writes its files  (/tmp/patron-gen)
#   MEMBERS, TRANSACTIONS   size of the generated data (20000, 400000)
#   PG_SERVER PostgreSQL server the benchmarks create their databases on
#             (postgresql://postgres@127.0.0.1:5432)
#
# serve and worker use DATABASE_URL / REDIS_URL from the environment (embedded
# PostgreSQL / Redis when unset, like every patron command). The benchmarks create
# their own databases on PG_SERVER; see docs/benchmarks.md.

VENV ?= .venv
PYTHON_SYSTEM ?= python3
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PORT ?= 8000
WORKERS ?= 2
GEN_DIR ?= /tmp/patron-gen
MEMBERS ?= 20000
TRANSACTIONS ?= 400000
PG_SERVER ?= postgresql://postgres@127.0.0.1:5432

.DEFAULT_GOAL := help
.PHONY: help install test lint fmt typecheck check demo serve worker scheduler \
	bench-generate bench bench-purchase bench-import bench-segments bench-rules \
	bench-custom-segments clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-22s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(PY):
	$(PYTHON_SYSTEM) -m venv $(VENV)

install: $(PY) ## Create the virtualenv and install Patron with the dev tools (editable)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[dev]"

test: ## Run the CI test command (.ci/run: lint, format, types, pytest on local servers)
	.ci/run

lint: ## ruff check and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: ## Format the code and apply ruff's safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: ## mypy over the packages
	$(BIN)/mypy service rules segments campaigns

check: lint typecheck ## lint + typecheck (no database needed)

demo: ## Embedded servers, CDNOW sample data and the API on :8000
	$(BIN)/patron demo

serve: ## The HTTP API under gunicorn (PORT, WORKERS)
	$(BIN)/patron serve --port $(PORT) --workers $(WORKERS)

worker: ## An RQ worker for background jobs
	$(BIN)/patron worker

scheduler: ## The periodic-job scheduler
	$(BIN)/patron scheduler

bench-generate: ## Synthetic stores / members / transactions into GEN_DIR
	$(PY) -m bench.generate --members $(MEMBERS) --transactions $(TRANSACTIONS) --out $(GEN_DIR)

$(GEN_DIR)/transactions.csv:
	$(PY) -m bench.generate --members $(MEMBERS) --transactions $(TRANSACTIONS) --out $(GEN_DIR)

bench: bench-purchase bench-import bench-segments bench-rules bench-custom-segments ## All benchmarks (docs/benchmarks.md)

bench-purchase: ## POST /v1/events/purchases beside a bare endpoint (wrk if installed)
	$(PY) -m bench.bench_purchase --pg $(PG_SERVER)

bench-import: $(GEN_DIR)/transactions.csv ## Bulk import of GEN_DIR against plain COPY (keeps its db)
	$(PY) -m bench.bench_import --keep $(GEN_DIR)

bench-segments: ## Statistics rebuild and daily refresh, on a copy of bench-import's db
	$(VENV)/bin/python -c "import psycopg2; c = psycopg2.connect('$(PG_SERVER)/postgres'); \
	c.autocommit = True; k = c.cursor(); \
	k.execute('DROP DATABASE IF EXISTS patron_bench_seg WITH (FORCE)'); \
	k.execute('CREATE DATABASE patron_bench_seg TEMPLATE patron_bench_import')"
	$(PY) -m bench.bench_segments $(PG_SERVER)/patron_bench_seg

bench-rules: ## Rule language: compiled predicate and SQL count over 1M members
	$(PY) -m bench.bench_rules

bench-custom-segments: ## 20 custom segments refreshed over bench-rules' members
	$(PY) -m bench.bench_custom_segments --database-url $(PG_SERVER)/patron_bench_custseg

clean: ## Remove caches, build output and benchmark results
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis bench/out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

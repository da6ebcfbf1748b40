# The one way in: `make run` (the demo, end to end) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The local PostgreSQL the tests use when it answers; otherwise they start their own (pgserver).
TEST_PG ?= postgresql://postgres@127.0.0.1:5432/test
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: venv run test test-fast lint bench bench-load bench-demo clean

# A venv copied without its symlinks (or from another machine) is rebuilt, not trusted.
$(STAMP): pyproject.toml
	@$(BIN)/python -c 'import sys' 2>/dev/null || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP)

run: venv
	$(BIN)/trawl demo

test: venv
	@if [ -z "$$TRAWL_TEST_DATABASE_URL" ] && $(BIN)/python -c "import asyncio, asyncpg; asyncio.run(asyncpg.connect('$(TEST_PG)', timeout=3))" 2>/dev/null; \
	then export TRAWL_TEST_DATABASE_URL='$(TEST_PG)'; fi; \
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the slow end-to-end cases.
test-fast: venv
	$(MAKE) test PYTEST_ARGS='-m "not slow"'

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# trawl vs Scrapy vs a minimal aiohttp+selectolax crawler on a generated 20,000-page site served by nginx.
bench: venv
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { apt-get update && apt-get install -y nginx; }
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)
	$(MAKE) bench-load

# trawl's full load of 1,000,000 staged records into a 1,000,000-row table vs `psql \copy` of the same rows.
bench-load: venv
	$(BIN)/python -m benchmarks.load --database-url '$(TEST_PG:/test=/postgres)' $(BENCH_LOAD_ARGS)

# The small in-process benchmark on the demo site.
bench-demo: venv
	$(BIN)/python -m benchmarks.crawl_demo

clean:
	rm -rf .trawl .pytest_cache .mypy_cache .ruff_cache

# The one way in: `make run` (the demo, end to end) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The local PostgreSQL the tests use when it answers; otherwise they start their own (pgserver).
TEST_PG ?= postgresql://postgres@127.0.0.1:5432/test
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# `make server` / `worker` / `deploy` talk to this Prefect API unless PREFECT_API_URL (or a profile) says otherwise.
PREFECT_PORT ?= 4200
PREFECT_LOCAL_API := http://127.0.0.1:$(PREFECT_PORT)/api
# The API in use (PREFECT_API_URL from the environment or the active profile, e.g. Cloud; else the local server),
# and the `trawl` process pool there.
PREFECT_API = $$($(BIN)/prefect config view 2>/dev/null | sed -n "s/^PREFECT_API_URL='\(.*\)'.*/\1/p"); \
	export PREFECT_API_URL="$${api:-$(PREFECT_LOCAL_API)}"; \
	$(BIN)/prefect work-pool inspect trawl >/dev/null 2>&1 || $(BIN)/prefect work-pool create trawl --type process

.PHONY: venv browser test-tools run test test-fast lint bench bench-load bench-s3 bench-demo server worker deploy demo-site clean

# A venv copied without its symlinks (or from another machine) is rebuilt, not trusted.
$(STAMP): pyproject.toml
	@$(BIN)/python -c 'import sys' 2>/dev/null || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP)

run: venv browser
	$(BIN)/trawl demo

test: venv test-tools
	@if [ -z "$$TRAWL_TEST_DATABASE_URL" ] && $(BIN)/python -c "import asyncio, asyncpg; asyncio.run(asyncpg.connect('$(TEST_PG)', timeout=3))" 2>/dev/null; \
	then export TRAWL_TEST_DATABASE_URL='$(TEST_PG)'; fi; \
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian's Chromium for `browser` sources (Playwright cannot download browsers here; TRAWL_BROWSER_PATH
# points elsewhere).
browser:
	@[ -n "$$TRAWL_BROWSER_PATH" ] || [ -x /usr/lib/chromium/chromium ] || \
	{ apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }

# What else the tests need from Debian: promtool and the Pushgateway for the metrics tests.
test-tools: browser
	@missing=""; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v prometheus-pushgateway >/dev/null 2>&1 || missing="$$missing prometheus-pushgateway"; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; fi

# Everything but the slow end-to-end cases.
test-fast: venv
	$(MAKE) test PYTEST_ARGS='-m "not slow"'

# Style, types, and the layers and no-cycles contracts of pyproject.toml's [tool.importlinter].
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# trawl vs a minimal aiohttp+selectolax crawler (the ceiling) vs Scrapy tuned and plain, on three generated
# 20,000-page sites (default 15-30 KB pages, large ~60 KB, small ~5 KB) served by nginx, one table per site.
# BENCH_ARGS passes options, e.g. BENCH_ARGS='--sites default --repeat 3' (python -m benchmarks.run --help).
bench: venv browser
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { apt-get update && apt-get install -y nginx; }
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)
	$(MAKE) bench-startup
	$(BIN)/python -m benchmarks.browser
	$(BIN)/python -m benchmarks.trawl_spider
	$(MAKE) bench-load
	$(MAKE) bench-s3
	$(MAKE) bench-frontier
	$(MAKE) bench-shards

# trawl's full load of 1,000,000 staged records into a 1,000,000-row table vs `psql \copy` of the same rows.
bench-load: venv
	$(BIN)/python -m benchmarks.load --database-url '$(TEST_PG:/test=/postgres)' $(BENCH_LOAD_ARGS)

# S3 staging: 1,000,000 small records into moto's server on loopback (records/s, peak RSS), and raw upload MB/s.
bench-s3: venv
	$(BIN)/python -m benchmarks.s3 $(BENCH_S3_ARGS)

# The durable frontier in PostgreSQL: add/claim URLs/s at 1,000,000 URLs, a crawler's peak RSS at a 10k vs a ~1M
# frontier, and the in-memory frontier's bytes per seen URL.
.PHONY: bench-frontier
bench-frontier: venv
	$(BIN)/python -m benchmarks.frontier --database-url '$(TEST_PG:/test=/postgres)' $(BENCH_FRONTIER_ARGS)

# A sharded crawl (`shards: 2`, hosts leased from the PostgreSQL frontier) against the same crawl in one process:
# 4 hosts x 20,000 pages, wall times and their ratio, both in one run.
.PHONY: bench-shards
bench-shards: venv
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { apt-get update && apt-get install -y nginx; }
	$(BIN)/python -m benchmarks.shards --database-url '$(TEST_PG:/test=/postgres)' $(BENCH_SHARDS_ARGS)

# `trawl crawl` from launch to its first request: Prefect's temporary server vs a running `prefect server start`.
.PHONY: bench-startup
bench-startup: venv
	$(BIN)/python -m benchmarks.startup $(BENCH_STARTUP_ARGS)

# The small in-process benchmark on the demo site.
bench-demo: venv
	$(BIN)/python -m benchmarks.crawl_demo

# A local Prefect server (SQLite in ~/.prefect, UI at http://127.0.0.1:4200).
server: venv
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# A process worker for the `trawl` pool (created if missing); flow runs inherit this shell's TRAWL_* settings.
# WORKER_ARGS passes more options, e.g. WORKER_ARGS="--limit 1 --name shard-a".
# It polls for runs every 2 s (Prefect's default is 10 s): shard runs, and the replacement of a crashed one, start
# within seconds of the crawl flow asking for them.
WORKER_QUERY_SECONDS ?= 2
worker: venv
	@api=$(PREFECT_API); \
	export PREFECT_WORKER_QUERY_SECONDS="$${PREFECT_WORKER_QUERY_SECONDS:-$(WORKER_QUERY_SECONDS)}"; \
	exec $(BIN)/prefect worker start --pool trawl $(WORKER_ARGS)

# Every deployment in prefect.yaml (the `trawl` pool is created if missing).
deploy: venv
	@api=$(PREFECT_API); \
	$(BIN)/prefect --no-prompt deploy --all

# The demo site on 127.0.0.1:8080, for the `*/demo` deployments.
demo-site: venv
	$(BIN)/python -m trawl.demo

clean:
	rm -rf .trawl .pytest_cache .mypy_cache .ruff_cache

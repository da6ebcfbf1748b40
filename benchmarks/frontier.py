"""The durable frontier (PostgreSQL) and the in-memory one: `make bench-frontier` (part of `make bench`).

    python -m benchmarks.frontier [--urls 1000000] [--pages 10000] [--only pg,crawl,memory]
        [--database-url postgresql://postgres@127.0.0.1:5432/postgres]

Everything PostgreSQL holds lives in a scratch database created here and dropped
afterwards. Prints markdown tables; the timings depend on the machine, and on
this one PostgreSQL, the site server and the crawler share the same cores.

1. ``PgFrontier`` itself (schema per measurement, so each starts from an empty
   table): ``add`` of URLS distinct URLs in batches of ``frontier_batch`` (200)
   and of 1,000; one ``ANALYZE``; then ``claim(batch)`` + ``checkpoint([], keys,
   {})`` in a loop by one claimer, or by two concurrently (two ``PgFrontier``
   objects on the same run, different owners), until the frontier is empty or
   ``--claim-seconds`` have passed. Every key handed out is kept: a URL handed
   out twice is counted and fails the run. A second table shows what one claim
   costs while the planner has no statistics for the run (a new run in a table
   analysed before it began, the usual case on a long-lived database).
2. A real durable crawl (``crawl_source``, ``frontier: postgres``, local
   staging) in a fresh subprocess per case, against a generated site served by
   aiohttp in another subprocess: page ``/F/p/N`` holds one record field and
   links to ``/F/p/{N*F+1}`` … ``/F/p/{N*F+F}``. Both cases crawl the F=100 site
   (the same pages, links and parsing): *small* with ``max_pages=PAGES``, which
   bounds how many links are queued, so the frontier holds PAGES+1 URLs and the
   crawl ends by itself once they are fetched; *large* without a bound,
   cancelled once PAGES pages are fetched, by which time ~100 x PAGES URLs are in
   the frontier. Reported: pages/s up to PAGES pages, frontier rows of the run,
   and the child's peak RSS (its ``VmHWM``: on Linux, ``getrusage``/``wait4``'s
   ``ru_maxrss`` of a spawned child also counts the parent's RSS at the spawn,
   which after part 1 is larger than the crawler). Target: large ≤ small + 50 MB.
   The claim query's plan depends on the table's statistics, and autovacuum is
   off on some servers (this one), so while a crawl runs this process applies
   autovacuum's default rules to the crawl's tables every ``--naptime`` seconds
   (60, PostgreSQL's default; 0: never, as the server itself does).
3. The in-memory frontier (``HtmlConnector``, the default): in a fresh
   subprocess, RSS growth over ``_schedule()`` of URLS distinct URLs, with the
   queued ``(url, depth, requeues)`` tuples still in its queue and, in another
   subprocess, with each one taken off the queue at once, so only the seen set
   of 64-bit hashes grows. Target: ~150 B per seen URL.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from tests.helpers.databases import scratch_database

__all__ = ["main"]

SOURCE = "bench_frontier"
SMALL_FANOUT = 100
MB = 1024 * 1024
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# ---- shared helpers --------------------------------------------------------------------------------------------


def _rss() -> int:
    """This process's resident set size now, in bytes (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_SIZE


def _peak_rss_mb() -> float:
    """This process's peak RSS since it was exec'd (``ru_maxrss`` would include its parent's at the spawn)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table, columns padded so it also reads as plain text."""
    cells = [[str(h) for h in head], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


_VERBOSE = False


def _detail(what: str, figures: dict[str, Any]) -> None:
    """A measurement's raw figures on stderr (``--verbose``)."""
    if _VERBOSE:
        print(f"{what}: {orjson.dumps(figures).decode()}", file=sys.stderr, flush=True)


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _url(i: int) -> str:
    # ~60 characters, 1,000 hosts: shaped like a shop's product URLs.
    return f"https://shop-{i % 1000}.example.com/catalogue/product-{i}.html"


def _clean_env() -> dict[str, str]:
    """The children's environment without TRAWL_* variables: their settings come from here only."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TRAWL_")}


def _child(args: list[str]) -> dict[str, Any]:
    """Run ``python -m benchmarks.frontier ARGS`` and return its last stdout line, JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.frontier", *args], stdout=subprocess.PIPE, env=_clean_env(), check=False
    )
    status, out = proc.returncode, proc.stdout
    lines = out.strip().splitlines()
    if status != 0 or not lines:
        sys.stderr.write(out.decode(errors="replace"))
        raise SystemExit(f"benchmark child {args[:2]} failed with status {status}")
    for extra in lines[:-1]:  # log lines at WARNING and above: shown, not parsed
        sys.stderr.write(extra.decode(errors="replace") + "\n")
    figures: dict[str, Any] = orjson.loads(lines[-1])
    return figures


async def _autovacuum_round(conn: asyncpg.Connection, schema: str) -> list[str]:
    """One pass of autovacuum's default rules over a schema's tables; returns what it ran.

    VACUUM when dead rows exceed 50 + 20% of the table's rows, or rows inserted since the last
    vacuum exceed 1,000 + 20%; ANALYZE when rows changed since the last analyse exceed 50 + 10%.
    """
    rows = await conn.fetch(
        "SELECT quote_ident(s.schemaname) || '.' || quote_ident(s.relname) AS t, greatest(c.reltuples, 0) AS n, "
        "s.n_dead_tup AS dead, s.n_ins_since_vacuum AS ins, s.n_mod_since_analyze AS mod "
        "FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid WHERE s.schemaname = $1",
        schema,
    )
    ran = []
    for r in rows:
        if r["dead"] > 50 + 0.2 * r["n"] or r["ins"] > 1000 + 0.2 * r["n"]:
            await conn.execute(f"VACUUM {r['t']}")
            ran.append(f"VACUUM {r['t']}")
        if r["mod"] > 50 + 0.1 * r["n"]:
            await conn.execute(f"ANALYZE {r['t']}")
            ran.append(f"ANALYZE {r['t']}")
    return ran


# ---- 1. PgFrontier throughput ----------------------------------------------------------------------------------


async def _claim_loop(frontier: Any, batch: int, deadline: float) -> dict[str, Any]:
    keys: list[int] = []
    claim_s = checkpoint_s = 0.0
    calls = 0
    empty = False
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        got = await frontier.claim(batch)
        t1 = time.perf_counter()
        claim_s += t1 - t0
        if not got:
            empty = True
            break
        done = [c.key for c in got]
        await frontier.checkpoint([], done, {})
        checkpoint_s += time.perf_counter() - t1
        keys += done
        calls += 1
    return {"keys": keys, "claim_s": claim_s, "checkpoint_s": checkpoint_s, "calls": calls, "empty": empty}


async def _pg_case(dsn: str, urls: list[str], batch: int, claimers: int, claim_seconds: float) -> dict[str, Any]:
    from trawl.frontier import PgFrontier

    schema = f"bench_b{batch}_c{claimers}"
    run_id = f"bench-b{batch}-c{claimers}"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=claimers + 1)  # one connection per claimer, as crawlers
    try:
        frontiers = [
            PgFrontier(pool, schema, run_id, SOURCE, owner=f"claimer-{k}", lease_seconds=3600) for k in range(claimers)
        ]
        await frontiers[0].setup()
        t0 = time.perf_counter()
        new = 0
        for i in range(0, len(urls), batch):
            new += await frontiers[0].add([(u, 1) for u in urls[i : i + batch]])
        insert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        await pool.execute(f"ANALYZE {schema}._frontier")
        analyze_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        deadline = t0 + claim_seconds
        loops = await asyncio.gather(*(_claim_loop(f, batch, deadline) for f in frontiers))
        claim_wall = time.perf_counter() - t0
        handed = [k for lp in loops for k in lp["keys"]]
        distinct = len(set(handed))
        counts = await frontiers[0].counts()
        calls = sum(lp["calls"] for lp in loops)
        return {
            "batch": batch,
            "claimers": claimers,
            "urls": len(urls),
            "inserted": new,
            "insert_s": insert_s,
            "analyze_s": analyze_s,
            "claimed": len(handed),
            "claim_wall_s": claim_wall,
            "emptied": all(lp["empty"] for lp in loops),
            "duplicates": len(handed) - distinct,
            "done_in_db": counts.get("done", 0),
            "leased_in_db": counts.get("leased", 0),
            "ms_per_claim": 1000 * sum(lp["claim_s"] for lp in loops) / max(1, calls),
            "ms_per_checkpoint": 1000 * sum(lp["checkpoint_s"] for lp in loops) / max(1, calls),
        }
    finally:
        await pool.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await pool.close()


async def _planner_case(dsn: str, sizes: list[int], batch: int) -> list[dict[str, Any]]:
    """claim(batch) while the planner has no statistics for the run, at growing sizes; then after ANALYZE."""
    from trawl.frontier import PgFrontier

    schema = "bench_planner"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    out: list[dict[str, Any]] = []
    try:
        old = PgFrontier(pool, schema, "earlier-run", SOURCE)
        await old.setup()
        await old.add([(_url(i), 1) for i in range(10_000)])
        await pool.execute(f"ANALYZE {schema}._frontier")  # the table's statistics: of an earlier run only
        new = PgFrontier(pool, schema, "new-run", SOURCE)
        have = 0
        for size in sizes:
            for i in range(have, size, 1000):
                await new.add([(_url(j), 1) for j in range(i, min(size, i + 1000))])
            have = size
            t0 = time.perf_counter()
            got = await new.claim(batch)
            out.append(
                {"rows": size, "stats": "earlier run only", "ms": 1000 * (time.perf_counter() - t0), "n": len(got)}
            )
        await pool.execute(f"ANALYZE {schema}._frontier")
        t0 = time.perf_counter()
        got = await new.claim(batch)
        out.append({"rows": have, "stats": "after ANALYZE", "ms": 1000 * (time.perf_counter() - t0), "n": len(got)})
    finally:
        await pool.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await pool.close()
    return out


def _bench_pg(
    dsn: str,
    n: int,
    batches: list[int],
    claim_seconds: float,
    planner_sizes: list[int],
    claimer_counts: Sequence[int] = (1, 2, 4, 8),
) -> bool:
    """Part 1; False when a check failed (a URL handed out twice, not marked done, or not added)."""
    urls = [_url(i) for i in range(n)]
    rows = []
    ok = True
    for batch in batches:
        for claimers in claimer_counts:
            r = asyncio.run(_pg_case(dsn, urls, batch, claimers, claim_seconds))
            good = r["duplicates"] == 0 and r["done_in_db"] == r["claimed"] and r["inserted"] == n
            ok &= good
            rows.append(
                [
                    r["batch"],
                    r["claimers"],
                    _n(r["inserted"]),
                    f"{r['insert_s']:.1f}",
                    _n(r["inserted"] / r["insert_s"]),
                    f"{r['analyze_s']:.1f}",
                    _n(r["claimed"]) + ("" if r["emptied"] else " (time budget)"),
                    f"{r['claim_wall_s']:.1f}",
                    _n(r["claimed"] / r["claim_wall_s"]),
                    f"{r['ms_per_claim']:.1f}",
                    f"{r['ms_per_checkpoint']:.1f}",
                    r["duplicates"],
                    "ok" if good else "FAILED",
                ]
            )
            _detail(f"pg batch={batch} claimers={claimers}", r)
    print(f"\n### 1. PgFrontier: add {_n(n)} distinct URLs, then claim + checkpoint(done)\n")
    print(
        _table(
            [
                "batch",
                "claimers",
                "added",
                "add s",
                "add URLs/s",
                "ANALYZE s",
                "claimed + done",
                "claim s",
                "claim+done URLs/s",
                "ms/claim",
                "ms/checkpoint",
                "handed out twice",
                "check",
            ],
            rows,
        )
    )
    print(
        f"\nOne schema (empty table) per row; `ANALYZE` after the adds; claiming stops when the frontier is empty "
        f'or after {claim_seconds:g} s ("time budget"). ms/claim and ms/checkpoint are per call, averaged over '
        "the claimers. check: no key handed out twice, every claimed URL `done` in the table, every URL added."
    )
    if planner_sizes:
        p = asyncio.run(_planner_case(dsn, planner_sizes, batches[0]))
        print(f"\n### 1b. One claim({batches[0]}) of a new run, in a table analysed before that run began\n")
        print(
            _table(
                ["run's rows", "statistics", "claim ms", "claimed"],
                [[_n(r["rows"]), r["stats"], f"{r['ms']:,.1f}", r["n"]] for r in p],
            )
        )
    return ok


# ---- 1c. host leases (sharded runs) ----------------------------------------------------------------------------


async def _hosts_case(dsn: str, hosts: int, claimers: int, held: int, seconds: float) -> dict[str, Any]:
    """``claimers`` shards leasing hosts of one run: claim_hosts(1) until none is left, then, holding ``held`` hosts
    each, heartbeats (renew every held host's lease, saving its state), then release_hosts of everything held."""
    from trawl.frontier import PgFrontier
    from trawl.records import utcnow

    schema = f"bench_hosts_c{claimers}"
    run_id = f"bench-hosts-c{claimers}"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=claimers + 1)
    state = {"rate": {"limit": 4.0, "extra": 0.0, "delay": 0.0, "windows": 0}, "breaker": {"state": "closed"}}
    try:
        shards = [
            PgFrontier(pool, schema, run_id, SOURCE, shard=k, shards=max(2, claimers), owner=f"s{k}")
            for k in range(claimers)
        ]
        await shards[0].setup()
        await shards[0].begin(utcnow(), [f"http://h{i}.bench/p/0" for i in range(hosts)])
        await pool.execute(f"ANALYZE {schema}._frontier; ANALYZE {schema}._frontier_hosts")

        async def claim(f: PgFrontier) -> tuple[int, int]:
            got = calls = 0
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                n = len(await f.claim_hosts(1))
                calls += 1
                if not n:
                    break
                got += n
            return got, calls

        t0 = time.perf_counter()
        claimed = await asyncio.gather(*(claim(f) for f in shards))
        claim_s = time.perf_counter() - t0
        total = sum(g for g, _ in claimed)
        owners = await pool.fetchval(
            f"SELECT count(*) FROM {schema}._frontier_hosts WHERE run_id = $1 AND owner IS NOT NULL", run_id
        )
        for f in shards:  # each keeps `held` hosts for the renew/release phases
            f.held = set(sorted(f.held)[:held])

        async def renew(f: PgFrontier) -> int:
            n = 0
            deadline = time.perf_counter() + min(seconds, 5.0)
            states = dict.fromkeys(f.held, state)
            while time.perf_counter() < deadline:
                await f.heartbeat(states)
                n += 1
            return n

        t0 = time.perf_counter()
        beats = sum(await asyncio.gather(*(renew(f) for f in shards)))
        renew_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        released = 0
        for f in shards:
            released += len(f.held)
        await asyncio.gather(*(f.release_hosts(dict.fromkeys(f.held, state)) for f in shards))
        release_s = time.perf_counter() - t0
        return {
            "claimers": claimers,
            "hosts": hosts,
            "claimed": total,
            "twice": total - owners,
            "claim_s": claim_s,
            "claims_per_s": sum(c for _, c in claimed) / claim_s,
            "held": held,
            "heartbeats_per_s": beats / renew_s,
            "host_renewals_per_s": beats * held / renew_s,
            "released": released,
            "releases_per_s": released / release_s,
        }
    finally:
        await pool.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await pool.close()


def _bench_hosts(dsn: str, hosts: int, claimer_counts: Sequence[int], seconds: float) -> bool:
    rows = []
    ok = True
    for claimers in claimer_counts:
        r = asyncio.run(_hosts_case(dsn, hosts, claimers, 50, seconds))
        good = r["twice"] == 0
        ok &= good
        rows.append(
            [
                claimers,
                _n(r["claimed"]),
                _n(r["claims_per_s"]),
                _n(r["heartbeats_per_s"]),
                _n(r["host_renewals_per_s"]),
                _n(r["releases_per_s"]),
                r["twice"],
                "ok" if good else "FAILED",
            ]
        )
        _detail(f"hosts claimers={claimers}", r)
    print(f"\n### 1c. Host leases of a sharded run: {_n(hosts)} hosts with one queued URL each\n")
    print(
        _table(
            [
                "shards",
                "hosts leased",
                "host claims/s",
                "heartbeats/s (50 hosts each)",
                "host leases renewed/s",
                "hosts released/s",
                "leased twice",
                "check",
            ],
            rows,
        )
    )
    print(
        "\nclaim_hosts(1) in a loop per shard until no host is left (or the time budget); then each shard keeps 50 "
        "hosts and heartbeats (URL leases, 50 host leases with their saved state, its sign of life) for 5 s; then "
        "every shard gives its 50 hosts back at once with their state. A real shard claims hosts a few times a "
        "minute and heartbeats every 10 s: these rates are the ceiling, not the load."
    )
    return ok


# ---- 2. crawler RSS at a small and a large frontier ------------------------------------------------------------


def _serve_site() -> None:
    """The generated site on a free 127.0.0.1 port (printed first), until killed."""
    from aiohttp import web

    async def page(request: web.Request) -> web.Response:
        f = int(request.match_info["f"])
        n = int(request.match_info["n"])
        first = n * f + 1
        links = "".join(f'<li><a href="/{f}/p/{m}">item {m}</a></li>' for m in range(first, first + f))
        body = (
            f"<!doctype html><html><head><title>Page {n}</title></head><body>"
            f'<h1 class="name">Item {n}</h1><ul>{links}</ul></body></html>'
        )
        return web.Response(text=body, content_type="text/html")

    async def serve() -> None:
        app = web.Application()
        app.router.add_get(r"/{f:\d+}/p/{n:\d+}", page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # a free port, bound before it is announced: no race with other processes
        await web.SockSite(runner, sock, backlog=1024).start()
        print(sock.getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


async def _child_crawl(opts: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: one durable crawl; stops by itself (max_pages) or is cancelled at ``pages`` pages."""
    from sinks.stage import LocalStager
    from trawl.config import FollowRules, HtmlField, HtmlSource
    from trawl.connectors.base import SourceStats
    from trawl.crawler import crawl_source
    from trawl.errors import SourceFailed
    from trawl.fetch import Fetcher
    from trawl.logs import configure_logging
    from trawl.settings import Settings

    configure_logging("json", "WARNING")
    pages = opts["pages"]
    settings = Settings(
        database_url=opts["dsn"],
        db_schema=opts["schema"],
        allowed_networks=["127.0.0.0/8"],
        per_host_concurrency=opts["concurrency"],
        total_concurrency=opts["concurrency"],
        max_pages=pages if opts["bounded"] else None,
    )
    source = HtmlSource(
        kind="html",
        name=SOURCE,
        start_urls=[f"{opts['site']}/{opts['fanout']}/p/0"],
        follow=FollowRules(allow=[r"/p/\d+$"], max_depth=1000),
        fields={"name": HtmlField(selector="h1.name", required=True)},
        robots=False,
        frontier="postgres",
    )
    stats = SourceStats()
    rss_start = _rss()
    how = "finished"
    reached: float | None = None
    with tempfile.TemporaryDirectory(prefix="trawl-bench-frontier-") as tmp:
        async with Fetcher(settings) as fetcher:
            t0 = time.perf_counter()
            task = asyncio.create_task(
                crawl_source(
                    source,
                    run_id=opts["run_id"],
                    settings=settings,
                    fetcher=fetcher,
                    stager=LocalStager(Path(tmp)),
                    stats=stats,
                )
            )
            while not task.done():
                await asyncio.wait({task}, timeout=0.01)
                elapsed = time.perf_counter() - t0
                if reached is None and stats.pages >= pages:
                    reached = elapsed
                    if not opts["bounded"]:
                        how = f"cancelled at {stats.pages:,} pages"
                        task.cancel()
                if not task.done() and not task.cancelling() and elapsed > opts["timeout"]:
                    how = f"TIMED OUT after {opts['timeout']:g} s"
                    task.cancel()
            total = time.perf_counter() - t0
            try:
                await task
            except asyncio.CancelledError:
                pass
            except SourceFailed as exc:
                how = f"failed: {exc.result.error}"
    return {
        "pages": stats.pages,
        "records": stats.records,
        "seconds_to_target": reached,
        "seconds_total": total,
        "how": how,
        "rss_start_mb": rss_start / MB,
        "peak_rss_mb": _peak_rss_mb(),
        "failures": stats.failures,
    }


async def _frontier_rows(dsn: str, schema: str, run_id: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        r = await conn.fetchrow(
            f"SELECT count(*) AS n, count(*) FILTER (WHERE state = 'done') AS done FROM {schema}._frontier "
            "WHERE run_id = $1",
            run_id,
        )
        ck = await conn.fetchval(f"SELECT sum(checkpoints) FROM {schema}._frontier_shards WHERE run_id = $1", run_id)
        return {"rows": r["n"], "done": r["done"], "checkpoints": ck or 0}
    finally:
        await conn.close()


async def _autovacuum_while(dsn: str, schema: str, pid: int, naptime: float) -> tuple[Any, list[str]]:
    """Wait for the child ``pid`` (its rusage), applying autovacuum's rules to ``schema`` every ``naptime`` s."""
    conn = await asyncpg.connect(dsn)
    ran: list[str] = []
    next_round = time.monotonic() + naptime
    try:
        while True:
            done_pid, status, usage = os.wait4(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
            if done_pid:
                if status != 0:
                    raise SystemExit(f"crawl child failed with status {status}")
                return usage, ran
            if naptime > 0 and time.monotonic() >= next_round:
                ran += await _autovacuum_round(conn, schema)
                next_round = time.monotonic() + naptime
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def _crawl_case(dsn: str, site: str, bounded: bool, args: argparse.Namespace) -> dict[str, Any]:
    schema = "bench_crawl_small" if bounded else "bench_crawl_large"
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    opts = {
        "dsn": dsn,
        "schema": schema,
        "site": site,
        "fanout": SMALL_FANOUT,
        "pages": args.pages,
        "bounded": bounded,
        "concurrency": args.concurrency,
        "run_id": run_id,
        "timeout": args.crawl_timeout,
    }
    with tempfile.TemporaryFile() as stdout:  # a file, not a pipe: its log lines cannot fill a pipe while we wait
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.frontier", "--child-crawl", orjson.dumps(opts).decode()],
            stdout=stdout,
            env=_clean_env(),
        )
        usage, ran = asyncio.run(_autovacuum_while(dsn, schema, proc.pid, args.naptime))
        stdout.seek(0)
        lines = stdout.read().strip().splitlines()
    for extra in lines[:-1]:
        sys.stderr.write(extra.decode(errors="replace") + "\n")
    r: dict[str, Any] = orjson.loads(lines[-1])
    r["cpu_s"] = usage.ru_utime + usage.ru_stime
    r.update(asyncio.run(_frontier_rows(dsn, schema, run_id)))
    r["autovacuum"] = ran
    _detail(f"crawl bounded={bounded}", r)
    return r


def _bench_crawl(dsn: str, args: argparse.Namespace, targets: list[list[str]]) -> bool:
    """Part 2; False when a crawl did not reach its page count. Its target goes to ``targets``."""
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.frontier", "--serve-site"], stdout=subprocess.PIPE, env=_clean_env()
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        site = f"http://127.0.0.1:{port}"
        small = _crawl_case(dsn, site, True, args)
        large = _crawl_case(dsn, site, False, args)
    finally:
        server.terminate()
        server.wait(10)
    rows = []
    for name, r in (("small", small), ("large", large)):
        to = r["seconds_to_target"]
        rows.append(
            [
                name,
                r["how"],
                _n(r["pages"]),
                r["failures"],
                f"{to:.1f}" if to else "-",
                _n(args.pages / to) if to else "-",
                _n(r["rows"]),
                r["checkpoints"],
                f"{r['cpu_s']:.1f}",
                f"{r['rss_start_mb']:.0f}",
                f"{r['peak_rss_mb']:.0f}",
            ]
        )
    print(
        f"\n### 2. Durable crawl of the F={SMALL_FANOUT} site to {_n(args.pages)} pages "
        f"({args.concurrency} in flight), one fresh process each\n"
    )
    print(
        _table(
            [
                "frontier",
                "how it ended",
                "pages",
                "failed URLs",
                f"s to {_n(args.pages)} pages",
                "pages/s",
                "frontier rows",
                "checkpoints",
                "child CPU s",
                "RSS at start MB",
                "peak RSS MB",
            ],
            rows,
        )
    )
    ok = bool(small["seconds_to_target"] and large["seconds_to_target"])
    delta = large["peak_rss_mb"] - small["peak_rss_mb"]
    within = delta <= 50
    print(
        f"\nsmall: `max_pages={args.pages}` bounds the links queued, so the frontier holds the seed + {_n(args.pages)} "
        f"URLs and the crawl ends by itself (final checkpoint and manifest included in its wall time). large: no "
        f"bound; cancelled once {_n(args.pages)} pages were fetched (links still buffered in the process then are "
        "not in the table). pages/s: the target page count / seconds until it was reached. RSS at start: after "
        "imports, before the crawl. Autovacuum stand-in: "
        + (f"autovacuum's default rules on the crawl's tables every {args.naptime:g} s" if args.naptime > 0 else "none")
        + f"; it ran: small {small['autovacuum'] or 'nothing'}, large {large['autovacuum'] or 'nothing'}."
    )
    targets.append(
        [
            f"crawler peak RSS, {_n(large['rows'])} vs {_n(small['rows'])} frontier rows",
            "at most +50 MB",
            f"{delta:+.0f} MB ({large['peak_rss_mb']:.0f} vs {small['peak_rss_mb']:.0f} MB)",
            "met" if within else "MISSED",
        ]
    )
    return ok


# ---- 3. the in-memory frontier ---------------------------------------------------------------------------------


async def _child_memory(n: int, drain_as_you_go: bool) -> dict[str, Any]:
    from trawl.config import HtmlField, HtmlSource
    from trawl.connectors.base import SourceContext
    from trawl.connectors.html import HtmlConnector
    from trawl.fetch import Fetcher
    from trawl.records import Outcome
    from trawl.settings import Settings

    async def emit(outcome: Outcome) -> None:
        return None

    settings = Settings()
    source = HtmlSource(
        kind="html",
        name=SOURCE,
        start_urls=["https://shop-0.example.com/"],
        fields={"name": HtmlField(selector="h1")},
    )
    conn = HtmlConnector(source, SourceContext("bench", settings, Fetcher(settings), emit))
    queue = conn.frontier.claims
    schedule = conn._schedule
    for i in range(1000):  # warm up: first allocations of the queue and the set
        schedule(f"https://warm.example.com/{i}", 1)
    while not queue.empty():
        queue.get_nowait()
    gc.collect()
    before = _rss()
    url_bytes = 0
    for i in range(n):
        url = _url(i)
        url_bytes += len(url)
        schedule(url, 1)
        if drain_as_you_go:
            queue.get_nowait()
    del url
    gc.collect()
    after = _rss()
    queued = queue.qsize()
    while not queue.empty():
        queue.get_nowait()
    gc.collect()
    drained = _rss()
    return {
        "urls": n,
        "seen": len(conn._seen) - 1000,
        "queued": queued,
        "avg_url_chars": url_bytes / n,
        "rss_before_mb": before / MB,
        "grown_bytes": after - before,
        "grown_after_drain_bytes": drained - before,
        "set_table_bytes": sys.getsizeof(conn._seen),
    }


def _bench_memory(n: int, targets: list[list[str]]) -> None:
    """Part 3; its target goes to ``targets``."""
    queued = _child(["--child-memory", str(n)])
    seen_only = _child(["--child-memory", str(n), "--drain-as-you-go"])
    per_q = queued["grown_bytes"] / n
    per_q_drained = queued["grown_after_drain_bytes"] / n
    per_s: float = seen_only["grown_bytes"] / n
    print(
        f"\n### 3. In-memory frontier (HtmlConnector): {_n(n)} distinct URLs through `_schedule()`, "
        f"~{queued['avg_url_chars']:.0f} characters each\n"
    )
    print(
        _table(
            ["state", "URLs queued", "RSS growth MB", "bytes per seen URL"],
            [
                [
                    "queued: (url, depth, 0) tuples in the queue + seen set",
                    _n(queued["queued"]),
                    f"{queued['grown_bytes'] / MB:.1f}",
                    f"{per_q:.0f}",
                ],
                [
                    "the same process after draining the queue",
                    _n(0),
                    f"{queued['grown_after_drain_bytes'] / MB:.1f}",
                    f"{per_q_drained:.0f}",
                ],
                [
                    "seen set only (each URL taken off the queue at once)",
                    _n(seen_only["queued"]),
                    f"{seen_only['grown_bytes'] / MB:.1f}",
                    f"{per_s:.0f}",
                ],
            ],
        )
    )
    print(
        f"\nRSS growth from just before the first `_schedule()` to just after the last (after `gc.collect()`), "
        f"rows 1-2 in one fresh process, row 3 in another. The seen set's hash table alone: "
        f"{seen_only['set_table_bytes'] / MB:.1f} MB ({seen_only['set_table_bytes'] / n:.0f} B per URL); the rest "
        f"is one int object per hash."
    )
    targets.append(
        [
            "in-memory frontier, bytes per seen URL",
            "~150 B",
            f"{per_s:.0f} B seen set only; {per_q:.0f} B while the URL is queued",
            "met (seen set)" if per_s <= 150 else "MISSED",
        ]
    )


# ---- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from trawl.settings import Settings

    default_batch = Settings.model_fields["frontier_batch"].default
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TRAWL_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a server where a scratch database may be created (default: the local test server)",
    )
    parser.add_argument(
        "--only", default="pg,hosts,crawl,memory", help="comma-separated subset of: pg,hosts,crawl,memory"
    )
    parser.add_argument(
        "--claimers", default="1,2,4,8", help="concurrent claimers (each its own connection) in parts 1 and 1c"
    )
    parser.add_argument("--hosts", type=int, default=10_000, help="hosts of the run whose leases part 1c measures")
    parser.add_argument("--urls", type=int, default=1_000_000, help="distinct URLs added (1) and scheduled (3)")
    parser.add_argument(
        "--batch",
        type=int,
        action="append",
        help=f"batch sizes of add and claim (repeatable; default: frontier_batch={default_batch}, and 1000)",
    )
    parser.add_argument("--claim-seconds", type=float, default=30.0, help="time budget of one claim phase")
    parser.add_argument(
        "--planner-sizes",
        default="1000,10000,50000",
        help="run sizes at which one claim is timed without statistics for the run (empty: skip)",
    )
    parser.add_argument("--pages", type=int, default=10_000, help="pages each durable crawl fetches")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in the crawls")
    parser.add_argument("--crawl-timeout", type=float, default=300.0, help="seconds a crawl may take, then cancelled")
    parser.add_argument(
        "--naptime", type=float, default=60.0, help="seconds between autovacuum stand-in rounds in crawls (0: none)"
    )
    parser.add_argument("--verbose", action="store_true", help="each measurement's raw figures on stderr")
    parser.add_argument("--serve-site", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-crawl", help=argparse.SUPPRESS)
    parser.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--drain-as-you-go", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_site:
        _serve_site()
        return 0
    if args.child_crawl:
        print(orjson.dumps(asyncio.run(_child_crawl(orjson.loads(args.child_crawl)))).decode())
        return 0
    if args.child_memory:
        print(orjson.dumps(asyncio.run(_child_memory(args.child_memory, args.drain_as_you_go))).decode())
        return 0

    global _VERBOSE
    _VERBOSE = args.verbose
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    batches = list(dict.fromkeys(args.batch or [default_batch, 1000]))
    planner_sizes = [int(s) for s in args.planner_sizes.split(",") if s.strip()]
    ok = True
    targets: list[list[str]] = []
    started = time.perf_counter()
    with scratch_database(args.database_url, "trawl_bench") as dsn:
        server = asyncio.run(_server_facts(dsn))
        print(
            f"## trawl frontier benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {server}\n",
            flush=True,
        )
        claimer_counts = [int(c) for c in args.claimers.split(",") if c.strip()]
        if "pg" in only:
            ok &= _bench_pg(dsn, args.urls, batches, args.claim_seconds, planner_sizes, claimer_counts)
        if "hosts" in only:
            ok &= _bench_hosts(dsn, args.hosts, claimer_counts, args.claim_seconds)
        if "crawl" in only:
            ok &= _bench_crawl(dsn, args, targets)
        if "memory" in only:
            _bench_memory(args.urls, targets)
    if targets:
        print("\n### Targets\n")
        print(_table(["what", "target", "measured", "verdict"], targets))
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} ({time.perf_counter() - started:.0f} s in all)")
    return 0 if ok else 1


async def _server_facts(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SHOW server_version")
        facts = {k: await conn.fetchval(f"SHOW {k}") for k in ("shared_buffers", "autovacuum", "synchronous_commit")}
    finally:
        await conn.close()
    return f"PostgreSQL {str(version).split()[0]} (" + ", ".join(f"{k}={v}" for k, v in facts.items()) + ")"


if __name__ == "__main__":
    raise SystemExit(main())

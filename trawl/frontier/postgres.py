"""The durable frontier: a crawl's URLs in PostgreSQL, so a crawl outlives its process and spans machines.

One row per (run, source, URL): its host, the shard that host belongs to, depth,
priority, state (``queued`` → ``leased`` → ``done``), attempts and lease expiry.

- **Claims** are batched: ``FOR UPDATE SKIP LOCKED`` picks up to N queued rows
  (or leased rows whose lease expired: their process died) of one shard, so any
  number of crawlers share a frontier without handing out a URL twice.
- **Discovered links** go in batches with ``ON CONFLICT DO NOTHING``: the primary
  key is the URL's 64-bit hash, so the database is the seen set and the crawler
  keeps no per-URL state (its memory does not grow with the frontier).
- **Checkpoints** make progress durable: the crawler closes its open parts, then
  in one transaction records them (``_frontier_parts``) and marks the URLs
  whose records and outcomes are in them ``done``. A crawler killed at any point
  loses only what it fetched since its last checkpoint, and a resumed run
  fetches exactly the URLs not ``done``.
- **Shards lease hosts**: in a sharded run (``shards`` > 1) each host has a row in
  ``_frontier_hosts`` with its owner and lease. A shard claims hosts that have
  work and no live owner (``FOR UPDATE SKIP LOCKED``), as many as it keeps busy
  and its fair share; claims URLs of those hosts only; renews the host leases
  with its URL leases (a heartbeat, and every checkpoint); gives a host back
  when it runs dry. What the shard learned of a host (rate, breaker, robots.txt)
  is saved on the host's row, so the next owner starts from it. One owner per
  host at a time: politeness holds across the whole crawl, and a host is never
  split across processes. A shard that dies leaves its leases to expire (or the
  crawl flow takes them back at once when Prefect reports it crashed).

The tables live in the loader's schema (``trawl`` by default) next to ``_loads``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import structlog

from trawl.database import open_pool
from trawl.errors import ConfigError
from trawl.frontier.base import Claim, Counts, HostMemory, Idle, Settled
from trawl.logs import bind, unbind
from trawl.settings import Settings
from trawl.staging import SourceStage, StagedPart, Stager, StreamKind
from trawl.urls import host_of

__all__ = [
    "ClaimedRequest",
    "DurableFrontier",
    "FrontierRun",
    "PgFrontier",
    "QueuedRequest",
    "ensure_frontier_schema",
    "open_store",
    "shard_of",
    "url_key",
]

log = structlog.get_logger("trawl.frontier")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def url_key(url: str) -> int:
    """A URL's 64-bit key (signed, for ``bigint``): stable across processes and machines, unlike ``hash()``."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big", signed=True)


def host_key(host: str) -> int:
    """A host's key in a sharded run's ``shard`` column: one per host (up to hash collisions, which the claims
    tell apart by the host itself), so claiming a host's URLs walks the claim index, with no index of its own."""
    return shard_of(host, 2**31 - 1)


def shard_of(host: str, shards: int) -> int:
    """The shard a host belongs to: a stable hash, the same on every machine."""
    if shards <= 1:
        return 0
    return int.from_bytes(hashlib.blake2b(host.lower().encode(), digest_size=8).digest(), "big") % shards


_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}._frontier (
    run_id text NOT NULL,
    source text NOT NULL,
    url_hash bigint NOT NULL,
    url text NOT NULL,
    host text NOT NULL,
    shard integer NOT NULL DEFAULT 0,
    depth integer NOT NULL,
    priority integer NOT NULL DEFAULT 0,
    state text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'leased', 'done')),
    attempts integer NOT NULL DEFAULT 0,
    lease_until timestamptz,
    lease_owner text,
    PRIMARY KEY (run_id, source, url_hash)
);
-- Scrapy's scheduler (trawl.frontier.scheduler) keeps each request, serialized, with its row.
ALTER TABLE {s}._frontier ADD COLUMN IF NOT EXISTS payload bytea;
CREATE INDEX IF NOT EXISTS _frontier_claim ON {s}._frontier (run_id, source, shard, priority DESC, depth)
    WHERE state <> 'done';
CREATE INDEX IF NOT EXISTS _frontier_leased ON {s}._frontier (run_id, source, lease_owner) WHERE state = 'leased';
CREATE TABLE IF NOT EXISTS {s}._frontier_runs (
    run_id text NOT NULL,
    source text NOT NULL,
    dt text NOT NULL,
    started_at timestamptz NOT NULL,
    shards integer NOT NULL DEFAULT 1,
    status text NOT NULL DEFAULT 'running',
    PRIMARY KEY (run_id, source)
);
CREATE TABLE IF NOT EXISTS {s}._frontier_shards (
    run_id text NOT NULL,
    source text NOT NULL,
    shard integer NOT NULL,
    stats jsonb NOT NULL DEFAULT '{{}}',
    checkpoints integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, source, shard)
);
ALTER TABLE {s}._frontier_shards ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT 'running';
ALTER TABLE {s}._frontier_shards ADD COLUMN IF NOT EXISTS owner text;
CREATE TABLE IF NOT EXISTS {s}._frontier_hosts (
    run_id text NOT NULL,
    source text NOT NULL,
    host text NOT NULL,
    owner text,
    lease_until timestamptz,
    state jsonb NOT NULL DEFAULT '{{}}',
    moves integer NOT NULL DEFAULT 0,
    hkey integer NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, source, host)
);
CREATE TABLE IF NOT EXISTS {s}._frontier_parts (
    run_id text NOT NULL,
    source text NOT NULL,
    kind text NOT NULL,
    shard integer NOT NULL,
    seq integer NOT NULL,
    uri text NOT NULL,
    rows bigint NOT NULL,
    bytes bigint NOT NULL,
    sha256 text NOT NULL,
    PRIMARY KEY (run_id, source, kind, shard, seq)
);
"""


async def ensure_frontier_schema(conn: asyncpg.Connection | asyncpg.Pool, schema: str) -> None:
    """Create the frontier's tables if missing (idempotent; serialised by an advisory lock)."""
    async with _acquire(conn) as c, c.transaction():
        await c.execute("SELECT pg_advisory_xact_lock(hashtext('trawl-frontier-ddl'))")
        await c.execute(_DDL.format(s=_q(schema)))


class _acquire:
    """``async with`` a connection from a pool, or the connection itself."""

    def __init__(self, conn: asyncpg.Connection | asyncpg.Pool) -> None:
        self._conn = conn
        self._held: Any = None

    async def __aenter__(self) -> asyncpg.Connection:
        if isinstance(self._conn, asyncpg.Pool):
            self._held = await self._conn.acquire()
            return self._held
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        if self._held is not None:
            assert isinstance(self._conn, asyncpg.Pool)
            await self._conn.release(self._held)


@dataclass(frozen=True, slots=True)
class FrontierRun:
    """A crawl run of one source as the frontier knows it (what resuming or sharding it needs)."""

    run_id: str
    source: str
    dt: str
    started_at: datetime
    shards: int
    status: str


@dataclass(frozen=True, slots=True)
class Claimed:
    """A URL handed to this crawler until its lease expires."""

    url: str
    depth: int
    key: int


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A serialized request on its way into the frontier (Scrapy's scheduler): its key is its identity."""

    key: int
    url: str
    host: str
    depth: int
    priority: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ClaimedRequest:
    """A request leased to this crawler; ``payload`` is None for a row queued as a bare URL (``begin``'s seeds)."""

    key: int
    url: str
    depth: int
    payload: bytes | None


class PgFrontier:
    """One source's frontier for one run (and one shard of it) in PostgreSQL.

    ``shard`` None means the whole frontier (the parent of a sharded crawl, which
    only seeds it and collects its parts); otherwise this crawler claims only URLs
    of hosts in its shard, while links it discovers go to whichever shard owns them.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        run_id: str,
        source: str,
        *,
        shard: int | None = 0,
        shards: int = 1,
        lease_seconds: float = 300.0,
        owner: str | None = None,
    ) -> None:
        if shard is not None and not 0 <= shard < shards:
            raise ConfigError(f"frontier of {source}: shard {shard} is not in 0..{shards - 1}")
        self.pool = pool
        self.schema = schema
        self.run_id = run_id
        self.source = source
        self.shard = shard
        self.shards = shards
        self.lease_seconds = lease_seconds
        self.owner = owner or uuid.uuid4().hex
        s = _q(schema)
        self._t = f"{s}._frontier"
        self._runs = f"{s}._frontier_runs"
        self._shards_t = f"{s}._frontier_shards"
        self._parts = f"{s}._frontier_parts"
        self._links: list[tuple[str, int]] = []
        self.leasing = shards > 1
        """Hosts are leased (a sharded run): URLs are claimed from the hosts this crawler holds."""
        self.held: set[str] = set()
        """Hosts whose lease this crawler holds (leasing only)."""
        self.draining: set[str] = set()
        """Held hosts no longer claimed from: given back once their URLs in flight are done (to a shard with fewer)."""
        self._h = f"{s}._frontier_hosts"
        self._known_hosts: set[str] = set()  # hosts known to have their row in _frontier_hosts
        self._flushing = asyncio.Lock()  # a checkpoint waits for an insert under way (its links precede the done marks)

    # ---- the run ---------------------------------------------------------------------------------------------

    async def setup(self) -> None:
        await ensure_frontier_schema(self.pool, self.schema)

    async def run(self) -> FrontierRun | None:
        """This run's row, or None when the frontier has never seen it."""
        row = await self.pool.fetchrow(
            f"SELECT dt, started_at, shards, status FROM {self._runs} WHERE run_id = $1 AND source = $2",
            self.run_id,
            self.source,
        )
        if row is None:
            return None
        return FrontierRun(self.run_id, self.source, row["dt"], row["started_at"], row["shards"], row["status"])

    async def begin(self, started_at: datetime, seeds: Iterable[str]) -> FrontierRun:
        """Register a new run and queue its seeds (depth 0); an existing run is returned as it is."""
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                f"INSERT INTO {self._runs} (run_id, source, dt, started_at, shards) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                self.run_id,
                self.source,
                started_at.strftime("%Y-%m-%d"),
                started_at,
                self.shards,
            )
            if inserted:
                await self._insert(conn, [(u, 0) for u in seeds])
        found = await self.run()
        assert found is not None
        return found

    async def finish(self, status: str) -> None:
        await self.pool.execute(
            f"UPDATE {self._runs} SET status = $3 WHERE run_id = $1 AND source = $2", self.run_id, self.source, status
        )

    async def release(self) -> int:
        """Give back every lease of this shard at once (``--resume``: the process holding them is gone)."""
        if self.leasing and self.shard is not None:
            return await self.take_back(self.shard)
        result: str = await self.pool.execute(
            f"UPDATE {self._t} SET state = 'queued', lease_until = NULL, lease_owner = NULL "
            f"WHERE run_id = $1 AND source = $2 AND state = 'leased'"
            + (" AND shard = $3" if self.shard is not None else ""),
            *self._ident(),
        )
        return int(result.split()[-1])

    async def take_back(self, shard: int) -> int:
        """Take back every URL and host lease of the process that last ran ``shard`` (it crashed): queued and free
        for any shard at once, instead of at their lease's expiry. Returns how many URLs were requeued."""
        async with self.pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchval(
                f"SELECT owner FROM {self._shards_t} WHERE run_id = $1 AND source = $2 AND shard = $3",
                self.run_id,
                self.source,
                shard,
            )
            if owner is None or owner == self.owner:
                return 0
            result: str = await conn.execute(
                f"UPDATE {self._t} SET state = 'queued', lease_until = NULL, lease_owner = NULL "
                "WHERE run_id = $1 AND source = $2 AND state = 'leased' AND lease_owner = $3",
                self.run_id,
                self.source,
                owner,
            )
            await conn.execute(
                f"UPDATE {self._h} SET owner = NULL, lease_until = NULL "
                "WHERE run_id = $1 AND source = $2 AND owner = $3",
                self.run_id,
                self.source,
                owner,
            )
        return int(result.split()[-1])

    async def give_back(self) -> int:
        """Requeue the URLs this crawler holds and did not finish (it is stopping)."""
        result: str = await self.pool.execute(
            f"UPDATE {self._t} SET state = 'queued', lease_until = NULL, lease_owner = NULL "
            "WHERE run_id = $1 AND source = $2 AND state = 'leased' AND lease_owner = $3",
            self.run_id,
            self.source,
            self.owner,
        )
        if self.leasing and self.held:
            await self.release_hosts(dict.fromkeys(self.held))
        return int(result.split()[-1])

    def _ident(self) -> tuple[Any, ...]:
        return (self.run_id, self.source) if self.shard is None else (self.run_id, self.source, self.shard)

    # ---- URLs ------------------------------------------------------------------------------------------------

    def queue_link(self, url: str, depth: int) -> None:
        """Buffer a discovered URL; it is inserted with the next ``flush`` or checkpoint."""
        self._links.append((url, depth))

    @property
    def queued_links(self) -> int:
        return len(self._links)

    async def flush(self) -> int:
        """Insert the buffered links; returns how many were new."""
        async with self._flushing:
            links, self._links = self._links, []
            return await self.add(links)

    async def add(self, links: Sequence[tuple[str, int]]) -> int:
        """Queue discovered URLs (url, depth); those already in the frontier are left as they are. Returns how many were new."""
        if not links:
            return 0
        async with self.pool.acquire() as conn:
            return await self._insert(conn, links)

    async def _insert(self, conn: asyncpg.Connection, links: Sequence[tuple[str, int]]) -> int:
        keys, urls, hosts, shards, depths = [], [], [], [], []
        for url, depth in links:
            host = host_of(url)
            keys.append(url_key(url))
            urls.append(url)
            hosts.append(host)
            shards.append(host_key(host) if self.leasing else shard_of(host, self.shards))
            depths.append(depth)
        result: str = await conn.execute(
            f"INSERT INTO {self._t} (run_id, source, url_hash, url, host, shard, depth) "
            "SELECT $1, $2, k, u, h, s, d FROM unnest($3::bigint[], $4::text[], $5::text[], $6::int[], $7::int[]) "
            "AS t(k, u, h, s, d) ON CONFLICT DO NOTHING",
            self.run_id,
            self.source,
            keys,
            urls,
            hosts,
            shards,
            depths,
        )
        if self.leasing:
            await self._insert_hosts(conn, hosts)
        return int(result.split()[-1])

    async def _insert_hosts(self, conn: asyncpg.Connection, hosts: Iterable[str]) -> None:
        """Give each new host its row in the host table (unowned): then a shard can lease it."""
        new = sorted(set(hosts) - self._known_hosts)  # sorted: concurrent inserts of the same hosts cannot deadlock
        if not new:
            return
        await conn.execute(
            f"INSERT INTO {self._h} (run_id, source, host, hkey) SELECT $1, $2, unnest($3::text[]), unnest($4::int[]) "
            "ON CONFLICT DO NOTHING",
            self.run_id,
            self.source,
            new,
            [host_key(h) for h in new],
        )
        self._known_hosts.update(new)

    async def claim(self, n: int) -> list[Claimed]:
        """Lease up to ``n`` URLs of this shard (highest priority, then shallowest first)."""
        return [Claimed(r["url"], r["depth"], r["url_hash"]) for r in await self._claim(n)]

    async def _claim(self, n: int) -> list[asyncpg.Record]:
        """Lease up to ``n`` rows of this shard; they come back in claim order (priority, then depth)."""
        assert self.shard is not None, "the whole-frontier view does not crawl"
        if self.leasing:
            return await self._claim_from_hosts(n)
        # By ctid: a TID scan whatever the planner knows of a new run (a join on url_hash without statistics
        # scans every row of the run per claim).
        rows = await self.pool.fetch(
            f"""
            WITH c AS (
                SELECT ctid FROM {self._t}
                WHERE run_id = $1 AND source = $2 AND shard = $3
                  AND (state = 'queued' OR (state = 'leased' AND lease_until < now()))
                ORDER BY priority DESC, depth
                LIMIT $4
                FOR UPDATE SKIP LOCKED
            )
            UPDATE {self._t} f
            SET state = 'leased', attempts = f.attempts + 1, lease_owner = $5,
                lease_until = now() + make_interval(secs => $6)
            WHERE f.ctid = ANY(ARRAY(SELECT ctid FROM c))
            RETURNING f.url_hash, f.url, f.depth, f.payload, f.priority
            """,
            self.run_id,
            self.source,
            self.shard,
            n,
            self.owner,
            self.lease_seconds,
        )
        # RETURNING does not keep the CTE's order: put the batch back in claim order.
        return sorted(rows, key=lambda r: (-r["priority"], r["depth"]))

    async def _claim_from_hosts(self, n: int) -> list[asyncpg.Record]:
        """Lease up to ``n`` rows of the hosts this crawler holds, shared out evenly between them (each host's best
        first, through the per-host index: the cost follows the batch, not the hosts' sizes)."""
        claiming = self.held - self.draining
        if not claiming or n <= 0:
            return []
        per_host = -(-n // len(claiming))
        rows = await self.pool.fetch(
            f"""
            WITH c AS (
                SELECT x.ctid FROM unnest($3::text[], $7::int[]) AS h(host, hkey)
                CROSS JOIN LATERAL (
                    SELECT ctid FROM {self._t}
                    WHERE run_id = $1 AND source = $2 AND shard = h.hkey AND host = h.host AND state <> 'done'
                      AND (state = 'queued' OR lease_until < now())
                    ORDER BY priority DESC, depth
                    LIMIT $4
                    FOR UPDATE SKIP LOCKED
                ) x
            )
            UPDATE {self._t} f
            SET state = 'leased', attempts = f.attempts + 1, lease_owner = $5,
                lease_until = now() + make_interval(secs => $6)
            WHERE f.ctid = ANY(ARRAY(SELECT ctid FROM c))
            RETURNING f.url_hash, f.url, f.depth, f.payload, f.priority
            """,
            self.run_id,
            self.source,
            sorted(claiming),
            per_host,
            self.owner,
            self.lease_seconds,
            [host_key(h) for h in sorted(claiming)],
        )
        return sorted(rows, key=lambda r: (-r["priority"], r["depth"]))

    # ---- hosts (sharded runs) --------------------------------------------------------------------------------

    async def claim_hosts(self, k: int) -> dict[str, dict[str, Any]]:
        """Lease up to ``k`` hosts that have URLs to claim and no live owner; returns each with the state its last
        owner saved (its rate, breaker, robots.txt)."""
        if k <= 0:
            return {}
        rows = await self.pool.fetch(
            f"""
            WITH c AS (
                SELECT h.host FROM {self._h} h
                WHERE h.run_id = $1 AND h.source = $2 AND (h.owner IS NULL OR h.lease_until < now())
                  AND EXISTS (
                      SELECT 1 FROM {self._t} f
                      WHERE f.run_id = h.run_id AND f.source = h.source AND f.shard = h.hkey AND f.host = h.host
                        AND f.state <> 'done'
                        AND (f.state = 'queued' OR f.lease_until < now())
                  )
                ORDER BY h.host
                LIMIT $3
                FOR UPDATE OF h SKIP LOCKED
            )
            UPDATE {self._h} h
            SET owner = $4, lease_until = now() + make_interval(secs => $5),
                moves = h.moves + (h.owner IS NOT NULL OR h.state <> '{{}}'::jsonb)::int
            FROM c WHERE h.run_id = $1 AND h.source = $2 AND h.host = c.host
            RETURNING h.host, h.state
            """,
            self.run_id,
            self.source,
            k,
            self.owner,
            self.lease_seconds,
        )
        got = {r["host"]: orjson.loads(r["state"]) for r in rows}
        self.held.update(got)
        return got

    async def release_hosts(self, hosts: Mapping[str, dict[str, Any] | None]) -> None:
        """Give hosts back (they ran dry, or this crawler stops), each with its state when given."""
        if not hosts:
            return
        names = sorted(hosts)
        await self.pool.execute(
            f"UPDATE {self._h} h SET owner = NULL, lease_until = NULL, state = COALESCE(t.state::jsonb, h.state) "
            "FROM unnest($3::text[], $5::text[]) AS t(host, state) "
            "WHERE h.run_id = $1 AND h.source = $2 AND h.host = t.host AND h.owner = $4",
            self.run_id,
            self.source,
            names,
            self.owner,
            [None if hosts[h] is None else orjson.dumps(hosts[h]).decode() for h in names],
        )
        self.held.difference_update(names)
        self.draining.difference_update(names)

    async def dry_hosts(self) -> set[str]:
        """Held hosts with no URL left to claim (the crawl loop gives back those with none in flight either)."""
        if not self.held:
            return set()
        rows = await self.pool.fetch(
            f"""
            SELECT h.host FROM unnest($3::text[], $4::int[]) AS h(host, hkey)
            WHERE NOT EXISTS (
                SELECT 1 FROM {self._t} f
                WHERE f.run_id = $1 AND f.source = $2 AND f.shard = h.hkey AND f.host = h.host AND f.state <> 'done'
                  AND (f.state = 'queued' OR f.lease_until < now())
            )
            """,
            self.run_id,
            self.source,
            sorted(self.held),
            [host_key(h) for h in sorted(self.held)],
        )
        return {r["host"] for r in rows}

    async def host_load(self) -> tuple[int, int, int, int]:
        """(hosts with URLs not done, live shards (scheduled or running), hosts with URLs not done held by other live owners, the
        most such hosts one other live owner holds)."""
        row = await self.pool.fetchrow(
            f"""
            WITH w AS (
                SELECT h.owner, h.lease_until FROM {self._h} h
                WHERE h.run_id = $1 AND h.source = $2 AND EXISTS (
                    SELECT 1 FROM {self._t} f
                    WHERE f.run_id = h.run_id AND f.source = h.source AND f.shard = h.hkey AND f.host = h.host
                        AND f.state <> 'done'
                )
            )
            SELECT (SELECT count(*) FROM w) AS hosts,
                   (SELECT count(*) FROM {self._shards_t}
                    WHERE run_id = $1 AND source = $2 AND status IN ('scheduled', 'running')
                      AND updated_at > now() - make_interval(secs => $4)) AS shards,
                   (SELECT count(*) FROM w WHERE owner IS NOT NULL AND owner <> $3 AND lease_until > now()) AS others,
                   (SELECT coalesce(max(n), 0) FROM (
                        SELECT count(*) AS n FROM w WHERE owner IS NOT NULL AND owner <> $3 AND lease_until > now()
                        GROUP BY owner) o) AS most
            """,
            self.run_id,
            self.source,
            self.owner,
            self.lease_seconds,
        )
        assert row is not None
        return row["hosts"], row["shards"], row["others"], row["most"]

    async def heartbeat(self, hosts: dict[str, dict[str, Any]] | None = None) -> None:
        """Extend this crawler's URL and host leases (saving the hosts' states when given) and say it is alive."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._renew(conn, hosts)

    async def hosts(self) -> dict[str, dict[str, Any]]:
        """Every host of the run with its owner, lease and how often it moved (for tests and the summary)."""
        rows = await self.pool.fetch(
            f"SELECT host, owner, lease_until, moves, state FROM {self._h} WHERE run_id = $1 AND source = $2",
            self.run_id,
            self.source,
        )
        return {
            r["host"]: {
                "owner": r["owner"],
                "lease_until": r["lease_until"],
                "moves": r["moves"],
                "state": orjson.loads(r["state"]),
            }
            for r in rows
        }

    async def pending(self) -> int:
        """URLs of the whole run (every shard) not yet done: queued, or leased by anyone (``not_mine``: by others)."""
        n: int = await self.pool.fetchval(
            f"SELECT count(*) FROM {self._t} WHERE run_id = $1 AND source = $2 AND state <> 'done'",
            self.run_id,
            self.source,
        )
        return n

    async def set_shards(self, shards: Sequence[int], status: str) -> None:
        """Record shards as ``scheduled`` (by the crawl flow), ``running`` or ``finished`` (by their crawler; a
        running shard's owner is this crawler: its leases are the ones a replacement takes back)."""
        owner = self.owner if status == "running" else None
        await self.pool.execute(
            f"INSERT INTO {self._shards_t} (run_id, source, shard, status, owner) "
            "SELECT $1, $2, unnest($3::int[]), $4, $5 "
            "ON CONFLICT (run_id, source, shard) DO UPDATE SET status = EXCLUDED.status, updated_at = now(), "
            f"owner = COALESCE(EXCLUDED.owner, {self._shards_t}.owner)",
            self.run_id,
            self.source,
            list(shards),
            status,
            owner,
        )

    async def still_scheduled(self, shard: int) -> None:
        """A shard run Prefect has not started yet is still coming: it keeps counting in the hosts' fair share."""
        await self.pool.execute(
            f"UPDATE {self._shards_t} SET updated_at = now() WHERE run_id = $1 AND source = $2 AND shard = $3 "
            "AND status = 'scheduled'",
            self.run_id,
            self.source,
            shard,
        )

    async def counts(self) -> dict[str, int]:
        """URLs of this run by state (every shard)."""
        rows = await self.pool.fetch(
            f"SELECT state, count(*) AS n FROM {self._t} WHERE run_id = $1 AND source = $2 GROUP BY state",
            self.run_id,
            self.source,
        )
        return {r["state"]: r["n"] for r in rows}

    # ---- serialized requests (Scrapy's scheduler) ------------------------------------------------------------

    async def push_requests(
        self,
        new: Sequence[QueuedRequest],
        *,
        done: Sequence[int] = (),
        give_back: Sequence[int] = (),
        renew: bool = False,
    ) -> int:
        """In one transaction: queue ``new`` requests (a key already in the frontier is left as it is), mark the
        ``done`` keys done, queue the ``give_back`` keys again (leased here, never started), and with ``renew`` extend
        this crawler's other leases. Returns how many requests were new.

        New requests go in before the done marks: a request is only done once those it led to are in the frontier.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = 0
            if new:
                result: str = await conn.execute(
                    f"INSERT INTO {self._t} (run_id, source, url_hash, url, host, shard, depth, priority, payload) "
                    "SELECT $1, $2, k, u, h, s, d, p, b FROM unnest($3::bigint[], $4::text[], $5::text[], $6::int[], "
                    "$7::int[], $8::int[], $9::bytea[]) AS t(k, u, h, s, d, p, b) ON CONFLICT DO NOTHING",
                    self.run_id,
                    self.source,
                    [r.key for r in new],
                    [r.url for r in new],
                    [r.host for r in new],
                    [shard_of(r.host, self.shards) for r in new],
                    [r.depth for r in new],
                    [r.priority for r in new],
                    [r.payload for r in new],
                )
                inserted = int(result.split()[-1])
            if done:
                await self._mark_done(conn, done)
            if give_back:
                await conn.execute(
                    f"UPDATE {self._t} SET state = 'queued', lease_until = NULL, lease_owner = NULL "
                    "WHERE run_id = $1 AND source = $2 AND url_hash = ANY($3::bigint[]) AND lease_owner = $4 "
                    "AND state = 'leased'",
                    self.run_id,
                    self.source,
                    list(give_back),
                    self.owner,
                )
            if renew:
                await self._renew(conn)
        return inserted

    async def claim_requests(self, n: int) -> list[ClaimedRequest]:
        """Lease up to ``n`` requests of this shard with their payloads (as ``claim``: highest priority first)."""
        rows = await self._claim(n)
        return [ClaimedRequest(r["url_hash"], r["url"], r["depth"], r["payload"]) for r in rows]

    async def not_mine(self) -> int:
        """Requests of the run (every shard) neither done nor leased by this crawler: queued, or with another one,
        where they may still lead to more. A scheduler with nothing of its own left is finished when this is 0."""
        n: int = await self.pool.fetchval(
            f"SELECT count(*) FROM {self._t} WHERE run_id = $1 AND source = $2 AND state <> 'done' "
            "AND lease_owner IS DISTINCT FROM $3",
            self.run_id,
            self.source,
            self.owner,
        )
        return n

    async def reset(self) -> None:
        """Forget this run of this source entirely (its URLs, parts, stats and run row): a crawl that starts over."""
        async with self.pool.acquire() as conn, conn.transaction():
            for table in (self._t, self._parts, self._shards_t, self._runs):
                await conn.execute(f"DELETE FROM {table} WHERE run_id = $1 AND source = $2", self.run_id, self.source)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    async def checkpoint(
        self,
        parts: Sequence[tuple[StreamKind, int, StagedPart]],
        done: Sequence[int],
        stats: dict[str, Any],
        hosts: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """In one transaction: insert buffered links, record closed parts (kind, seq, part), mark URLs done, keep
        stats, renew this crawler's leases. A URL is only done once the links it led to are in the frontier.

        Shielded from cancellation: a transaction cut off mid-way would leave its
        connection holding row locks that the crawler's last act (``give_back``) waits on.
        """
        await asyncio.shield(self._checkpoint(parts, done, stats, hosts))

    async def _checkpoint(
        self,
        parts: Sequence[tuple[StreamKind, int, StagedPart]],
        done: Sequence[int],
        stats: dict[str, Any],
        hosts: dict[str, dict[str, Any]] | None,
    ) -> None:
        assert self.shard is not None
        async with self._flushing, self.pool.acquire() as conn, conn.transaction():
            links, self._links = self._links, []
            if links:
                await self._insert(conn, links)
            if parts:
                await conn.executemany(
                    f"INSERT INTO {self._parts} (run_id, source, kind, shard, seq, uri, rows, bytes, sha256) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (run_id, source, kind, shard, seq) "
                    "DO UPDATE SET uri = EXCLUDED.uri, rows = EXCLUDED.rows, bytes = EXCLUDED.bytes, "
                    "sha256 = EXCLUDED.sha256",
                    [
                        (self.run_id, self.source, kind, self.shard, seq, p.uri, p.rows, p.bytes, p.sha256)
                        for kind, seq, p in parts
                    ],
                )
            if done:
                await self._mark_done(conn, done)
            await self._renew(conn, hosts)
            await conn.execute(
                f"INSERT INTO {self._shards_t} (run_id, source, shard, stats, checkpoints) VALUES ($1, $2, $3, $4, 1) "
                "ON CONFLICT (run_id, source, shard) DO UPDATE SET stats = EXCLUDED.stats, "
                f"checkpoints = {self._shards_t}.checkpoints + 1, updated_at = now()",
                self.run_id,
                self.source,
                self.shard,
                orjson.dumps(stats).decode(),
            )

    async def _mark_done(self, conn: asyncpg.Connection, keys: Sequence[int]) -> None:
        # Through this crawler's leases (index _frontier_leased): the cost follows what it holds, not the
        # frontier's size, whatever statistics the planner has for a new run.
        await conn.execute(
            f"UPDATE {self._t} SET state = 'done', lease_until = NULL "
            "WHERE run_id = $1 AND source = $2 AND lease_owner = $4 AND state = 'leased' "
            "AND url_hash = ANY($3::bigint[])",
            self.run_id,
            self.source,
            list(keys),
            self.owner,
        )

    async def _renew(self, conn: asyncpg.Connection, hosts: dict[str, dict[str, Any]] | None = None) -> None:
        """Extend every lease this crawler holds: its URLs', and in a sharded run its hosts' (saving their states
        when given) and its shard's sign of life."""
        await conn.execute(
            f"UPDATE {self._t} SET lease_until = now() + make_interval(secs => $4) "
            "WHERE run_id = $1 AND source = $2 AND lease_owner = $3 AND state = 'leased'",
            self.run_id,
            self.source,
            self.owner,
            self.lease_seconds,
        )
        if not self.leasing or self.shard is None:
            return
        if self.held:
            names = sorted(self.held)
            states = [None if not hosts or h not in hosts else orjson.dumps(hosts[h]).decode() for h in names]
            await conn.execute(
                f"UPDATE {self._h} h SET lease_until = now() + make_interval(secs => $4), "
                "state = COALESCE(t.state::jsonb, h.state) FROM unnest($5::text[], $6::text[]) AS t(host, state) "
                "WHERE h.run_id = $1 AND h.source = $2 AND h.owner = $3 AND h.host = t.host",
                self.run_id,
                self.source,
                self.owner,
                self.lease_seconds,
                names,
                states,
            )
        await conn.execute(
            f"UPDATE {self._shards_t} SET updated_at = now() WHERE run_id = $1 AND source = $2 AND shard = $3 "
            "AND owner = $4",
            self.run_id,
            self.source,
            self.shard,
            self.owner,
        )

    async def parts(self, kind: StreamKind) -> list[tuple[int, int, StagedPart]]:
        """Recorded parts of one stream as (shard, seq, part): of this shard, or of all for the whole view."""
        where = "run_id = $1 AND source = $2 AND kind = $3" + (" AND shard = $4" if self.shard is not None else "")
        args: tuple[Any, ...] = (self.run_id, self.source, kind) + (() if self.shard is None else (self.shard,))
        rows = await self.pool.fetch(
            f"SELECT shard, seq, uri, rows, bytes, sha256 FROM {self._parts} WHERE {where} ORDER BY shard, seq", *args
        )
        return [(r["shard"], r["seq"], StagedPart(r["uri"], r["rows"], r["bytes"], r["sha256"])) for r in rows]

    async def saved_stats(self) -> dict[int, dict[str, Any]]:
        """The stats each shard saved at its last checkpoint."""
        rows = await self.pool.fetch(
            f"SELECT shard, stats FROM {self._shards_t} WHERE run_id = $1 AND source = $2", self.run_id, self.source
        )
        return {r["shard"]: orjson.loads(r["stats"]) for r in rows}


@contextlib.asynccontextmanager
async def open_store(
    source: str, run_id: str, settings: Settings, *, shard: int | None, shards: int = 1
) -> AsyncIterator[PgFrontier]:
    """A source's frontier for this run in the configured (or embedded) PostgreSQL, tables created; its pool
    is closed on the way out."""
    pool = await open_pool(settings, max_size=3)
    try:
        frontier = PgFrontier(
            pool,
            settings.db_schema,
            run_id,
            source,
            shard=shard,
            shards=shards,
            lease_seconds=settings.frontier_lease_seconds,
        )
        await frontier.setup()
        yield frontier
    finally:
        await pool.close()


_RECENT_MAX = 100_000  # hashes of links seen lately: saves duplicate inserts; the database is the seen set


class DurableFrontier:
    """A crawl's frontier in PostgreSQL (:class:`PgFrontier`), as the crawl loop and the source driver use it.

    A feeder claims URLs in batches into a small local queue for the workers;
    discovered links are buffered and inserted in batches. After each URL's records
    and outcome the crawl yields a :class:`Settled` marker: the URL is marked done
    at the next checkpoint, which also records the closed parts. Memory does not
    grow with the frontier: the loop keeps only a bounded set of recent link hashes.
    A crawl of one process ends when no URL is left to claim. In a sharded run the
    crawl leases hosts (:meth:`PgFrontier.claim_hosts`) as it needs them, gives back
    those that run dry and hands hosts over to a shard that holds fewer than its
    share; a shard ends when it holds no host, none is left to take and no live
    shard can queue more for it. Shard 0 (the crawl flow's own) stays while any host
    has work, so it takes over the hosts of a shard that vanished once their leases
    expire. What the crawl learned of a host (``hosts``: the Fetcher) is saved with
    the host at every checkpoint and heartbeat, and restored by its next owner.
    """

    name = "postgres"
    resumable = True
    recent_max: int | None = _RECENT_MAX

    def __init__(
        self,
        store: PgFrontier,
        settings: Settings,
        *,
        seeds: Sequence[str],
        resume: bool,
        sharded: bool,
        hosts: HostMemory | None = None,
        per_host: int = 1,
        keeper: bool = False,
        links_stay: bool = False,
    ) -> None:
        self.store = store
        self._memory = hosts
        self._per_host = max(1, per_host)
        self._keeper = keeper  # the crawl flow's own shard: it stays while any host has work (it takes over the lost)
        self._links_stay = links_stay  # links never leave their host: a shard holding none can add no work
        self._host_of: dict[int, str] = {}  # claimed and not yet settled: key → host
        self._busy: Counter[str] = Counter()  # URLs in flight per held host
        self._beat = time.monotonic()
        self._balanced = 0.0
        self.settings = settings
        self.claims: asyncio.Queue[Claim] = asyncio.Queue()
        self.commits = not sharded
        self._seeds = list(seeds)
        self._resume = resume
        self._sharded = sharded
        self._inflight = 0  # claimed and not yet settled (parked ones included)
        self._settled = asyncio.Event()
        self._stage: SourceStage | None = None
        self._counts: Counts | None = None
        self._done: list[int] = []
        self._recorded = {"raw": 0, "outcomes": 0, "archive": 0}
        self._last = time.monotonic()

    # ---- the crawl loop's side -------------------------------------------------------------------------------

    def add(self, url: str, depth: int) -> None:
        self.store.queue_link(url, depth)

    def settle(self) -> None:
        self._inflight -= 1
        self._settled.set()

    async def feed(self, out: asyncio.Queue[object], workers: int) -> None:
        """Claim URLs into ``claims`` as the workers need them, flush discovered links; return when done."""
        store, claims = self.store, self.claims
        batch = self.settings.frontier_batch
        while True:
            if time.monotonic() - self._beat >= store.lease_seconds / 3:  # a heartbeat well inside the lease
                await self._heartbeat()
            room = max(batch, workers * 2) - claims.qsize()
            if store.queued_links >= batch or claims.qsize() <= workers:
                await store.flush()
            if claims.qsize() <= workers:
                if store.leasing:
                    await self._lease_hosts(workers)
                claimed = await store.claim(room)
                for c in claimed:
                    claims.put_nowait(Claim(c.url, c.depth, c.key))
                    if store.leasing:
                        host = self._host_of[c.key] = host_of(c.url)
                        self._busy[host] += 1
                self._inflight += len(claimed)
                if claimed:
                    continue
                if self._inflight == 0 and not store.queued_links:
                    if not store.leasing or await self._finished():
                        return
                    # Other shards are at work and may queue URLs or hand hosts over to this one; they wait on this
                    # one's settled URLs being checkpointed done just as it waits on theirs.
                    await out.put(Idle())
                    await asyncio.sleep(0.5)
                    continue
            self._settled.clear()
            # asyncio.wait, not wait_for: on 3.11 wait_for may swallow a cancel that lands as the event fires.
            waiter = asyncio.ensure_future(self._settled.wait())
            try:
                await asyncio.wait([waiter], timeout=0.5)
            finally:
                waiter.cancel()

    # ---- hosts (sharded runs) --------------------------------------------------------------------------------

    def _states(self, hosts: Iterable[str]) -> dict[str, dict[str, Any]]:
        memory = self._memory
        return {} if memory is None else {h: memory.host_state(h) for h in hosts}

    async def _lease_hosts(self, workers: int) -> None:
        """Give back held hosts that ran dry, and claim hosts up to what this crawler keeps busy and its fair share
        of the hosts with work (at most once a second while it has hosts; at once when it has none)."""
        store = self.store
        now = time.monotonic()
        if store.held and now - self._balanced < 1.0:
            return
        self._balanced = now
        dry = {h for h in await store.dry_hosts() if not self._busy[h]}
        if dry:
            await store.release_hosts(self._states(dry))
            log.info("hosts given back", hosts=sorted(dry), held=len(store.held))
        gone = {h for h in store.draining if not self._busy[h]}
        if gone:
            await store.release_hosts(self._states(gone))
            log.info("hosts handed over", hosts=sorted(gone), held=len(store.held))
        hosts, shards, _, _ = await store.host_load()
        capacity = max(1, -(-workers // self._per_host))
        share = max(1, min(capacity, -(-hosts // max(1, shards))))
        excess = len(store.held) - len(store.draining) - share
        if excess > 0:
            # A shard started after this one took what it could: hand it hosts, the least busy first, each once
            # its URLs in flight are done (one owner at a time: the host's cap holds across the move).
            keep = sorted(store.held - store.draining, key=lambda h: self._busy[h])
            store.draining.update(keep[:excess])
            return
        want = share - len(store.held)
        if want <= 0:
            return
        got = await store.claim_hosts(want)
        if got:
            for host, state in got.items():
                if state and self._memory is not None:
                    self._memory.restore_host(host, state)
            log.info("hosts leased", hosts=sorted(got), held=len(store.held), moved=[h for h, st in got.items() if st])

    async def _finished(self) -> bool:
        """A shard with nothing in flight and nothing to claim ends when no host is left to take and no live shard
        can queue more for it; the crawl flow's own shard stays while any host has work (it takes over the hosts
        of a shard that vanished, once their leases expire)."""
        store = self.store
        if store.held:
            return False
        hosts, shards, others, most = await store.host_load()
        if hosts == 0:
            return True
        if self._keeper:
            return False
        if others == 0:
            return True
        # Links stay on their host: no shard can queue work for this one, but one holding more than its share hands
        # hosts over (a shard that started late waits for them; one of more shards than hosts ends at once).
        return self._links_stay and most <= -(-hosts // max(1, shards))

    async def _heartbeat(self) -> None:
        self._beat = time.monotonic()
        await self.store.heartbeat(self._states(self.store.held))

    # ---- the source driver's side ----------------------------------------------------------------------------

    async def open_stage(self, stager: Stager, counts: Counts, started: datetime) -> SourceStage:
        """Register the run (or find it again on ``resume``), then reopen its staging where it was checkpointed."""
        store = self.store
        source, run_id = store.source, store.run_id
        run = await store.run()
        if run is None:
            if self._resume or self._sharded:
                raise ConfigError(f"source {source}: run {run_id} is not in the frontier, nothing to resume")
            run = await store.begin(started, self._seeds)
        elif not self._resume and not self._sharded:
            raise ConfigError(
                f"source {source}: run {run_id} is already in the frontier; continue it with "
                f"`trawl crawl --resume {run_id}`"
            )
        shard = store.shard or 0
        if self._resume:  # before this crawler becomes the shard's owner: the leases of the one before it go back
            released = await store.release()
            log.info("run resumed", run_id=run_id, released_leases=released, **await store.counts())
        if self._sharded:
            await store.set_shards([shard], "running")
            bind(shard=shard)
        stage = stager.open_source(source, run_id, run.started_at)
        tag = f"s{shard:02d}-" if self._sharded else ""
        for kind, writer in stage.streams():
            writer.resume_from([p for _, _, p in await store.parts(kind)], tag)
        self._recorded = {kind: len(writer.parts) for kind, writer in stage.streams()}
        saved = (await store.saved_stats()).get(shard)
        if saved:
            counts.restore(saved)
        self._stage, self._counts = stage, counts
        return stage

    async def settled(self, marker: Settled) -> None:
        self._done.append(marker.key)
        if (host := self._host_of.pop(marker.key, None)) is not None:
            self._busy[host] -= 1
        if time.monotonic() - self._last >= self.settings.frontier_checkpoint_seconds:
            await self.checkpoint()

    async def idle(self) -> None:
        if self._done:
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """Close the open parts and, once they are durable, record them with the URLs whose data they hold."""
        assert self._stage is not None and self._counts is not None, "open_stage first"
        self._last = time.monotonic()
        stage = self._stage
        streams = stage.streams()  # the archive's parts are checkpointed with the records they hold
        closed = [(kind, await writer.close()) for kind, writer in streams]
        for _, writer in streams:
            if not await writer.wait_durable():
                log.warning("checkpoint deferred: parts still on their way to the staging target")
                return
        new: list[tuple[StreamKind, int, StagedPart]] = []
        for kind, parts in closed:
            new += [(kind, seq, p) for seq, p in enumerate(parts, 1) if seq > self._recorded[kind]]
        done, self._done = self._done, []
        try:
            self._beat = time.monotonic()
            await self.store.checkpoint(new, done, self._counts.saved(), self._states(self.store.held))
        except BaseException:
            self._done[:0] = done
            raise
        for kind, parts in closed:
            self._recorded[kind] = len(parts)
        log.debug("checkpoint", done=len(done), parts=len(new))

    async def finish(self) -> None:
        await self.store.finish("complete")

    async def close(self) -> None:
        """URLs this crawler claimed and did not finish go back at once (else at their lease's expiry)."""
        if self._sharded:
            unbind("shard")
        try:
            async with asyncio.timeout(10):
                if self.store.held:  # what this shard learned of its hosts goes with them
                    await self.store.release_hosts(self._states(self.store.held))
                await self.store.give_back()
                if self._sharded:
                    await self.store.set_shards([self.store.shard or 0], "finished")
        except Exception as exc:
            log.warning("leases not given back; they expire", error=str(exc))

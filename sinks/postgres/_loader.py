"""The Loader: committed manifests into PostgreSQL, part by part, the next part prepared while this one loads."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor

import asyncpg
import structlog

from sinks.postgres._ddl import ensure_meta, ensure_table, q
from sinks.postgres._part import (
    PartLoad,
    check_reject_rate,
    claim,
    insert_rejects,
    ledger,
    new_load,
    record_run,
    write_outcomes,
    write_records,
)
from sinks.postgres._prepare import PartDecoder, Prepared, prepare_part, watch_loader
from sinks.validate import check_manifest
from trawl.errors import LoadError, StagingError, TooManyRejects
from trawl.staging import Manifest, StagedPart, Stager

__all__ = ["Loader"]

_AHEAD = 2  # parts prepared ahead of the one loading: the decoding process never waits for PostgreSQL

log = structlog.get_logger("sinks.postgres")


class Loader:
    """Loads committed manifests from a stager into one PostgreSQL schema.

    ``max_reject_rate`` (0..1, None: no limit) fails a manifest's load when more
    than that share of its records were rejected — counted over the parts loaded
    so far, once ``reject_min_rows`` records were seen or at its last part — so a
    broken scrape stops instead of loading quietly. The failing part is rolled
    back (its rejects are kept in ``_rejects`` for the diagnosis) and stays
    pending: a rerun after the fix loads it.

    Pipelined: while one part's transaction runs in PostgreSQL, the next parts
    are read (as staged: gzip) and handed to ``decoders`` decoding processes
    (their own interpreters, so their CPU does not share the event loop's GIL),
    which decode, validate and encode them into COPY files in a private
    temporary directory; the event loop only streams those files to PostgreSQL,
    a chunk at a time. One process by default: each holds a part's records
    (~50 MB for 50,000) while it works on it; two were 20-50% faster on two
    cores where decoding is the limit but put the load over 250 MB. Sources
    with named checks are prepared in a thread instead, where their checks were
    resolved. Call :meth:`close` when done (the decoding processes and their
    files otherwise go with the Loader, or with the interpreter).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        stager: Stager,
        schema: str = "trawl",
        *,
        max_reject_rate: float | None = None,
        reject_min_rows: int = 100,
        decoders: int = 1,
    ) -> None:
        self.pool = pool
        self.stager = stager
        self.schema = schema
        self.max_reject_rate = max_reject_rate
        self.reject_min_rows = reject_min_rows
        self.decoders = decoders
        self._s = q(schema)
        self._decoders: dict[str, PartDecoder] = {}
        self._ahead: dict[str, asyncio.Task[tuple[Prepared, float]]] = {}
        self._types: dict[str, dict[str, str]] = {}
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._dir: str | None = None
        self.decoder_usage: dict[int, tuple[float, float]] = {}
        """Per decoding process: its peak RSS (MB) and CPU seconds so far."""
        self.identity = schema
        """Which database and schema this loads into (no credentials): known after :meth:`setup`."""

    async def setup(self) -> None:
        """Create the schema and the bookkeeping tables, upgrading an old layout in place (idempotent, race-safe)."""
        async with self.pool.acquire() as conn, conn.transaction():
            db, port = await conn.fetchrow("SELECT current_database(), inet_server_port()")
            self.identity = f"{db}:{port or 'socket'}:{self.schema}"
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"trawl-setup:{self.schema}")
            await ensure_meta(conn, self.schema)

    async def close(self) -> None:
        """Stop the decoding processes and remove their files (idempotent; a later load starts new ones)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        out, self._dir = self._dir, None
        if out is not None:
            await asyncio.to_thread(shutil.rmtree, out, True)

    def _out_dir(self) -> str:
        """Where prepared parts' files go (made on first use; removed by :meth:`close` or with the Loader)."""
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="trawl-load-")
                weakref.finalize(self, _remove, self._dir)
            return self._dir

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:  # called from worker threads
            return self._pool or self._start_pool()

    def _start_pool(self) -> ProcessPoolExecutor:
        # forkserver: a fresh, single-threaded interpreter forks the worker (never this process, which has an
        # event loop and threads); only the prepare module is imported there.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["sinks.postgres._prepare"])
        self._pool = ProcessPoolExecutor(
            max_workers=self.decoders, mp_context=ctx, initializer=watch_loader, initargs=(os.getpid(),)
        )
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    async def pending(self, manifests: Sequence[Manifest]) -> set[str]:
        """The part URIs of these manifests that the ledger does not have yet."""
        uris = [p.uri for m in manifests for p in m.parts]
        async with self.pool.acquire() as conn:
            done = await conn.fetch(f"SELECT staged_object FROM {self._s}._loads WHERE staged_object = ANY($1)", uris)
        return set(uris) - {r[0] for r in done}

    async def ensure_table(self, manifest: Manifest) -> dict[str, str]:
        """Create or evolve the source's table to the manifest's declaration; returns field → type to load with."""
        async with self.pool.acquire() as conn, conn.transaction():
            types = await ensure_table(conn, self.schema, manifest)
        seen = self._types.get(manifest.source)
        if seen is not None and seen != types:
            # asyncpg caches COPY codecs per connection by statement text: a retyped column needs fresh connections.
            await self.pool.expire_connections()
        self._types[manifest.source] = types
        return types

    # -- loading ----------------------------------------------------------------------------------------

    async def load_manifest(self, manifest: Manifest, todo: set[str] | None = None) -> list[PartLoad]:
        """Load every part of one committed manifest that is not in the ledger yet."""
        if todo is None:
            todo = await self.pending([manifest])
        fields = await self.prepare(manifest)
        pending = [p for p in manifest.parts if p.uri in todo]
        ahead = {p.uri: pending[i + 1 : i + 1 + _AHEAD] for i, p in enumerate(pending)}
        results = []
        try:
            for part in manifest.parts:
                if part.uri not in todo:
                    results.append(PartLoad(part.uri, manifest.source, manifest.kind, part.rows, skipped=True))
                    continue
                results.append(await self.load_part(manifest, part, fields, ahead=ahead[part.uri]))
        finally:
            self._forget(manifest)
        await self.finish(manifest)
        return results

    async def prepare(self, manifest: Manifest) -> dict[str, str]:
        """Before a manifest's parts load: its table evolved to the declaration; returns field → type to load with."""
        # First of all, before any DDL or check runs: the declaration re-validated, every check name resolved.
        await asyncio.to_thread(check_manifest, manifest)
        if manifest.kind != "raw":
            return {}
        types = await self.ensure_table(manifest)
        self._decoder(manifest, types)  # an unknown check fails here, before any part
        return types

    async def load_part(
        self,
        manifest: Manifest,
        part: StagedPart,
        fields: Mapping[str, str],
        *,
        ahead: StagedPart | Sequence[StagedPart] | bool | None = True,
    ) -> PartLoad:
        """Load one part in one transaction with its ledger row (a part already in the ledger is skipped).

        Pipelined: while this part is compared, copied and written, the next ones
        (``ahead``: parts, None for none, True for the next two in the manifest)
        are read, decoded and validated off the event loop, ready for the next calls.
        """
        if manifest.kind != "raw":
            return await self._load_outcomes(manifest, part)
        decoder = self._decoder(manifest, fields)
        job = self._ahead.pop(part.uri, None)
        if job is not None and job.get_loop() is not asyncio.get_running_loop():
            _drop(job)  # read ahead in another event loop (a task runner's): not awaitable here, start over
            job = None
        if job is None:
            job = self._start(part, decoder)
        if ahead is True:
            following = manifest.parts[manifest.parts.index(part) + 1 :] if part in manifest.parts else []
            ahead = following[:_AHEAD]
        elif isinstance(ahead, StagedPart):
            ahead = [ahead]
        for nxt in ahead or ():
            if nxt.uri not in self._ahead:
                self._ahead[nxt.uri] = self._start(nxt, decoder)
        try:
            prepared, read_s = await job
            try:
                return await self._load_records(manifest, prepared, decoder, read_s)
            finally:
                await asyncio.to_thread(prepared.discard)
        except BaseException:
            self._forget(manifest)
            raise

    async def finish(self, manifest: Manifest) -> None:
        """After a manifest's parts load: the run's row in ``_runs``, and the lineage's new rows indexed."""
        self._forget(manifest)
        async with self.pool.acquire() as conn:
            await record_run(conn, self._s, manifest)
            # The block range indexes cover a range once it is summarized (autovacuum does it, later): until
            # then a lookup reads the whole unsummarized tail. Reading the pages just written is cheap.
            await conn.execute(
                "SELECT brin_summarize_new_values(i) FROM unnest(ARRAY[to_regclass($1), to_regclass($2)]) i"
                " WHERE i IS NOT NULL",
                f"{self._s}._lineage_key_brin",
                f"{self._s}._lineage_load",
            )

    def _decoder(self, manifest: Manifest, types: Mapping[str, str]) -> PartDecoder:
        decoder = self._decoders.get(manifest.uri)
        if decoder is None:
            try:
                decoder = PartDecoder(
                    dict(manifest.schema.get("fields") or {}),
                    types,
                    list(manifest.schema.get("key") or ["url"]),
                    manifest.run_id,
                    manifest.source,
                )
            except LoadError as exc:
                raise LoadError(f"source {manifest.source!r}: {exc}", staged_object=manifest.uri) from None
            self._decoders[manifest.uri] = decoder
        return decoder

    def _start(self, part: StagedPart, decoder: PartDecoder) -> asyncio.Task[tuple[Prepared, float]]:
        async def run() -> tuple[Prepared, float]:
            t0 = time.perf_counter()
            gz = await self.stager.read_part_gz(part)  # as staged: a fifth of its JSON, inflated where decoded
            read_s = time.perf_counter() - t0
            out = await asyncio.to_thread(self._out_dir)
            if decoder.portable:
                # Starting the process and submitting (a write to its wake-up pipe) block: done in a thread.
                future = await asyncio.to_thread(
                    lambda: self._executor().submit(prepare_part, decoder.spec, gz, part, out)
                )
                del gz
                prepared = await asyncio.wrap_future(future)
                rss, cpu = self.decoder_usage.get(prepared.pid, (0.0, 0.0))
                self.decoder_usage[prepared.pid] = (max(rss, prepared.peak_rss_mb), max(cpu, prepared.cpu_s))
                return prepared, read_s

            def prepare() -> Prepared:
                t = time.perf_counter()
                prepared = decoder.prepare(gz, part, out)
                prepared.seconds = time.perf_counter() - t
                return prepared

            return await asyncio.to_thread(prepare), read_s

        return asyncio.create_task(run(), name=f"trawl-prepare:{part.uri}")

    def _forget(self, m: Manifest) -> None:
        """Drop a manifest's read-ahead (after it finished or failed)."""
        self._decoders.pop(m.uri, None)
        for p in m.parts:
            job = self._ahead.pop(p.uri, None)
            if job is not None:
                _drop(job)

    async def _read(self, part: StagedPart) -> list[bytes]:
        lines = [line async for line in self.stager.read_part(part)]
        if len(lines) != part.rows:
            raise StagingError(f"{part.uri}: has {len(lines)} lines but the manifest says {part.rows}")
        return lines

    async def _load_records(self, m: Manifest, prepared: Prepared, decoder: PartDecoder, read_s: float) -> PartLoad:
        part = prepared.part
        try:
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    if not await claim(conn, self._s, part):
                        return PartLoad(part.uri, m.source, m.kind, prepared.rows, skipped=True)
                    await check_reject_rate(
                        conn, self._s, self.schema, m, prepared, self.max_reject_rate, self.reject_min_rows
                    )
                    load_id, now = await new_load(conn, self._s)
                    res, phases = await write_records(conn, self.schema, m, prepared, decoder.types, load_id, now)
                    if prepared.rejects:
                        await insert_rejects(conn, self._s, prepared.rejects)
                    await ledger(conn, self._s, m, part, res, load_id, prepared.seen_at)
                    t = time.perf_counter()
                phases["commit"] = time.perf_counter() - t
        except TooManyRejects:
            async with self.pool.acquire() as conn, conn.transaction():
                await insert_rejects(conn, self._s, prepared.rejects)
            raise
        phases = {"read": read_s, "decode": prepared.seconds, **phases}
        res = PartLoad(
            res.staged_object,
            res.source,
            res.kind,
            res.rows,
            res.inserted,
            res.updated,
            res.unchanged,
            res.rejected,
            phases=phases,
        )
        log.info(
            "part loaded",
            source=m.source,
            staged_object=part.uri,
            rows=res.rows,
            inserted=res.inserted,
            updated=res.updated,
            unchanged=res.unchanged,
            rejected=res.rejected,
            python_path=prepared.slow,
            seconds={k: round(v, 3) for k, v in phases.items()},
        )
        return res

    async def _load_outcomes(self, m: Manifest, part: StagedPart) -> PartLoad:
        lines = await self._read(part)
        async with self.pool.acquire() as conn, conn.transaction():
            if not await claim(conn, self._s, part):
                return PartLoad(part.uri, m.source, m.kind, len(lines), skipped=True)
            load_id, _ = await new_load(conn, self._s)
            res, seen_at = await write_outcomes(conn, self.schema, m, part, lines, load_id)
            await ledger(conn, self._s, m, part, res, load_id, seen_at)
        return res


def _remove(path: str) -> None:
    """Remove a directory; in a thread when called on an event loop's thread (file system calls block)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        shutil.rmtree(path, ignore_errors=True)
    else:  # the loop's executor: asyncio.run waits for it before the interpreter exits
        loop.run_in_executor(None, shutil.rmtree, path, True)


def _drop(job: asyncio.Task[tuple[Prepared, float]]) -> None:
    """Cancel a read-ahead nobody will await, from whichever loop (or thread) we are in."""
    # Its failure, if it failed, is reported when its part is loaded; never as "exception never retrieved".
    job.add_done_callback(
        lambda t: t.cancelled() or t.exception() or t.get_loop().run_in_executor(None, t.result()[0].discard)
    )
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if job.get_loop() is running:
        job.cancel()
    else:
        with contextlib.suppress(RuntimeError):  # its loop is closed: nothing left to cancel
            job.get_loop().call_soon_threadsafe(job.cancel)

"""Staging on local disk: gzip JSON Lines parts and the directory stager (the embedded default).

A part is written to ``part-N.jsonl.gz.partial`` and renamed when closed; the
manifest (:mod:`trawl.staging`) lists every part with rows, bytes and sha256 and
is written last. For a source that failed mid-crawl the manifest says
``"status": "failed"``: what was fetched before the failure is still staged and
loadable, and its outcomes tell why the rest is missing.

A stager is an async context manager (``async with open_stager(url) as stager:``,
:mod:`sinks.targets`): the S3 stager (:mod:`sinks.s3`) opens its client and spool
workers there and, on the way out, stops them and closes the client (a commit has
already waited for its run's uploads; whatever is not in S3 stays in the spool).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import zlib
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson
from isal import isal_zlib

from trawl.errors import StagingError
from trawl.staging import (
    MANIFEST,
    Manifest,
    RunInfo,
    SourceStage,
    StagedPart,
    StreamKind,
    check_run_path,
    run_path_parts,
    summarize_runs,
)

__all__ = ["LocalStager", "PartWriter"]

_FLUSH_BYTES = 256 * 1024  # uncompressed bytes buffered before a compress+write round trip to a thread


class PartWriter:
    """Writes envelopes into gzip JSON Lines parts, rolling at a row or byte threshold."""

    def __init__(
        self, directory: Path, uri_prefix: str, max_rows: int, max_bytes: int, *, members: bool = False
    ) -> None:
        self._members = members
        """An archive stream (``*.warc.gz``): what is appended is whole gzip members, written as they are."""
        self._dir = directory
        self._uri_prefix = uri_prefix
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._parts: list[StagedPart] = []
        self._buf: list[bytes] = []
        self._buf_bytes = 0
        self._rows = 0
        self._file: Any = None
        self._zip: Any = None
        self._sha: Any = None
        self._written = 0
        self._lock = asyncio.Lock()
        self._io = threading.Lock()
        """Held by the thread that writes, closes or drops the open part's file: a discard waits for a write still
        under way in its thread (its task cancelled) instead of closing the file under it."""
        self._discarded = False
        self._tag = ""

    def resume_from(self, parts: list[StagedPart], tag: str = "") -> None:
        """Continue a run: ``parts`` (closed by an earlier process) count as written and new parts are numbered
        after them; ``tag`` (``s01-``) keeps the part names of a sharded crawl's shards apart."""
        self._parts = list(parts)
        self._tag = tag

    async def wait_durable(self) -> bool:
        """Whether every closed part is where a reader on another machine finds it (a local file: at once)."""
        return True

    @property
    def parts(self) -> list[StagedPart]:
        return list(self._parts)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self._parts) + self._rows

    def _name(self) -> str:
        ext = "warc.gz" if self._members else "jsonl.gz"
        return f"part-{self._tag}{len(self._parts) + 1:05d}.{ext}"

    def _open_sync(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self._dir / f"{self._name()}.partial", "wb")  # noqa: SIM115 - closed in _close_sync
        # ISA-L level 2, wbits 31 (a gzip container): zlib level 6's ratio on staged JSON Lines at 10x its speed.
        self._zip = None if self._members else isal_zlib.compressobj(2, isal_zlib.DEFLATED, 31)
        self._sha = hashlib.sha256()
        self._written = 0

    def _emit(self, chunk: bytes) -> None:
        if chunk:
            self._file.write(chunk)
            self._sha.update(chunk)
            self._written += len(chunk)

    def _flush_sync(self, data: bytes) -> None:
        with self._io:
            if self._discarded:
                return
            if self._file is None:
                self._open_sync()
            self._write_sync(data)

    def _write_sync(self, data: bytes) -> None:
        self._emit(data if self._zip is None else self._zip.compress(data))

    def _close_sync(self) -> StagedPart:
        with self._io:
            if self._discarded:
                raise StagingError(f"{self._uri_prefix}: the stream was discarded")
            return self._finish_sync()

    def _finish_sync(self) -> StagedPart:
        if self._zip is not None:
            self._emit(self._zip.flush())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._name()
        os.replace(self._dir / f"{name}.partial", self._dir / name)
        part = StagedPart(f"{self._uri_prefix}/{name}", self._rows, self._written, self._sha.hexdigest())
        self._file = self._zip = self._sha = None
        self._rows = self._written = 0
        return part

    async def _flush(self) -> None:
        if self._buf:
            if self._file is None:
                await self._part_opening()
            data = b"".join(self._buf)
            self._buf, self._buf_bytes = [], 0
            await asyncio.to_thread(self._flush_sync, data)
            await self._flushed(self._written)

    async def _close_part(self) -> None:
        await self._flush()
        if self._file is not None:
            part = await asyncio.to_thread(self._close_sync)
            self._parts.append(part)
            await self._part_closed(part, self._dir / part.uri.rsplit("/", 1)[1])

    # Hooks for writers that ship parts elsewhere (sinks.s3): no-ops for a local directory.
    async def _part_opening(self) -> None:
        """Before a new part's file is opened."""

    async def _flushed(self, written: int) -> None:
        """After compressed bytes reached the open part's file (``written`` so far)."""

    async def _part_closed(self, part: StagedPart, path: Path) -> None:
        """After a part's file is complete and renamed to ``path``."""

    def _fits(self, size: int) -> bool:
        """Whether ``size`` more bytes only go into the buffer: no append under way, no flush or part close due."""
        return (
            not self._lock.locked()
            and self._buf_bytes + size < min(_FLUSH_BYTES, self._max_bytes)
            and self._rows + 1 < self._max_rows
            and self._written < self._max_bytes
        )

    def _buffer(self, data: bytes) -> None:
        self._buf.append(data)
        self._buf_bytes += len(data)
        self._rows += 1

    async def write(self, envelope: Mapping[str, Any]) -> None:
        """Append one envelope; closes the current part when it reaches a threshold."""
        if self._discarded:
            return  # a crawl broken off: its workers' last rows are fetched again when it resumes
        line = orjson.dumps(envelope, option=orjson.OPT_APPEND_NEWLINE)
        if self._fits(len(line)):  # nothing else due: no lock to take (most rows; a flush or a part to close takes it)
            self._buffer(line)
            return
        async with self._lock:
            self._buffer(line)
            if self._buf_bytes >= min(_FLUSH_BYTES, self._max_bytes):
                await self._flush()
            if self._rows >= self._max_rows or self._written >= self._max_bytes:
                await self._close_part()

    def append_nowait(self, members: bytes) -> tuple[str, int] | None:
        """:meth:`append` without waiting, when the members only go into the buffer (no flush or part to close is
        due, no append under way): (part uri, their offset); None when the caller must ``await append()``."""
        if self._discarded or not self._fits(len(members)):
            return None
        where = f"{self._uri_prefix}/{self._name()}", self._written + self._buf_bytes
        self._buffer(members)
        return where

    async def append(self, members: bytes) -> tuple[str, int]:
        """Archive streams: append whole gzip members (one exchange's WARC records); (part uri, their offset).

        The offset is exact because nothing is compressed here: the bytes land in the part as given.
        """
        if self._discarded:
            raise StagingError(f"{self._uri_prefix}: the stream was discarded")
        async with self._lock:
            uri, offset = f"{self._uri_prefix}/{self._name()}", self._written + self._buf_bytes
            self._buffer(members)
            if self._buf_bytes >= min(_FLUSH_BYTES, self._max_bytes):
                await self._flush()
            if self._rows >= self._max_rows or self._written >= self._max_bytes:
                await self._close_part()
        return uri, offset

    async def discard(self) -> None:
        """Drop the open part (a crawl cancelled or broken off before it closed): its file is closed and removed
        (once a write still under way in its thread is done), the buffered rows are dropped, and rows written
        after this are too. Parts already closed stay; a resumed run numbers new ones after them."""
        self._discarded = True
        self._buf, self._buf_bytes, self._rows = [], 0, 0
        await asyncio.to_thread(self._drop_sync)

    def _drop_sync(self) -> None:
        with self._io:
            file, self._file, self._zip, self._sha = self._file, None, None, None
            self._written = 0
            if file is not None:
                file.close()
                Path(file.name).unlink(missing_ok=True)

    async def close(self) -> list[StagedPart]:
        """Close the open part (if any rows are pending) and return every part written."""
        async with self._lock:
            if self._rows:
                await self._close_part()
        return self.parts


class LocalStager:
    """A directory on local disk (the embedded default)."""

    def __init__(self, root: Path, *, part_max_records: int = 50_000, part_max_bytes: int = 64 * 1024 * 1024) -> None:
        self.root = root.resolve()
        # Unescaped, like S3 keys: `source=x` stays readable in lineage columns and logs.
        self.uri = f"file://{self.root}"
        self._max_rows = part_max_records
        self._max_bytes = part_max_bytes

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def _run_dir(self, kind: StreamKind, source: str, dt: str, run_id: str) -> Path:
        check_run_path(source, run_id)  # never a path outside the root (`../`)
        return self.root / kind / f"source={source}" / f"dt={dt}" / f"run={run_id}"

    def open_source(self, source: str, run_id: str, started: datetime) -> SourceStage:
        """Start staging one source's run; nothing is visible to loaders until ``commit``."""
        dt = started.strftime("%Y-%m-%d")

        def writer(kind: StreamKind) -> PartWriter:
            d = self._run_dir(kind, source, dt, run_id)
            return PartWriter(d, f"file://{d}", self._max_rows, self._max_bytes, members=kind == "archive")

        return SourceStage(
            self, source, run_id, dt, writer("raw"), writer("outcomes"), started, archive=writer("archive")
        )

    async def write_manifest(
        self, kind: StreamKind, source: str, dt: str, run_id: str, body: Mapping[str, Any]
    ) -> Manifest:
        d = self._run_dir(kind, source, dt, run_id)
        data = orjson.dumps(body, option=orjson.OPT_INDENT_2)

        def write() -> None:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f"{MANIFEST}.partial"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, d / MANIFEST)

        await asyncio.to_thread(write)
        return Manifest.from_json(f"file://{d / MANIFEST}", data)

    async def manifests(self, kind: StreamKind = "raw") -> list[Manifest]:
        """Every committed run of one stream, oldest first."""

        def scan() -> list[tuple[Path, bytes]]:
            base = self.root / kind
            if not base.is_dir():
                return []
            return [(p, p.read_bytes()) for p in sorted(base.glob(f"source=*/dt=*/run=*/{MANIFEST}"))]

        found = [Manifest.from_json(f"file://{p}", raw) for p, raw in await asyncio.to_thread(scan)]
        return sorted(found, key=lambda m: (m.started_at, m.source))

    async def runs(self) -> list[RunInfo]:
        """Every run with record parts or a records manifest: committed or incomplete, with counts."""

        def scan() -> dict[tuple[str, str, str], tuple[int, int]]:
            found: dict[tuple[str, str, str], tuple[int, int]] = {}
            base = self.root / "raw"
            if base.is_dir():
                for d in base.glob("source=*/dt=*/run=*"):
                    ident = run_path_parts(d.relative_to(base).as_posix())
                    if ident is not None:
                        parts = [p.stat().st_size for p in d.glob("part-*.jsonl.gz")]
                        found[ident] = (len(parts), sum(parts))
            return found

        return summarize_runs(await self.manifests("raw"), await asyncio.to_thread(scan))

    def _path(self, uri: str) -> Path:
        path = Path(os.path.normpath(uri.removeprefix("file://")))  # no `..` out of the root
        if not uri.startswith("file://") or not path.is_relative_to(self.root):
            raise StagingError(f"{uri} is not inside the staging target {self.uri}")
        return path

    async def read_bytes(self, uri: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of a staged object, whole or ``length`` bytes from ``offset``; StagingError naming it if missing."""
        path = self._path(uri)

        def read() -> bytes:
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    return f.read() if length is None else f.read(length)
            except FileNotFoundError:
                raise StagingError(f"{uri}: staged object is missing") from None

        return await asyncio.to_thread(read)

    async def read_part(self, part: StagedPart) -> AsyncIterator[bytes]:
        """Yield the JSON lines of a part after checking its sha256 against the manifest."""
        for line in (await self.read_part_data(part)).splitlines():
            if line:
                yield line

    async def read_part_data(self, part: StagedPart) -> bytes:
        """A part's JSON lines as one block of bytes, after checking its sha256 against the manifest."""
        data = await self.read_part_gz(part)
        return await asyncio.to_thread(zlib.decompress, data, 31)

    async def read_part_gz(self, part: StagedPart) -> bytes:
        """A part as it is staged (gzip JSON lines), after checking its sha256 against the manifest."""
        path = self._path(part.uri)

        def read() -> bytes:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise StagingError(f"{part.uri}: staged part is missing") from None
            digest = hashlib.sha256(data).hexdigest()
            if digest != part.sha256:
                raise StagingError(f"{part.uri}: sha256 {digest} does not match the manifest's {part.sha256}")
            return data

        return await asyncio.to_thread(read)

"""Staging: raw record envelopes and URL outcomes as gzip JSON Lines parts, manifest last.

Layout (identical for every target)::

    {staging}/{raw|outcomes}/source={source}/dt={YYYY-MM-DD}/run={run_id}/part-00001.jsonl.gz
    {staging}/{raw|outcomes}/source={source}/dt={YYYY-MM-DD}/run={run_id}/_manifest.json

A part is written to ``part-N.jsonl.gz.partial`` and renamed when closed; the
manifest lists every part with rows, bytes and sha256 and is written last. A run
directory without a manifest is not loadable; one with a manifest is complete.
For a source that failed mid-crawl the manifest says ``"status": "failed"``: what
was fetched before the failure is still staged and loadable, and its outcomes
tell why the rest is missing.

A stager is an async context manager (``async with open_stager(url) as stager:``):
the S3 stager (:mod:`sinks.s3`) opens its client and spool workers there and,
on the way out, stops them and closes the client (a commit has already waited for
its run's uploads; whatever is not in S3 stays in the spool).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self
from urllib.parse import urlsplit

import orjson

from trawl.errors import ConfigError, StagingError
from trawl.records import utcnow

if TYPE_CHECKING:
    from sinks.s3 import S3Stager
    from trawl.settings import Settings

__all__ = [
    "LocalStager",
    "Manifest",
    "PartWriter",
    "RunInfo",
    "SourceStage",
    "StagedPart",
    "Stager",
    "manifest_body",
    "open_stager",
]

StreamKind = Literal["raw", "outcomes"]
MANIFEST = "_manifest.json"
_FLUSH_BYTES = 256 * 1024  # uncompressed bytes buffered before a compress+write round trip to a thread


@dataclass(frozen=True, slots=True)
class StagedPart:
    """One closed part: where it is, and what a reader verifies it against."""

    uri: str
    rows: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Manifest:
    """A committed run of one source and one stream (records or outcomes)."""

    uri: str
    kind: StreamKind
    source: str
    run_id: str
    dt: str
    status: Literal["complete", "failed"]
    parts: tuple[StagedPart, ...]
    schema: Mapping[str, Any]
    stats: Mapping[str, Any]
    error: str | None
    started_at: str
    finished_at: str
    flow_run_id: str | None

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @classmethod
    def from_json(cls, uri: str, raw: bytes) -> Manifest:
        try:
            d = orjson.loads(raw)
            return cls(
                uri=uri,
                kind=d["kind"],
                source=d["source"],
                run_id=d["run_id"],
                dt=d["dt"],
                status=d["status"],
                parts=tuple(StagedPart(p["uri"], p["rows"], p["bytes"], p["sha256"]) for p in d["parts"]),
                schema=d.get("schema") or {},
                stats=d.get("stats") or {},
                error=d.get("error"),
                started_at=d["started_at"],
                finished_at=d["finished_at"],
                flow_run_id=d.get("flow_run_id"),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise StagingError(f"{uri}: unreadable manifest: {exc}") from None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One staged run of one source, as ``trawl runs ls`` shows it.

    ``state`` is ``committed`` when its records manifest exists, else ``incomplete``
    (parts written or spooled, no manifest: not loadable yet). ``rows`` is only
    known for committed runs.
    """

    run_id: str
    source: str
    dt: str
    state: Literal["committed", "incomplete"]
    status: str | None
    parts: int
    rows: int | None
    bytes: int
    spooled: int = 0


def summarize_runs(
    manifests: list[Manifest], part_objects: Mapping[tuple[str, str, str], tuple[int, int]]
) -> list[RunInfo]:
    """Runs from the records manifests found and the record parts present ((source, dt, run) → (count, bytes))."""
    runs: dict[tuple[str, str, str], RunInfo] = {}
    for m in manifests:
        runs[(m.source, m.dt, m.run_id)] = RunInfo(
            m.run_id, m.source, m.dt, "committed", m.status, len(m.parts), m.rows, sum(p.bytes for p in m.parts)
        )
    for (source, dt, run_id), (count, size) in part_objects.items():
        if (source, dt, run_id) not in runs:
            runs[(source, dt, run_id)] = RunInfo(run_id, source, dt, "incomplete", None, count, None, size)
    return sorted(runs.values(), key=lambda r: (r.run_id, r.source))


def run_path_parts(path: str) -> tuple[str, str, str] | None:
    """(source, dt, run_id) from ``…/source=S/dt=D/run=R/…``, or None."""
    found: dict[str, str] = {}
    for seg in path.split("/"):
        name, sep, value = seg.partition("=")
        if sep and name in ("source", "dt", "run") and name not in found:
            found[name] = value
    if len(found) != 3:
        return None
    return found["source"], found["dt"], found["run"]


class PartWriter:
    """Writes envelopes into gzip JSON Lines parts, rolling at a row or byte threshold."""

    def __init__(self, directory: Path, uri_prefix: str, max_rows: int, max_bytes: int) -> None:
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
        return f"part-{self._tag}{len(self._parts) + 1:05d}.jsonl.gz"

    def _open_sync(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self._dir / f"{self._name()}.partial", "wb")  # noqa: SIM115 - closed in _close_sync
        self._zip = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip container
        self._sha = hashlib.sha256()
        self._written = 0

    def _emit(self, chunk: bytes) -> None:
        if chunk:
            self._file.write(chunk)
            self._sha.update(chunk)
            self._written += len(chunk)

    def _flush_sync(self, data: bytes) -> None:
        if self._file is None:
            self._open_sync()
        self._emit(self._zip.compress(data))

    def _close_sync(self) -> StagedPart:
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

    async def write(self, envelope: Mapping[str, Any]) -> None:
        """Append one envelope; closes the current part when it reaches a threshold."""
        line = orjson.dumps(envelope, option=orjson.OPT_APPEND_NEWLINE)
        async with self._lock:
            self._buf.append(line)
            self._buf_bytes += len(line)
            self._rows += 1
            if self._buf_bytes >= min(_FLUSH_BYTES, self._max_bytes):
                await self._flush()
            if self._rows >= self._max_rows or self._written >= self._max_bytes:
                await self._close_part()

    async def close(self) -> list[StagedPart]:
        """Close the open part (if any rows are pending) and return every part written."""
        async with self._lock:
            if self._rows:
                await self._close_part()
        return self.parts


def manifest_body(
    kind: StreamKind,
    source: str,
    run_id: str,
    dt: str,
    *,
    status: Literal["complete", "failed"],
    error: str | None,
    started_at: datetime,
    finished_at: datetime,
    flow_run_id: str | None,
    schema: Mapping[str, Any],
    stats: Mapping[str, Any],
    parts: list[StagedPart],
) -> dict[str, Any]:
    """What a manifest says: the run, its status, the declared schema, its stats and every part."""
    return {
        "version": 1,
        "kind": kind,
        "source": source,
        "run_id": run_id,
        "dt": dt,
        "status": status,
        "error": error,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "flow_run_id": flow_run_id,
        "schema": schema,
        "stats": stats,
        "parts": [p.as_dict() for p in parts],
        "rows": sum(p.rows for p in parts),
    }


@dataclass(slots=True)
class SourceStage:
    """The two streams one source writes during one run, and their commit."""

    stager: Stager
    source: str
    run_id: str
    dt: str
    records: PartWriter
    outcomes: PartWriter
    started_at: datetime = field(default_factory=utcnow)

    async def commit(
        self,
        *,
        status: Literal["complete", "failed"],
        schema: Mapping[str, Any],
        stats: Mapping[str, Any],
        error: str | None = None,
        flow_run_id: str | None = None,
    ) -> tuple[Manifest, Manifest]:
        """Close both streams and write their manifests: outcomes first, records last (the commit)."""
        finished = utcnow()
        manifests = []
        failure: StagingError | None = None
        streams: tuple[tuple[StreamKind, PartWriter], ...] = (("outcomes", self.outcomes), ("raw", self.records))
        closed = [(kind, await writer.close()) for kind, writer in streams]  # every part on its way before a manifest
        for kind, parts in closed:
            body = manifest_body(
                kind,
                self.source,
                self.run_id,
                self.dt,
                status=status,
                error=error,
                started_at=self.started_at,
                finished_at=finished,
                flow_run_id=flow_run_id,
                schema=schema,
                stats=stats,
                parts=parts,
            )
            try:
                manifests.append(await self.stager.write_manifest(kind, self.source, self.dt, self.run_id, body))
            except StagingError as exc:
                # Transient (S3 down): the records stream still leaves its manifest body in the spool for
                # `trawl stage resume`; the stager refuses to commit records without their outcomes.
                if not exc.transient:
                    raise
                failure = failure or exc
        if failure is not None:
            raise failure
        return manifests[0], manifests[1]


class Stager(Protocol):
    """A staging target: where parts and manifests go, and where the loader finds them."""

    uri: str

    def open_source(self, source: str, run_id: str, started: datetime) -> SourceStage: ...

    async def manifests(self, kind: StreamKind = "raw") -> list[Manifest]: ...

    def read_part(self, part: StagedPart) -> AsyncIterator[bytes]: ...

    async def write_manifest(
        self, kind: StreamKind, source: str, dt: str, run_id: str, body: Mapping[str, Any]
    ) -> Manifest: ...

    async def runs(self) -> list[RunInfo]: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


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
        return self.root / kind / f"source={source}" / f"dt={dt}" / f"run={run_id}"

    def open_source(self, source: str, run_id: str, started: datetime) -> SourceStage:
        """Start staging one source's run; nothing is visible to loaders until ``commit``."""
        dt = started.strftime("%Y-%m-%d")

        def writer(kind: StreamKind) -> PartWriter:
            d = self._run_dir(kind, source, dt, run_id)
            return PartWriter(d, f"file://{d}", self._max_rows, self._max_bytes)

        return SourceStage(self, source, run_id, dt, writer("raw"), writer("outcomes"), started)

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

    async def read_part(self, part: StagedPart) -> AsyncIterator[bytes]:
        """Yield the JSON lines of a part after checking its sha256 against the manifest."""
        path = self._path(part.uri)

        def read() -> bytes:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise StagingError(f"{part.uri}: staged part is missing") from None
            digest = hashlib.sha256(data).hexdigest()
            if digest != part.sha256:
                raise StagingError(f"{part.uri}: sha256 {digest} does not match the manifest's {part.sha256}")
            return zlib.decompress(data, 31)

        for line in (await asyncio.to_thread(read)).splitlines():
            if line:
                yield line


def open_stager(
    url: str,
    *,
    settings: Settings | None = None,
    part_max_records: int | None = None,
    part_max_bytes: int | None = None,
) -> LocalStager | S3Stager:
    """The stager for a staging URL: ``file://DIR``, a plain path, or ``s3://BUCKET[/PREFIX]``.

    Nothing is opened here (a bad URL is a ConfigError at once); use the result
    as ``async with open_stager(url) as stager:``. Part limits default to the
    settings' (``part_max_records``, ``part_max_bytes``), S3 options come from them.
    """
    if settings is None:
        from trawl.settings import Settings

        settings = Settings(staging=url)
    part_max_records = part_max_records or settings.part_max_records
    part_max_bytes = part_max_bytes or settings.part_max_bytes
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        from sinks.s3 import S3Stager

        return S3Stager.from_url(url, settings, part_max_records=part_max_records, part_max_bytes=part_max_bytes)
    if scheme == "file":
        # file://./x is relative (netloc "."); file:///x is absolute
        rest = url[len("file://") :]
        path = Path(rest)
    elif scheme in ("",) or len(scheme) == 1:  # plain path (or a Windows drive letter)
        path = Path(url)
    else:
        raise ConfigError(f"staging {url}: unsupported scheme {scheme!r}; use file://DIR or s3://BUCKET/PREFIX")
    return LocalStager(path, part_max_records=part_max_records, part_max_bytes=part_max_bytes)

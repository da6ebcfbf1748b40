"""What staging is to the engine: staged parts, manifests, and the Stager it writes through.

The crawl engine (:mod:`trawl.crawler`) writes record envelopes and URL outcomes
through these types; the concrete targets (a local directory, S3) live in
:mod:`sinks` and are handed to the engine by the flows. Layout (identical for
every target)::

    {staging}/{raw|outcomes}/source={source}/dt={YYYY-MM-DD}/run={run_id}/part-00001.jsonl.gz
    {staging}/{raw|outcomes}/source={source}/dt={YYYY-MM-DD}/run={run_id}/_manifest.json
    {staging}/archive/source={source}/dt={YYYY-MM-DD}/run={run_id}/part-00001.warc.gz

The archive (:mod:`trawl.archive`: WARC records of the fetched pages) is a third
stream: its parts are closed and checkpointed with the others, its manifest is
written before the records manifest, and the records manifest lists its parts
too (``archive``), so a committed run names every archive file with its sha256.

The manifest lists every part with rows, bytes and sha256 and is written last: a
run directory without a manifest is not loadable; one with a manifest is complete.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import orjson
import structlog

from trawl.archive import ArchiveSink
from trawl.errors import StagingError
from trawl.records import utcnow

__all__ = [
    "MANIFEST",
    "RUN_ID_PATTERN",
    "ArchivePartSink",
    "Manifest",
    "PartSink",
    "RunInfo",
    "SourceStage",
    "StagedPart",
    "Stager",
    "StreamKind",
    "check_run_id",
    "check_run_path",
    "manifest_body",
    "run_path_parts",
    "summarize_runs",
]

StreamKind = Literal["raw", "outcomes", "archive"]
MANIFEST = "_manifest.json"
RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}"
"""A run id, whole (``re.fullmatch``): it becomes a path segment, so no ``/``, ``\\`` or leading dot."""
_SOURCE_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,99}"


log = structlog.get_logger("trawl.staging")


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is safe as a staging path segment; StagingError naming it otherwise."""
    if not isinstance(run_id, str) or not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise StagingError(f"run id {run_id!r} must match {RUN_ID_PATTERN} (it becomes a staging path)")
    return run_id


def check_run_path(source: str, run_id: str) -> None:
    """StagingError unless ``source`` and ``run_id`` are safe as staging path segments (never ``../``)."""
    check_run_id(run_id)
    if not isinstance(source, str) or not re.fullmatch(_SOURCE_SEGMENT, source):
        raise StagingError(f"source name {source!r} cannot be a staging path segment")


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
    archive: tuple[StagedPart, ...] = ()
    """Records manifests: the run's archive parts (WARC), listed with their sha256 like the parts."""
    reextracted_from: str | None = None
    """A run made by ``trawl reextract``: the run whose archive it re-extracted."""

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
                archive=tuple(StagedPart(p["uri"], p["rows"], p["bytes"], p["sha256"]) for p in d.get("archive") or ()),
                reextracted_from=d.get("reextracted_from"),
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


class PartSink(Protocol):
    """One stream of a source's run (records or outcomes), written as parts."""

    @property
    def parts(self) -> list[StagedPart]: ...

    async def write(self, envelope: Mapping[str, Any]) -> None: ...

    async def close(self) -> list[StagedPart]: ...

    async def discard(self) -> None:
        """Drop the open part's file and rows (closed parts stay): the crawl broke off before it closed."""

    async def wait_durable(self) -> bool: ...

    def resume_from(self, parts: list[StagedPart], tag: str = "") -> None: ...


class ArchivePartSink(PartSink, ArchiveSink, Protocol):
    """The archive stream: parts of whole gzip members (WARC records), appended as they are built."""


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
    archive: list[StagedPart] | None = None,
    reextracted_from: str | None = None,
) -> dict[str, Any]:
    """What a manifest says: the run, its status, the declared schema, its stats and every part."""
    extra: dict[str, Any] = {}
    if archive:
        extra["archive"] = [p.as_dict() for p in archive]
    if reextracted_from:
        extra["reextracted_from"] = reextracted_from
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
        **extra,
    }


@dataclass(slots=True)
class SourceStage:
    """The two streams one source writes during one run, and their commit."""

    stager: Stager
    source: str
    run_id: str
    dt: str
    records: PartSink
    outcomes: PartSink
    started_at: datetime = field(default_factory=utcnow)
    archive: ArchivePartSink | None = None
    reextracted_from: str | None = None
    archive_listed: tuple[StagedPart, ...] = ()
    """A re-extracted run archives nothing itself: the archive parts its records point into (the original run's)."""

    def streams(self) -> tuple[tuple[StreamKind, PartSink], ...]:
        """Every stream in the order a checkpoint closes them: the archive after the records, so a closed records
        part never points into an archive part that is still open (a record is written after its page)."""
        archive: tuple[tuple[StreamKind, PartSink], ...] = (("archive", self.archive),) if self.archive else ()
        return (("outcomes", self.outcomes), ("raw", self.records), *archive)

    async def discard(self) -> None:
        """Drop every stream's open part: the crawl was cancelled (or broke) before it could close them."""
        for kind, writer in self.streams():
            try:
                await writer.discard()
            except Exception as exc:  # the others are dropped all the same; the crawl's own error is what it raises
                log.warning("open part not dropped", stream=kind, source=self.source, error=str(exc))

    async def commit(
        self,
        *,
        status: Literal["complete", "failed"],
        schema: Mapping[str, Any],
        stats: Mapping[str, Any],
        error: str | None = None,
        flow_run_id: str | None = None,
    ) -> tuple[Manifest, Manifest]:
        """Close the streams and write their manifests: outcomes and the archive first, records last (the commit)."""
        finished = utcnow()
        manifests = []
        failure: StagingError | None = None
        closed = [(kind, await writer.close()) for kind, writer in self.streams()]  # all on their way first
        archived = next((parts for kind, parts in closed if kind == "archive"), []) or list(self.archive_listed)
        closed.sort(key=lambda c: c[0] == "raw")  # the records manifest last: it is the commit
        for kind, parts in closed:
            if kind == "archive" and not parts:
                continue  # nothing archived (an api source): no archive manifest
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
                archive=archived if kind == "raw" else None,
                reextracted_from=self.reextracted_from,
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
        return manifests[0], manifests[-1]


class Stager(Protocol):
    """A staging target: where parts and manifests go, and where the loader finds them."""

    uri: str

    def open_source(self, source: str, run_id: str, started: datetime) -> SourceStage: ...

    async def manifests(self, kind: StreamKind = "raw") -> list[Manifest]: ...

    def read_part(self, part: StagedPart) -> AsyncIterator[bytes]: ...

    async def read_bytes(self, uri: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of one staged object (an archive part), whole or a range: what lineage and re-extraction read."""
        ...

    async def read_part_data(self, part: StagedPart) -> bytes: ...

    async def read_part_gz(self, part: StagedPart) -> bytes: ...

    async def write_manifest(
        self, kind: StreamKind, source: str, dt: str, run_id: str, body: Mapping[str, Any]
    ) -> Manifest: ...

    async def runs(self) -> list[RunInfo]: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

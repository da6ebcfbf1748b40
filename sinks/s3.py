"""S3 staging on aiobotocore: the same layout as a local directory, under ``s3://BUCKET/PREFIX``.

How a part travels::

    records → gzip (PartWriter) → spool file ──┬─ multipart upload, a chunk at a time as the part grows
                                               └─ (S3 down) kept in the spool, uploaded when S3 is back

Every part is written to a file in the spool directory (``s3_spool_dir``) as it
grows, and each full ``s3_part_size`` chunk is uploaded from that file while the
next records arrive: memory holds at most ``s3_max_concurrency`` chunks, whatever
the crawl's size. A part is deleted from the spool once S3 has all of it. When an
upload fails after botocore's retries (connection errors, 5xx, ``SlowDown``,
throttling), the part's multipart upload is aborted and the whole part waits in
the spool; spool workers retry with backoff and the crawl goes on meanwhile, until
``s3_spool_max_bytes`` of parts wait (then new parts wait for room).

A run's manifest is written only once every one of its parts is in S3. If that
does not happen within ``s3_commit_timeout`` seconds the run fails with a
message naming the spool; the manifest body stays in the spool and
``trawl stage resume RUN_ID`` (or the next crawl) uploads the rest and commits.
Incomplete multipart uploads under the run's prefix are aborted before the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlencode, urlsplit

import orjson
import structlog

from sinks.stage import PartWriter
from trawl.errors import ConfigError, StagingError, StagingUnavailable
from trawl.metrics import METRICS
from trawl.retry import full_jitter, is_transient
from trawl.settings import Settings
from trawl.staging import (
    MANIFEST,
    Manifest,
    RunInfo,
    SourceStage,
    StagedPart,
    StreamKind,
    check_run_id,
    check_run_path,
    run_path_parts,
    summarize_runs,
)

__all__ = ["ResumeResult", "S3Stager", "spooled_parts"]

log = structlog.get_logger("sinks.s3")

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")  # the whole name: fullmatch
_READ_CHUNK = 1024 * 1024


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def spooled_parts(spool_root: Path) -> int:
    """Parts waiting in a spool on disk (every run's), whoever left them there; blocking, run it in a thread."""
    return sum(1 for _ in spool_root.rglob("part-*.jsonl.gz")) if spool_root.is_dir() else 0


@dataclass(frozen=True, slots=True)
class ResumeResult:
    """What ``resume`` did for one spooled run stream."""

    run_id: str
    source: str
    kind: str
    uploaded: int
    committed: bool
    message: str


@dataclass(slots=True)
class _Stream:
    """The multipart upload of the part being written, chunk by chunk from its spool file."""

    key: str
    fd: int
    upload_id: str | None = None
    offset: int = 0
    etags: dict[int, str] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    failed: BaseException | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # the first chunk to get it creates the upload


@dataclass(slots=True)
class _Pending:
    """A closed part that only the spool holds so far."""

    path: Path
    key: str
    run_key: str
    size: int
    attempts: int = 0


class S3PartWriter(PartWriter):
    """A PartWriter whose parts go to S3: written to the spool, uploaded as they grow."""

    def __init__(
        self, stager: S3Stager, directory: Path, run_key: str, max_rows: int, max_bytes: int, *, members: bool = False
    ) -> None:
        super().__init__(directory, f"s3://{stager.bucket}/{run_key}", max_rows, max_bytes, members=members)
        self._stager = stager
        self._run_key = run_key
        self._stream: _Stream | None = None

    def _write_sync(self, data: bytes) -> None:
        super()._write_sync(data)
        self._file.flush()  # chunks are read back from the file by offset: the bytes must be in it

    async def discard(self) -> None:
        """As a local part's, and the part's streamed upload (if it began) is wound up in the background: its
        chunk uploads finish, the multipart upload is aborted, the spool file's descriptor closed."""
        stream, self._stream = self._stream, None
        if stream is not None:
            self._stager._spawn(self._stager._drop_stream(stream), f"trawl-s3-drop:{stream.key}")
        await super().discard()

    async def _part_opening(self) -> None:
        await self._stager._room()
        self._stream = None

    async def _flushed(self, written: int) -> None:
        size = self._stager.part_size
        if self._stream is None:
            if written < size or not self._stager.healthy:
                return
            path = self._dir / f"{self._name()}.partial"
            key = f"{self._run_key}/{self._name()}"
            self._stream = _Stream(key, await asyncio.to_thread(os.open, path, os.O_RDONLY))
        stream = self._stream
        while stream.failed is None and written - stream.offset >= size:
            self._stager._upload_chunk(stream, stream.offset, size)
            stream.offset += size

    async def _part_closed(self, part: StagedPart, path: Path) -> None:
        stream, self._stream = self._stream, None
        self._stager._part_done(self._run_key, part, path, stream)

    async def wait_durable(self) -> bool:
        """Wait (up to ``s3_commit_timeout``) until every closed part of this run is in S3; False if some are not."""
        st = self._stager
        async with st._changed:
            try:
                await asyncio.wait_for(
                    st._changed.wait_for(lambda: not st._outstanding.get(self._run_key)),
                    st.settings.s3_commit_timeout,
                )
            except TimeoutError:
                return False
        return True


class S3Stager:
    """``s3://BUCKET/PREFIX``: parts and manifests as S3 objects, laid out as on a local disk."""

    def __init__(self, bucket: str, prefix: str, settings: Settings, *, part_max_records: int, part_max_bytes: int):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.settings = settings
        self.part_size = settings.s3_part_size
        self.spool_root = Path(settings.s3_spool_dir).resolve() / bucket
        for kind in ("transient", "permanent"):  # from 0, so rate() sees the first failures of a short run
            METRICS.s3_upload_failures.labels(kind)
        self._max_rows = part_max_records
        self._max_bytes = part_max_bytes
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._sem = asyncio.Semaphore(settings.s3_max_concurrency)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self._outstanding: dict[str, set[str]] = {}  # run key → part keys not yet in S3
        self._errors: dict[str, list[str]] = {}  # run key → permanent upload errors
        self._deadlines: dict[tuple[str, str], float] = {}
        self._failed_runs: set[tuple[str, str]] = set()  # (source, run id) whose outcomes could not commit
        self._spooled_bytes = 0  # closed parts on their way to S3
        self._waiting: set[str] = set()  # keys of parts whose upload failed, waiting in the spool for S3
        self.healthy = True

    @staticmethod
    def check_url(url: str) -> None:
        """A ConfigError unless ``url`` is ``s3://BUCKET[/PREFIX]`` with a valid bucket name."""
        bucket = urlsplit(url).netloc
        if not _BUCKET.fullmatch(bucket or ""):
            raise ConfigError(f"staging {url}: {bucket!r} is not a valid S3 bucket name")

    @classmethod
    def from_url(cls, url: str, settings: Settings, *, part_max_records: int, part_max_bytes: int) -> S3Stager:
        """Check an ``s3://BUCKET[/PREFIX]`` URL (a ConfigError when malformed); opens nothing."""
        cls.check_url(url)
        parts = urlsplit(url)
        if settings.s3_sse != "aws:kms" and settings.s3_sse_kms_key_id:
            raise ConfigError("setting TRAWL_S3_SSE_KMS_KEY_ID needs TRAWL_S3_SSE=aws:kms")
        return cls(parts.netloc, parts.path, settings, part_max_records=part_max_records, part_max_bytes=part_max_bytes)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        s = self.settings
        config = AioConfig(
            s3={"addressing_style": s.s3_addressing_style},
            retries={"max_attempts": s.s3_max_attempts, "mode": "standard"},
            connect_timeout=s.s3_connect_timeout,
            read_timeout=s.s3_read_timeout,
            max_pool_connections=max(10, 2 * s.s3_max_concurrency),
        )
        self._stack = contextlib.AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            get_session().create_client("s3", region_name=s.s3_region, endpoint_url=s.s3_endpoint_url, config=config)
        )
        self._queue = asyncio.Queue()
        self._workers = [
            asyncio.create_task(self._spool_worker(), name=f"trawl-s3-spool-{i}") for i in range(s.s3_max_concurrency)
        ]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in [*self._workers, *self._background]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._background, return_exceptions=True)
        self._workers.clear()
        self._background.clear()
        if self._stack is not None:
            await self._stack.aclose()
        self._client = self._stack = self._queue = None

    @property
    def spooled(self) -> int:
        """Parts waiting in the spool because their upload failed (S3 down); they go up when it answers."""
        return len(self._waiting)

    @property
    def spooled_bytes(self) -> int:
        """Bytes of closed parts not in S3 yet (queued or waiting), what ``TRAWL_S3_SPOOL_MAX_BYTES`` bounds."""
        return self._spooled_bytes

    @property
    def client(self) -> Any:
        if self._client is None:
            raise StagingError(f"{self.uri}: the S3 stager is not open (use `async with open_stager(url)`)")
        return self._client

    # -- writing ---------------------------------------------------------------------------------------------

    def _run_key(self, kind: StreamKind, source: str, dt: str, run_id: str) -> str:
        check_run_path(source, run_id)  # never a key (or spool path) outside the prefix (`../`)
        return f"{self.prefix}{kind}/source={source}/dt={dt}/run={run_id}"

    def _object_args(self, key: str) -> dict[str, Any]:
        s = self.settings
        args: dict[str, Any] = {}
        if s.s3_sse:
            args["ServerSideEncryption"] = s.s3_sse
            if s.s3_sse_kms_key_id:
                args["SSEKMSKeyId"] = s.s3_sse_kms_key_id
        if s.s3_storage_class:
            args["StorageClass"] = s.s3_storage_class
        ident = run_path_parts(key)
        if s.s3_tagging and ident is not None:
            args["Tagging"] = urlencode({"source": ident[0], "run_id": ident[2]})
        return args

    def open_source(self, source: str, run_id: str, started: datetime) -> SourceStage:
        """Start staging one source's run; nothing is visible to loaders until ``commit``."""
        dt = started.strftime("%Y-%m-%d")

        def writer(kind: StreamKind) -> S3PartWriter:
            run_key = self._run_key(kind, source, dt, run_id)
            self._outstanding.setdefault(run_key, set())
            return S3PartWriter(
                self, self.spool_root / run_key, run_key, self._max_rows, self._max_bytes, members=kind == "archive"
            )

        return SourceStage(
            self, source, run_id, dt, writer("raw"), writer("outcomes"), started, archive=writer("archive")
        )

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _room(self) -> None:
        """Wait while the spool holds ``s3_spool_max_bytes`` of parts on their way to S3 (back-pressure).

        Gives up after ``s3_commit_timeout`` seconds without room: S3 has been gone too long for this run.
        """
        limit = self.settings.s3_spool_max_bytes
        if self._spooled_bytes < limit:
            return
        log.warning("spool full: waiting for S3", spool=str(self.spool_root), spooled_bytes=self._spooled_bytes)
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._spooled_bytes < limit), self.settings.s3_commit_timeout
                )
        except TimeoutError:
            raise StagingUnavailable(
                f"{self.uri}: the spool {self.spool_root} is full ({self._spooled_bytes} bytes waiting, "
                f"TRAWL_S3_SPOOL_MAX_BYTES={limit}) and S3 "
                f"({self.settings.s3_endpoint_url or 'AWS S3'}) did not take any for "
                f"{self.settings.s3_commit_timeout:g}s"
            ) from None

    def _upload_chunk(self, stream: _Stream, offset: int, length: int) -> None:
        number = offset // self.part_size + 1

        async def run() -> None:
            try:
                async with self._sem:
                    async with stream.lock:
                        if stream.failed is not None:
                            return
                        if stream.upload_id is None:
                            resp = await self.client.create_multipart_upload(
                                Bucket=self.bucket, Key=stream.key, **self._object_args(stream.key)
                            )
                            stream.upload_id = resp["UploadId"]
                    data = await asyncio.to_thread(os.pread, stream.fd, length, offset)
                    resp = await self.client.upload_part(
                        Bucket=self.bucket, Key=stream.key, UploadId=stream.upload_id, PartNumber=number, Body=data
                    )
                    stream.etags[number] = resp["ETag"]
                    self._count_upload(stream.key, len(data))
            except Exception as exc:
                stream.failed = exc
                if is_transient(exc):
                    self.healthy = False  # new parts go straight to the spool until an upload succeeds again

        task = asyncio.create_task(run(), name=f"trawl-s3-chunk:{stream.key}#{number}")
        stream.tasks.append(task)
        self._background.add(task)  # cancelled with the stager if its part never closes (a crashed crawl)
        task.add_done_callback(self._background.discard)

    def _count_upload(self, key: str, size: int) -> None:
        ident = run_path_parts(key)
        METRICS.s3_uploaded_bytes.labels(ident[0] if ident else "unknown").inc(size)

    def _part_done(self, run_key: str, part: StagedPart, path: Path, stream: _Stream | None) -> None:
        """A part's file is complete: finish its streamed upload, or hand it to the spool workers."""
        key = part.uri.removeprefix(f"s3://{self.bucket}/")
        self._outstanding.setdefault(run_key, set()).add(key)
        self._spooled_bytes += part.bytes
        pending = _Pending(path, key, run_key, part.bytes)
        if stream is None:
            self._enqueue(pending)
        else:
            self._spawn(self._finish_stream(stream, pending), f"trawl-s3-finish:{key}")

    def _enqueue(self, pending: _Pending) -> None:
        assert self._queue is not None, "stager not open"
        self._queue.put_nowait(pending)

    async def _finish_stream(self, stream: _Stream, pending: _Pending) -> None:
        try:
            for task in list(stream.tasks):
                await task
            if stream.failed is not None:
                raise stream.failed
            if pending.size > stream.offset:
                self._upload_chunk(stream, stream.offset, pending.size - stream.offset)
                await stream.tasks[-1]
                if stream.failed is not None:
                    raise stream.failed
            async with self._sem:
                await self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=stream.key,
                    UploadId=stream.upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in sorted(stream.etags.items())]},
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            transient = is_transient(exc)
            if transient:
                self.healthy = False
            log.warning("part upload failed: spooled", object=f"s3://{self.bucket}/{pending.key}", error=_describe(exc))
            METRICS.s3_upload_failures.labels("transient" if transient else "permanent").inc()
            if stream.upload_id is not None:
                await self._abort(stream.key, stream.upload_id)
            self._waiting.add(pending.key)
            METRICS.s3_spooled_parts.set(len(self._waiting))
            self._enqueue(pending)
        else:
            await self._uploaded(pending)
        finally:
            await asyncio.to_thread(os.close, stream.fd)

    async def _drop_stream(self, stream: _Stream) -> None:
        """A discarded part's upload: let the chunks under way end (they read its spool file), then abort it."""
        try:
            stream.failed = stream.failed or StagingError(f"s3://{self.bucket}/{stream.key}: the part was discarded")
            await asyncio.gather(*stream.tasks, return_exceptions=True)
            if stream.upload_id is not None:
                await self._abort(stream.key, stream.upload_id)
        finally:
            await asyncio.to_thread(os.close, stream.fd)

    async def _abort(self, key: str, upload_id: str) -> None:
        """Abort an incomplete multipart upload (best effort: a sweep before the commit catches the rest)."""
        try:
            await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            log.info("abort of an incomplete upload deferred", object=f"s3://{self.bucket}/{key}", error=_describe(exc))

    async def _uploaded(self, pending: _Pending) -> None:
        await asyncio.to_thread(pending.path.unlink, True)
        self._spooled_bytes -= pending.size
        self._outstanding.get(pending.run_key, set()).discard(pending.key)
        self._waiting.discard(pending.key)
        METRICS.s3_spooled_parts.set(len(self._waiting))
        await self._notify()

    async def _spool_worker(self) -> None:
        """Upload spooled parts; while S3 is down, retry with exponential backoff and full jitter."""
        assert self._queue is not None
        s = self.settings
        while True:
            pending = await self._queue.get()
            while True:
                try:
                    await self._upload_file(pending.path, pending.key)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    transient = is_transient(exc)
                    METRICS.s3_upload_failures.labels("transient" if transient else "permanent").inc()
                    if not transient:
                        log.error(
                            "part upload failed", object=f"s3://{self.bucket}/{pending.key}", error=_describe(exc)
                        )
                        self._errors.setdefault(pending.run_key, []).append(
                            f"s3://{self.bucket}/{pending.key}: {_describe(exc)}"
                        )
                        self._outstanding.get(pending.run_key, set()).discard(pending.key)
                        self._waiting.discard(pending.key)
                        await self._notify()
                        break
                    self.healthy = False
                    self._waiting.add(pending.key)
                    METRICS.s3_spooled_parts.set(len(self._waiting))
                    pending.attempts += 1
                    delay = full_jitter(pending.attempts, s.s3_backoff_base, s.s3_backoff_max)
                    log.info(
                        "S3 unavailable: part stays spooled",
                        object=f"s3://{self.bucket}/{pending.key}",
                        retry_in=round(delay, 2),
                        error=_describe(exc),
                    )
                    await asyncio.sleep(delay)
                else:
                    if not self.healthy:
                        log.info("S3 is back: uploading spooled parts", endpoint=s.s3_endpoint_url or "aws")
                    self.healthy = True
                    await self._uploaded(pending)
                    break

    async def _upload_file(self, path: Path, key: str) -> None:
        """One file to one object: a single PUT when it fits in a chunk, else a multipart upload."""
        size = (await asyncio.to_thread(path.stat)).st_size
        args = self._object_args(key)
        if size <= self.part_size:
            async with self._sem:
                data = await asyncio.to_thread(path.read_bytes)
                await self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **args)
            self._count_upload(key, size)
            return
        upload_id = (await self.client.create_multipart_upload(Bucket=self.bucket, Key=key, **args))["UploadId"]
        try:
            parts = []
            with open(path, "rb") as f:  # noqa: ASYNC230 - reads happen in a thread below
                for number, offset in enumerate(range(0, size, self.part_size), start=1):
                    async with self._sem:
                        data = await asyncio.to_thread(os.pread, f.fileno(), self.part_size, offset)
                        resp = await self.client.upload_part(
                            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                        )
                    parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                    self._count_upload(key, len(data))
            await self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            await self._abort(key, upload_id)
            raise

    async def _abort_stale(self, run_key: str) -> None:
        """Abort every incomplete multipart upload under a run's prefix (left by parts that failed)."""
        paginator = self.client.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{run_key}/"):
            for upload in page.get("Uploads", []):
                await self._abort(upload["Key"], upload["UploadId"])

    async def write_manifest(
        self, kind: StreamKind, source: str, dt: str, run_id: str, body: Mapping[str, Any]
    ) -> Manifest:
        """The commit: once every part of the run is in S3, the manifest object; else a StagingError."""
        run_key = self._run_key(kind, source, dt, run_id)
        data = orjson.dumps(body, option=orjson.OPT_INDENT_2)
        spool = self.spool_root / run_key
        await asyncio.to_thread(_write_file, spool / MANIFEST, data)  # what `trawl stage resume` commits
        loop = asyncio.get_running_loop()
        deadline = self._deadlines.setdefault((source, run_id), loop.time() + self.settings.s3_commit_timeout)
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: not self._outstanding.get(run_key)),
                    max(0.0, deadline - loop.time()),
                )
        if (source, run_id) in self._failed_runs:  # its outcomes did not commit: neither may its records
            raise StagingUnavailable(self._down_message(source, dt, run_id))
        if self._errors.get(run_key):
            raise StagingError(
                f"source {source} run {run_id}: S3 refused parts ({'; '.join(self._errors[run_key])}); "
                f"they are kept in {spool}; the manifest was not written"
            )
        if self._outstanding.get(run_key):
            self._failed_runs.add((source, run_id))
            raise StagingUnavailable(self._down_message(source, dt, run_id))
        try:
            await self._abort_stale(run_key)
            await self.client.put_object(
                Bucket=self.bucket,
                Key=f"{run_key}/{MANIFEST}",
                Body=data,
                ContentType="application/json",
                **self._object_args(run_key + "/"),
            )
        except Exception as exc:
            self._failed_runs.add((source, run_id))
            if not is_transient(exc):
                raise StagingError(f"s3://{self.bucket}/{run_key}/{MANIFEST}: {_describe(exc)}") from None
            raise StagingUnavailable(self._down_message(source, dt, run_id)) from None
        self._outstanding.pop(run_key, None)
        await asyncio.to_thread(_remove_run_dir, spool, self.spool_root)
        return Manifest.from_json(f"s3://{self.bucket}/{run_key}/{MANIFEST}", data)

    def _down_message(self, source: str, dt: str, run_id: str) -> str:
        where = self.settings.s3_endpoint_url or "AWS S3"
        waiting = sum(len(keys) for k, keys in self._outstanding.items() if run_path_parts(k) == (source, dt, run_id))
        return (
            f"source {source} run {run_id}: S3 ({where}) still unavailable after "
            f"{self.settings.s3_commit_timeout:g}s; {waiting} part(s) wait in the spool {self.spool_root}, "
            f"the manifests were not written. Run `trawl stage resume {run_id} --staging {self.uri}` "
            "once S3 is back (the next crawl also tries)."
        )

    # -- resuming --------------------------------------------------------------------------------------------

    def _spooled_runs(self, run_id: str | None) -> list[Path]:
        base = self.spool_root / self.prefix if self.prefix else self.spool_root
        found = []
        for kind in ("outcomes", "archive", "raw"):  # records last: their manifest is the commit
            d = base / kind
            if d.is_dir():
                found.extend(sorted(d.glob(f"source=*/dt=*/run={run_id or '*'}")))
        return found

    async def resume(self, run_id: str | None = None) -> list[ResumeResult]:
        """Finish staging runs left in the spool (one run, or all): upload their parts, then their manifests."""
        if run_id is not None:
            check_run_id(run_id)  # it becomes a glob under the spool
        results = []
        for spool in await asyncio.to_thread(self._spooled_runs, run_id):
            results.append(await self._resume_one(spool))
        return results

    async def _resume_one(self, spool: Path) -> ResumeResult:
        run_key = spool.relative_to(self.spool_root).as_posix()
        source, _dt, run_id = run_path_parts(run_key) or ("?", "?", "?")
        kind = run_key.removeprefix(self.prefix).split("/", 1)[0]
        raw = await asyncio.to_thread(_read_or_none, spool / MANIFEST)
        files = sorted(
            p for p in await asyncio.to_thread(lambda: [*spool.glob("part-*.jsonl.gz"), *spool.glob("part-*.warc.gz")])
        )
        if raw is None:
            for path in files:
                await self._upload_file(path, f"{run_key}/{path.name}")
                await asyncio.to_thread(path.unlink)
            return ResumeResult(
                run_id, source, kind, len(files), False, "no manifest in the spool (the crawl did not finish)"
            )
        manifest = Manifest.from_json(f"s3://{self.bucket}/{run_key}/{MANIFEST}", raw)
        uploaded = 0
        for part in manifest.parts:
            name = part.uri.rsplit("/", 1)[1]
            path = spool / name
            data_sha = await asyncio.to_thread(_sha256_or_none, path)
            if data_sha is not None:
                if data_sha != part.sha256:
                    raise StagingError(f"{path}: sha256 {data_sha} does not match the manifest's {part.sha256}")
                await self._upload_file(path, f"{run_key}/{name}")
                await asyncio.to_thread(path.unlink)
                uploaded += 1
            else:
                await self._check_present(part)
        await self._abort_stale(run_key)
        await self.client.put_object(
            Bucket=self.bucket,
            Key=f"{run_key}/{MANIFEST}",
            Body=raw,
            ContentType="application/json",
            **self._object_args(run_key + "/"),
        )
        await asyncio.to_thread(_remove_run_dir, spool, self.spool_root)
        log.info("spooled run committed", source=source, run_id=run_id, kind=kind, uploaded=uploaded)
        return ResumeResult(run_id, source, kind, uploaded, True, f"{uploaded} part(s) uploaded, manifest written")

    async def _check_present(self, part: StagedPart) -> None:
        key = self._key(part.uri)
        try:
            head = await self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if is_transient(exc):
                raise
            raise StagingError(f"{part.uri}: staged part is missing (neither in S3 nor in the spool)") from None
        if head["ContentLength"] != part.bytes:
            raise StagingError(f"{part.uri}: {head['ContentLength']} bytes in S3, the manifest says {part.bytes}")

    # -- reading ---------------------------------------------------------------------------------------------

    def _key(self, uri: str) -> str:
        head = f"s3://{self.bucket}/"
        key = uri.removeprefix(head)
        if not uri.startswith(head) or not key.startswith(self.prefix) or ".." in key.split("/"):
            raise StagingError(f"{uri} is not inside the staging target {self.uri}")
        return key

    async def _keys(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"], obj["Size"]

    async def _get(self, key: str) -> bytes:
        resp = await self.client.get_object(Bucket=self.bucket, Key=key)
        async with resp["Body"] as body:
            data: bytes = await body.read()
        return data

    async def manifests(self, kind: StreamKind = "raw") -> list[Manifest]:
        """Every committed run of one stream, oldest first."""
        keys = [k async for k, _ in self._keys(f"{self.prefix}{kind}/") if k.endswith(f"/{MANIFEST}")]
        sem = asyncio.Semaphore(16)

        async def one(key: str) -> Manifest:
            async with sem:
                return Manifest.from_json(f"s3://{self.bucket}/{key}", await self._get(key))

        found = await asyncio.gather(*(one(k) for k in keys))
        return sorted(found, key=lambda m: (m.started_at, m.source))

    async def runs(self) -> list[RunInfo]:
        """Every run with record parts in S3 or the spool, or a records manifest: committed or incomplete."""
        objects: dict[tuple[str, str, str], tuple[int, int]] = {}
        async for key, size in self._keys(f"{self.prefix}raw/"):
            ident = run_path_parts(key)
            if ident is not None and key.rsplit("/", 1)[1].startswith("part-"):
                count, total = objects.get(ident, (0, 0))
                objects[ident] = (count + 1, total + size)

        def scan() -> dict[tuple[str, str, str], tuple[int, int]]:
            out = {}
            for d in self._spooled_runs(None):
                ident = run_path_parts(d.relative_to(self.spool_root).as_posix())
                if ident is not None and d.relative_to(self.spool_root).as_posix().startswith(f"{self.prefix}raw/"):
                    sizes = [p.stat().st_size for p in d.glob("part-*.jsonl.gz")]
                    out[ident] = (len(sizes), sum(sizes))
            return out

        spooled = await asyncio.to_thread(scan)
        for ident, (count, size) in spooled.items():
            c, t = objects.get(ident, (0, 0))
            objects[ident] = (c + count, t + size)
        runs = summarize_runs(await self.manifests("raw"), objects)
        return [
            replace(r, spooled=spooled[(r.source, r.dt, r.run_id)][0])
            if r.state == "incomplete" and (r.source, r.dt, r.run_id) in spooled
            else r
            for r in runs
        ]

    async def read_bytes(self, uri: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of a staged object (an archive part), whole or a range (an S3 ranged GET)."""
        key = self._key(uri)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            args["Range"] = f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))
        try:
            resp = await self.client.get_object(**args)
            async with resp["Body"] as body:
                data: bytes = await body.read()
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise StagingError(f"{uri}: staged object is missing") from None
            if is_transient(exc):
                raise StagingUnavailable(f"{uri}: S3 unavailable: {_describe(exc)}") from None
            raise StagingError(f"{uri}: {_describe(exc)}") from None
        return data

    async def read_part(self, part: StagedPart) -> AsyncIterator[bytes]:
        """Yield a part's JSON lines, streamed from S3 and checked against the manifest's sha256 first."""
        for line in (await self.read_part_data(part)).splitlines():
            if line:
                yield line

    async def read_part_data(self, part: StagedPart) -> bytes:
        """A part's JSON lines as one block of bytes, streamed from S3 and checked against its sha256 first."""
        data = await self.read_part_gz(part)
        try:
            return await asyncio.to_thread(zlib.decompress, data, 31)
        except zlib.error as exc:
            raise StagingError(f"{part.uri}: not a gzip part: {exc}") from None

    async def read_part_gz(self, part: StagedPart) -> bytes:
        """A part as it is staged (gzip JSON lines), streamed from S3 and checked against its sha256."""
        key = self._key(part.uri)
        sha = hashlib.sha256()
        out: list[bytes] = []
        try:
            resp = await self.client.get_object(Bucket=self.bucket, Key=key)
            async with resp["Body"] as body:
                while chunk := await body.read(_READ_CHUNK):
                    sha.update(chunk)
                    out.append(chunk)
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise StagingError(f"{part.uri}: staged part is missing") from None
            if is_transient(exc):
                raise StagingUnavailable(f"{part.uri}: S3 unavailable: {_describe(exc)}") from None
            raise StagingError(f"{part.uri}: {_describe(exc)}") from None
        digest = sha.hexdigest()
        if digest != part.sha256:
            raise StagingError(f"{part.uri}: sha256 {digest} does not match the manifest's {part.sha256}")
        return b"".join(out)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _sha256_or_none(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def _remove_run_dir(spool: Path, root: Path) -> None:
    """Remove a committed run's spool directory and the parents it leaves empty."""
    shutil.rmtree(spool, ignore_errors=True)
    d = spool.parent
    while d != root and d.is_relative_to(root):
        try:
            d.rmdir()
        except OSError:
            break
        d = d.parent

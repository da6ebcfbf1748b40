"""Staging on local disk: layout, part rolling, manifests last, verified reads, and the staging URL."""

from __future__ import annotations

import asyncio
import hashlib
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from sinks.s3 import S3Stager
from sinks.stage import LocalStager, PartWriter
from sinks.targets import open_stager
from tests.helpers.staged import part_lines
from trawl.errors import ConfigError, StagingError
from trawl.records import Outcome, OutcomeKind, Record
from trawl.settings import Settings
from trawl.staging import Manifest, RunInfo, SourceStage, StagedPart

STARTED = datetime(2026, 3, 14, 23, 59, 30, 123456, tzinfo=UTC)
RUN = "20260314T235930Z-abc123"
SCHEMA: dict[str, Any] = {"key": ["id"], "fields": {"id": {"type": "int", "required": True}}}


def record(i: int, *, source: str = "shop", run_id: str = RUN) -> Record:
    return Record(
        source=source,
        key=str(i),
        url=f"https://example.test/item/{i}",
        fetched_at=STARTED + timedelta(seconds=i),
        run_id=run_id,
        data={"id": i, "name": f"item {i}"},
    )


def outcome(i: int, *, source: str = "shop") -> Outcome:
    return Outcome(
        run_id=RUN,
        source=source,
        url=f"https://example.test/item/{i}",
        outcome=OutcomeKind.FETCHED,
        http_status=200,
        attempts=1,
        bytes=100 + i,
        elapsed_ms=5,
        at=STARTED + timedelta(seconds=i),
    )


def local(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(uri.removeprefix("file://"))


# Tests read what was staged off the event loop too (the suite fails blocking calls on it: tests/conftest.py).


async def read_bytes(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


async def lines(path: Path) -> list[dict[str, Any]]:
    return await asyncio.to_thread(lambda: list(part_lines(path)))


async def names(directory: Path) -> list[str]:
    return [p.name for p in await asyncio.to_thread(lambda: list(directory.iterdir()))]


async def local_stager(root: Path, **limits: int) -> LocalStager:
    """A LocalStager built off the loop (its constructor resolves the path)."""
    return await asyncio.to_thread(lambda: LocalStager(root, **limits))


def expected_json(envelope: dict[str, Any]) -> dict[str, Any]:
    """What a staged envelope reads back as: datetimes become ISO 8601 strings."""
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in envelope.items()}


async def stage_records(stager: LocalStager, n: int, *, source: str = "shop", run_id: str = RUN) -> SourceStage:
    stage = stager.open_source(source, run_id, STARTED)
    for i in range(n):
        await stage.records.write(record(i, source=source, run_id=run_id).envelope())
    return stage


async def test_layout_paths_and_part_rolling_by_record_count(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path, part_max_records=10)
    stage = await stage_records(stager, 25)
    for i in range(3):
        await stage.outcomes.write(outcome(i).envelope())
    outcomes, raw = await stage.commit(status="complete", schema=SCHEMA, stats={"records": 25})

    run_dir = tmp_path / "raw" / "source=shop" / "dt=2026-03-14" / f"run={RUN}"
    out_dir = tmp_path / "outcomes" / "source=shop" / "dt=2026-03-14" / f"run={RUN}"
    assert sorted(await names(run_dir)) == [
        "_manifest.json",
        "part-00001.jsonl.gz",
        "part-00002.jsonl.gz",
        "part-00003.jsonl.gz",
    ]
    assert sorted(await names(out_dir)) == ["_manifest.json", "part-00001.jsonl.gz"]
    assert [p.rows for p in raw.parts] == [10, 10, 5]
    assert [p.uri for p in raw.parts] == [f"file://{run_dir}/part-0000{n}.jsonl.gz" for n in (1, 2, 3)]
    assert raw.uri == f"file://{run_dir}/_manifest.json"
    assert outcomes.uri == f"file://{out_dir}/_manifest.json"
    assert (raw.kind, raw.source, raw.run_id, raw.dt, raw.status, raw.rows) == (
        "raw",
        "shop",
        RUN,
        "2026-03-14",
        "complete",
        25,
    )
    assert (outcomes.kind, outcomes.rows, len(outcomes.parts)) == ("outcomes", 3, 1)
    assert stager.uri == f"file://{await asyncio.to_thread(tmp_path.resolve)}"


async def test_manifest_matches_files_on_disk_and_lines_are_the_envelopes(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path, part_max_records=10)
    stage = await stage_records(stager, 25)
    await stage.outcomes.write(outcome(7).envelope())
    outcomes, raw = await stage.commit(status="complete", schema=SCHEMA, stats={"records": 25}, flow_run_id="fr-1")

    staged: list[dict[str, Any]] = []
    for part in raw.parts:
        data = await read_bytes(local(part.uri))
        assert part.bytes == len(data)
        assert part.sha256 == hashlib.sha256(data).hexdigest()
        part_lines = await lines(local(part.uri))
        assert len(part_lines) == part.rows
        staged.extend(part_lines)
    assert staged == [expected_json(record(i).envelope()) for i in range(25)]
    assert staged[3]["fetched_at"] == "2026-03-14T23:59:33.123456+00:00"
    assert await lines(local(outcomes.parts[0].uri)) == [expected_json(outcome(7).envelope())]

    body = orjson.loads(await read_bytes(local(raw.uri)))
    assert body["parts"] == [p.as_dict() for p in raw.parts]
    assert body["rows"] == 25
    assert body["schema"] == SCHEMA
    assert body["stats"] == {"records": 25}
    assert body["flow_run_id"] == "fr-1"
    assert body["started_at"] == STARTED.isoformat()
    assert datetime.fromisoformat(body["finished_at"]) >= STARTED
    assert Manifest.from_json(raw.uri, await read_bytes(local(raw.uri))) == raw


async def test_read_part_yields_the_verified_lines(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path, part_max_records=4)
    stage = await stage_records(stager, 6)
    _, raw = await stage.commit(status="complete", schema=SCHEMA, stats={})

    read = [orjson.loads(line) for part in raw.parts async for line in stager.read_part(part)]

    assert [r["key"] for r in read] == [str(i) for i in range(6)]
    assert read[5] == expected_json(record(5).envelope())


async def test_parts_roll_at_part_max_bytes(tmp_path: Path) -> None:
    max_bytes = 32 * 1024
    stager = await local_stager(tmp_path, part_max_records=1_000_000, part_max_bytes=max_bytes)
    stage = stager.open_source("blobs", RUN, STARTED)
    rng = random.Random(7)  # incompressible payload, so compressed size tracks input size
    n = 1500
    for i in range(n):
        await stage.records.write({"i": i, "blob": rng.randbytes(300).hex()})
    _, raw = await stage.commit(status="complete", schema={}, stats={})

    sizes = [p.bytes for p in raw.parts]
    assert len(raw.parts) >= 5, sizes
    assert sum(p.rows for p in raw.parts) == n
    # A part closes at the first flush past max_bytes; the compressor (ISA-L) holds up to ~100 KB of its input
    # before it emits, so a part can overshoot by that much.
    assert all(max_bytes <= size < max_bytes + 128 * 1024 for size in sizes[:-1]), sizes
    # A part closed by size must not leave the next one closing after a single row.
    assert all(p.rows > 1 for p in raw.parts), [p.rows for p in raw.parts]
    assert [p.bytes for p in raw.parts] == [(await asyncio.to_thread(local(p.uri).stat)).st_size for p in raw.parts]
    keys = [line["i"] for p in raw.parts for line in await lines(local(p.uri))]
    assert keys == list(range(n))


async def test_a_discarded_stream_drops_its_open_part_and_what_comes_after(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path, part_max_records=1_000_000, part_max_bytes=64 * 1024 * 1024)
    stage = stager.open_source("blobs", RUN, STARTED)
    for i in range(3000):  # past the flush threshold: the part's file is open
        await stage.records.write({"i": i, "blob": "x" * 200})
    files = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.rglob("*") if p.is_file()))
    assert files == ["part-00001.jsonl.gz.partial"]
    await stage.discard()
    await stage.records.write({"i": -1})  # a worker's row after the discard: dropped
    assert stage.records.parts == [] and stage.records.rows == 0
    assert stage.archive is not None
    with pytest.raises(StagingError, match="discarded"):
        await stage.archive.append(b"member")
    stage.records._flush_sync(b"late")  # a write that was still under way in its thread: no file reopened
    assert await asyncio.to_thread(lambda: [p for p in tmp_path.rglob("*") if p.is_file()]) == []


async def test_nothing_is_loadable_before_commit(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path, part_max_records=10)
    done = await stage_records(stager, 3, source="done", run_id="run-a")
    await done.commit(status="complete", schema=SCHEMA, stats={})
    stage = await stage_records(stager, 15, source="shop", run_id="run-b")

    assert [m.source for m in await stager.manifests()] == ["done"]
    assert [m.source for m in await stager.manifests("outcomes")] == ["done"]
    run_dir = tmp_path / "raw" / "source=shop" / "dt=2026-03-14" / "run=run-b"
    # The first part closed at 10 rows; the 5 buffered rows are not on disk; no manifest yet.
    assert sorted(await names(run_dir)) == ["part-00001.jsonl.gz"]
    assert stage.records.rows == 15

    _, raw = await stage.commit(status="complete", schema=SCHEMA, stats={})

    listed = await stager.manifests()
    assert [(m.source, m.run_id, m.rows) for m in listed] == [("done", "run-a", 3), ("shop", "run-b", 15)]
    assert listed[1] == raw
    assert [(m.source, m.rows) for m in await stager.manifests("outcomes")] == [("done", 0), ("shop", 0)]
    assert not await asyncio.to_thread(lambda: list(tmp_path.rglob("*.partial")))


async def test_open_part_is_partial_until_closed(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path / "d", "file://x", max_rows=1000, max_bytes=1 << 20)
    rng = random.Random(1)
    for i in range(70):  # past the 256 KiB write buffer, below both part limits
        await writer.write({"i": i, "blob": rng.randbytes(2000).hex()})

    assert writer.parts == []
    assert await names(tmp_path / "d") == ["part-00001.jsonl.gz.partial"]

    parts = await writer.close()

    assert [p.rows for p in parts] == [70]
    assert await names(tmp_path / "d") == ["part-00001.jsonl.gz"]


async def test_failed_status_and_error_are_preserved(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path)
    stage = await stage_records(stager, 2)
    await stage.outcomes.write(
        Outcome(
            RUN,
            "shop",
            "https://example.test/p3",
            OutcomeKind.FAILED,
            http_status=503,
            attempts=4,
            error="503 Service Unavailable",
            at=STARTED,
        ).envelope()
    )
    outcomes, raw = await stage.commit(
        status="failed", schema=SCHEMA, stats={"failed": 1}, error="too many failures on example.test"
    )

    [listed] = await stager.manifests()
    [listed_outcomes] = await stager.manifests("outcomes")
    for m in (raw, outcomes, listed, listed_outcomes):
        assert m.status == "failed"
        assert m.error == "too many failures on example.test"
    assert listed.rows == 2
    assert (await lines(local(listed_outcomes.parts[0].uri)))[0]["error"] == "503 Service Unavailable"


async def test_empty_run_commits_a_manifest_without_parts(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path)
    outcomes, raw = await stager.open_source("empty", RUN, STARTED).commit(status="complete", schema={}, stats={})

    assert (raw.parts, raw.rows, outcomes.parts) == ((), 0, ())
    assert [m.source for m in await stager.manifests()] == ["empty"]


async def test_manifests_are_listed_oldest_first(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path)
    for source, hours in (("b", 2), ("a", 1), ("c", 0)):
        stage = stager.open_source(source, f"run-{source}", STARTED - timedelta(hours=hours))
        await stage.commit(status="complete", schema={}, stats={})

    assert [m.source for m in await stager.manifests()] == ["b", "a", "c"]


async def test_unreadable_manifest_is_a_staging_error(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path)
    run_dir = tmp_path / "raw" / "source=x" / "dt=2026-03-14" / "run=r"
    await asyncio.to_thread(run_dir.mkdir, parents=True)
    await asyncio.to_thread((run_dir / "_manifest.json").write_bytes, b'{"kind": "raw"}')

    with pytest.raises(StagingError, match=r"_manifest\.json: unreadable manifest"):
        await stager.manifests()


async def test_read_part_rejects_a_corrupted_part(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path)
    _, raw = await (await stage_records(stager, 5)).commit(status="complete", schema=SCHEMA, stats={})
    part = raw.parts[0]
    path = local(part.uri)
    data = bytearray(await read_bytes(path))
    data[len(data) // 2] ^= 0xFF
    await asyncio.to_thread(path.write_bytes, bytes(data))

    with pytest.raises(StagingError, match="does not match the manifest") as info:
        [line async for line in stager.read_part(part)]
    assert part.uri in str(info.value)


async def test_read_part_rejects_a_missing_part(tmp_path: Path) -> None:
    stager = await local_stager(tmp_path)
    _, raw = await (await stage_records(stager, 5)).commit(status="complete", schema=SCHEMA, stats={})
    await asyncio.to_thread(local(raw.parts[0].uri).unlink)

    with pytest.raises(StagingError, match="staged part is missing"):
        [line async for line in stager.read_part(raw.parts[0])]


@pytest.mark.parametrize(
    "uri",
    [
        "file:///etc/passwd",
        "s3://bucket/raw/part-00001.jsonl.gz",
        "file://{root}/../outside/part-00001.jsonl.gz",
    ],
)
async def test_read_part_refuses_objects_outside_the_staging_target(tmp_path: Path, uri: str) -> None:
    root = tmp_path / "staging"
    secret = b"not staged"

    def layout() -> None:
        root.mkdir()
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "part-00001.jsonl.gz").write_bytes(secret)

    await asyncio.to_thread(layout)
    stager = await local_stager(root)
    part = StagedPart(uri.format(root=root), 1, len(secret), hashlib.sha256(secret).hexdigest())

    with pytest.raises(StagingError, match="is not inside the staging target"):
        [line async for line in stager.read_part(part)]


async def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, f"file://{tmp_path}", max_rows=37, max_bytes=64 * 1024 * 1024)

    async def produce(task: int) -> None:
        for i in range(50):
            await writer.write({"task": task, "i": i})
            if i % 7 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(produce(t) for t in range(40)))
    parts = await writer.close()

    assert sum(p.rows for p in parts) == 2000 == writer.rows
    assert all(p.rows == 37 for p in parts[:-1])
    seen = [(line["task"], line["i"]) for p in parts for line in await lines(local(p.uri))]
    assert len(seen) == 2000
    assert sorted(seen) == [(t, i) for t in range(40) for i in range(50)]
    for t in range(40):  # each task's own writes stay in order
        assert [i for task, i in seen if task == t] == list(range(50))


async def test_close_twice_returns_the_same_parts(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, f"file://{tmp_path}", max_rows=3, max_bytes=1 << 20)
    for i in range(7):
        await writer.write({"i": i})

    first = await writer.close()
    second = await writer.close()

    assert [p.rows for p in first] == [3, 3, 1]
    assert second == first


def test_open_stager_relative_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    stager = open_stager("file://./rel/staging", part_max_records=5, part_max_bytes=2048)

    assert stager.root == tmp_path.resolve() / "rel" / "staging"
    assert stager.uri == f"file://{tmp_path.resolve()}/rel/staging"


def test_open_stager_absolute_file_url(tmp_path: Path) -> None:
    assert open_stager(f"file://{tmp_path}/abs").root == tmp_path.resolve() / "abs"


def test_open_stager_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    assert open_stager(str(tmp_path / "plain")).root == tmp_path.resolve() / "plain"
    assert open_stager(".trawl/staging").root == tmp_path.resolve() / ".trawl" / "staging"


async def test_open_stager_passes_part_limits(tmp_path: Path) -> None:
    stager = await asyncio.to_thread(open_stager, f"file://{tmp_path}", part_max_records=2)
    _, raw = await (await stage_records(stager, 5)).commit(status="complete", schema={}, stats={})

    assert [p.rows for p in raw.parts] == [2, 2, 1]


def test_open_stager_s3_opens_nothing_yet() -> None:
    stager = open_stager("s3://my-bucket/lake/trawl/", part_max_records=7)
    assert isinstance(stager, S3Stager)
    assert (stager.bucket, stager.prefix, stager.uri) == ("my-bucket", "lake/trawl/", "s3://my-bucket/lake/trawl")
    assert open_stager("s3://my-bucket").uri == "s3://my-bucket"
    with pytest.raises(StagingError, match="not open"):
        _ = stager.client


@pytest.mark.parametrize("url", ["s3://", "s3://B/x", "s3://a/x", "s3://bad_bucket/x"])
def test_open_stager_bad_bucket_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="is not a valid S3 bucket name"):
        open_stager(url)


def test_kms_key_without_kms_is_a_config_error() -> None:
    settings = Settings(s3_sse="AES256", s3_sse_kms_key_id="alias/x")
    with pytest.raises(ConfigError, match="TRAWL_S3_SSE=aws:kms"):
        open_stager("s3://my-bucket/x", settings=settings)


async def test_runs_lists_committed_and_incomplete_runs(tmp_path: Path) -> None:
    async with await local_stager(tmp_path, part_max_records=3) as stager:
        await (await stage_records(stager, 7)).commit(status="complete", schema={}, stats={})
        unfinished = await stage_records(stager, 4, run_id="20260315T000000Z-zzz999")
        await unfinished.records.close()  # parts written, never committed (the crawl died)
        runs = await stager.runs()
    assert runs == [
        RunInfo(RUN, "shop", "2026-03-14", "committed", "complete", 3, 7, runs[0].bytes),
        RunInfo("20260315T000000Z-zzz999", "shop", "2026-03-14", "incomplete", None, 2, None, runs[1].bytes),
    ]
    assert runs[0].bytes > 0 and runs[1].bytes > 0


@pytest.mark.parametrize("url", ["ftp://host/dir", "gs://bucket/prefix", "http://example.test/x"])
def test_open_stager_unknown_scheme_is_a_config_error(url: str) -> None:
    scheme = url.split(":", 1)[0]
    with pytest.raises(ConfigError, match=rf"unsupported scheme '{scheme}'") as info:
        open_stager(url)
    assert url in str(info.value)


@pytest.mark.parametrize("run_id", ["x/../../../../../escape", "../../../../escape", "run\n"])
async def test_a_run_id_never_stages_outside_the_root(tmp_path: Path, run_id: str) -> None:
    root = tmp_path / "root" / "staging"
    stager = await asyncio.to_thread(LocalStager, root)
    with pytest.raises(StagingError, match=r"run id .* must match"):
        stager.open_source("shop", run_id, datetime(2026, 5, 1, tzinfo=UTC))
    found = await asyncio.to_thread(lambda: list(tmp_path.rglob("*")))
    assert [p for p in found if not (p == root or root in p.parents or p in root.parents)] == []


async def test_s3_keys_and_the_spool_refuse_a_run_id_that_leaves_the_prefix(tmp_path: Path) -> None:
    settings = Settings(s3_spool_dir=str(tmp_path / "spool"))
    stager = await asyncio.to_thread(
        lambda: S3Stager("bucket", "trawl", settings, part_max_records=10, part_max_bytes=1024)
    )
    with pytest.raises(StagingError, match="run id"):
        stager._run_key("raw", "shop", "2026-05-01", "../../other-prefix")
    with pytest.raises(StagingError, match="run id"):
        await stager.resume("../../*")

"""S3 staging against moto's server over HTTP: layout, multipart parts, commit last, verified reads, outages."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

from sinks.s3 import S3Stager
from sinks.targets import open_stager
from trawl.errors import StagingError, StagingUnavailable
from trawl.settings import Settings

from ..conftest import TcpProxy

pytestmark = pytest.mark.integration

STARTED = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
RUN = "20260314T120000Z-abc123"
SCHEMA: dict[str, Any] = {"key": ["id"], "fields": {"id": {"type": "int", "required": True}}}
MIB = 1024 * 1024
TRAWL = str(Path(sys.executable).parent / "trawl")  # the installed console script


def s3_settings(bucket: str, endpoint: str, tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "staging": f"s3://{bucket}/lake",
        "s3_endpoint_url": endpoint,
        "s3_addressing_style": "path",
        "s3_spool_dir": tmp_path / "spool",
        "s3_max_attempts": 2,
        "s3_connect_timeout": 1,
        "s3_read_timeout": 5,
        "s3_backoff_base": 0.05,
        "s3_backoff_max": 0.3,
        "s3_commit_timeout": 30,
    }
    return Settings(**{**base, **kw})


def envelope(i: int, pad: str = "") -> dict[str, Any]:
    return {
        "source": "shop",
        "key": str(i),
        "url": f"https://example.test/item/{i}",
        "fetched_at": "2026-03-14T12:00:00+00:00",
        "run_id": RUN,
        "content_hash": f"h{i}",
        "data": {"id": i, "pad": pad},
    }


def client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


async def stage(stager: Any, n: int, *, pad: Any = "", run_id: str = RUN, source: str = "shop") -> tuple[Any, Any]:
    st = stager.open_source(source, run_id, STARTED)
    for i in range(n):
        await st.records.write(envelope(i, pad(i) if callable(pad) else pad))
    await st.outcomes.write({"url": "https://example.test/", "outcome": "fetched"})
    return await st.commit(status="complete", schema=SCHEMA, stats={"records": n})


async def test_parts_and_manifests_land_in_the_local_layout(s3_bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    settings = s3_settings(s3_bucket, moto_endpoint, tmp_path, part_max_records=4)
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        assert isinstance(stager, S3Stager)
        outcomes, raw = await stage(stager, 10)
        assert [p.rows for p in raw.parts] == [4, 4, 2]
        listed = await stager.manifests()
        read = [orjson.loads(line) for p in listed[0].parts async for line in stager.read_part(p)]
    prefix = f"lake/raw/source=shop/dt=2026-03-14/run={RUN}"
    keys = sorted(o["Key"] for o in client(moto_endpoint).list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == sorted(
        [
            f"{prefix}/_manifest.json",
            *(f"{prefix}/part-0000{i}.jsonl.gz" for i in (1, 2, 3)),
            f"lake/outcomes/source=shop/dt=2026-03-14/run={RUN}/_manifest.json",
            f"lake/outcomes/source=shop/dt=2026-03-14/run={RUN}/part-00001.jsonl.gz",
        ]
    )
    assert raw.uri == f"s3://{s3_bucket}/{prefix}/_manifest.json"
    assert [m.uri for m in listed] == [raw.uri]
    assert [r["data"]["id"] for r in read] == list(range(10))
    assert outcomes.rows == 1
    assert not await asyncio.to_thread((tmp_path / "spool" / s3_bucket / "lake").exists)  # nothing left in the spool


async def test_a_large_part_goes_up_in_chunks_and_the_manifest_comes_last(
    s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    settings = s3_settings(s3_bucket, moto_endpoint, tmp_path, s3_part_size=5 * MIB, s3_max_concurrency=2)
    s3 = client(moto_endpoint)
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        st = stager.open_source("shop", RUN, STARTED)
        i = 0
        seen_upload = False
        while i < 14_000:  # ~15 MB of incompressible data: one part, several chunks
            await st.records.write(envelope(i, os.urandom(1000).hex()))
            i += 1
            if i % 2000 == 0:
                await asyncio.sleep(0.05)
                uploads = s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
                seen_upload = seen_upload or bool(uploads)
                # Nothing is visible as committed while the part is still being written.
                assert "Contents" not in s3.list_objects_v2(Bucket=s3_bucket, Prefix="lake/raw/")
        assert seen_upload, "the part was not uploaded while it grew"
        _, raw = await st.commit(status="complete", schema=SCHEMA, stats={})
        [part] = raw.parts
        assert part.bytes > 10 * MIB
        head = s3.head_object(Bucket=s3_bucket, Key=part.uri.removeprefix(f"s3://{s3_bucket}/"))
        assert head["ContentLength"] == part.bytes
        assert head["ETag"].strip('"').endswith(f"-{-(-part.bytes // (5 * MIB))}")  # multipart: one S3 part a chunk
        rows = [line async for line in stager.read_part(part)]
    assert len(rows) == 14_000
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


async def test_a_discarded_part_mid_upload_is_aborted_and_leaves_nothing_behind(
    s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    # A crawl cancelled while its part streams up in chunks: the multipart upload is aborted, the spool file and
    # its descriptor are gone, and rows written after the discard go nowhere.
    settings = s3_settings(s3_bucket, moto_endpoint, tmp_path, s3_part_size=5 * MIB, s3_max_concurrency=2)
    s3 = client(moto_endpoint)
    fds_before = len(await asyncio.to_thread(os.listdir, "/proc/self/fd"))
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        st = stager.open_source("shop", RUN, STARTED)
        i = 0
        while not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"):
            for _ in range(500):
                await st.records.write(envelope(i, os.urandom(1000).hex()))
                i += 1
            await asyncio.sleep(0.05)
            assert i < 30_000, "the part never started to stream"
        await st.discard()
        await st.records.write(envelope(i))  # a worker's last row after the discard: dropped, no new part opened
        for _ in range(100):
            if not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"):
                break
            await asyncio.sleep(0.05)
        assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
        spooled = await asyncio.to_thread(lambda: [p.name for p in (tmp_path / "spool").rglob("*") if p.is_file()])
        assert spooled == []
    assert len(await asyncio.to_thread(os.listdir, "/proc/self/fd")) <= fds_before


async def test_a_tampered_or_missing_part_is_a_loud_failure(s3_bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    settings = s3_settings(s3_bucket, moto_endpoint, tmp_path, part_max_records=5)
    s3 = client(moto_endpoint)
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        _, raw = await stage(stager, 10)
        first, second = raw.parts
        key = first.uri.removeprefix(f"s3://{s3_bucket}/")
        body = bytearray(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        body[20] ^= 0xFF
        s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))
        with pytest.raises(StagingError, match=f"{first.uri}: sha256 .* does not match"):
            [line async for line in stager.read_part(first)]
        s3.delete_object(Bucket=s3_bucket, Key=second.uri.removeprefix(f"s3://{s3_bucket}/"))
        with pytest.raises(StagingError, match=f"{second.uri}: staged part is missing"):
            [line async for line in stager.read_part(second)]
        with pytest.raises(StagingError, match="not inside the staging target"):
            [line async for line in stager.read_part(type(first)(f"s3://other/{key}", 1, 1, "x"))]


async def test_encryption_storage_class_and_tags_are_sent(s3_bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    settings = s3_settings(
        s3_bucket,
        moto_endpoint,
        tmp_path,
        s3_sse="aws:kms",
        s3_sse_kms_key_id="alias/trawl",
        s3_storage_class="STANDARD_IA",
        s3_part_size=5 * MIB,
    )
    s3 = client(moto_endpoint)
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        _, raw = await stage(stager, 12_000, pad=lambda _: os.urandom(1000).hex())  # one multipart part
        small_settings = settings.model_copy(update={"s3_sse": "AES256", "s3_sse_kms_key_id": None})
    async with await asyncio.to_thread(open_stager, settings.staging, settings=small_settings) as small:
        _, small_raw = await stage(small, 3, run_id="20260314T120000Z-small1")
    big_key = raw.parts[0].uri.removeprefix(f"s3://{s3_bucket}/")
    head = s3.head_object(Bucket=s3_bucket, Key=big_key)
    assert head["ETag"].strip('"').endswith(f"-{-(-raw.parts[0].bytes // (5 * MIB))}")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"].endswith("alias/trawl")
    assert head["StorageClass"] == "STANDARD_IA"
    tags = {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=s3_bucket, Key=big_key)["TagSet"]}
    assert tags == {"source": "shop", "run_id": RUN}
    for uri in (small_raw.parts[0].uri, small_raw.uri):
        key = uri.removeprefix(f"s3://{s3_bucket}/")
        assert s3.head_object(Bucket=s3_bucket, Key=key)["ServerSideEncryption"] == "AES256"
        tags = {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=s3_bucket, Key=key)["TagSet"]}
        assert tags == {"source": "shop", "run_id": "20260314T120000Z-small1"}


def _spooled_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "spool"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def test_s3_going_away_mid_part_spools_and_the_run_still_commits(
    s3_bucket: str, s3_proxy: TcpProxy, tmp_path: Path
) -> None:
    settings = s3_settings(
        s3_bucket, s3_proxy.url, tmp_path, s3_part_size=5 * MIB, part_max_bytes=6 * MIB, s3_max_concurrency=2
    )
    s3 = client(s3_proxy.url.replace(str(s3_proxy.port), str(s3_proxy.target_port)))
    written_while_down = 0
    most_spooled = 0
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        assert isinstance(stager, S3Stager)
        st = stager.open_source("shop", RUN, STARTED)
        i = 0
        while i % 200 or not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"):  # the first part streams
            await st.records.write(envelope(i, os.urandom(1000).hex()))
            i += 1
            if i % 200 == 0:
                await asyncio.sleep(0.02)
        s3_proxy.cut()
        deadline = asyncio.get_running_loop().time() + 20
        while written_while_down < 14_000 and asyncio.get_running_loop().time() < deadline:  # ~14 MB more: 2-3 parts
            await st.records.write(envelope(i, os.urandom(1000).hex()))
            i += 1
            written_while_down += 1
            if i % 500 == 0:
                await asyncio.sleep(0)
        assert written_while_down == 14_000, "staging blocked while S3 was down"
        for _ in range(1000):  # the failed uploads surface: their parts wait in the spool
            most_spooled = max(most_spooled, stager.spooled)
            if most_spooled >= 2:
                break
            await asyncio.sleep(0.02)
        assert not stager.healthy
        s3_proxy.restore()
        _, raw = await st.commit(status="complete", schema=SCHEMA, stats={})
        ids = [orjson.loads(line)["data"]["id"] for p in raw.parts async for line in stager.read_part(p)]
    assert most_spooled >= 2  # closed parts waited in the spool while S3 was away
    assert len(raw.parts) >= 3
    assert ids == list(range(i))
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []  # the broken upload was aborted
    assert await asyncio.to_thread(_spooled_files, tmp_path) == []


def test_s3_down_at_the_end_fails_clearly_and_stage_resume_commits(
    s3_bucket: str,
    s3_proxy: TcpProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = s3_settings(s3_bucket, s3_proxy.url, tmp_path, part_max_records=4, s3_commit_timeout=1)
    s3 = client(s3_proxy.url.replace(str(s3_proxy.port), str(s3_proxy.target_port)))

    async def crawl() -> None:
        async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
            await stage(stager, 10)

    s3_proxy.cut()
    with pytest.raises(StagingUnavailable) as failure:
        asyncio.run(crawl())
    message = str(failure.value)
    assert f"run {RUN}" in message and "still unavailable" in message
    assert f"trawl stage resume {RUN}" in message
    assert str(tmp_path / "spool") in message
    spooled = _spooled_files(tmp_path)
    run_dir = f"{s3_bucket}/lake/raw/source=shop/dt=2026-03-14/run={RUN}"
    assert [f for f in spooled if f.startswith(run_dir)] == [
        f"{run_dir}/_manifest.json",
        *(f"{run_dir}/part-0000{n}.jsonl.gz" for n in (1, 2, 3)),
    ]
    assert any(f.endswith("outcomes/source=shop/dt=2026-03-14/run=" + RUN + "/_manifest.json") for f in spooled)

    s3_proxy.restore()
    for name, value in (
        ("TRAWL_S3_ENDPOINT_URL", s3_proxy.url),
        ("TRAWL_S3_ADDRESSING_STYLE", "path"),
        ("TRAWL_S3_SPOOL_DIR", str(tmp_path / "spool")),
        ("TRAWL_LOG_FORMAT", "json"),
    ):
        monkeypatch.setenv(name, value)
    staging = settings.staging
    printed: list[str] = []

    def main(args: list[str]) -> int:
        """The `trawl` command in its own process (it configures logging for the whole process)."""
        done = subprocess.run([TRAWL, *args], capture_output=True, text=True, timeout=120, check=False)
        printed[:] = [line for line in done.stdout.splitlines() if not line.startswith("{")]  # not the JSON logs
        return done.returncode

    assert main(["runs", "ls", "--staging", staging]) == 0
    listing = printed
    assert listing[0].split() == ["run_id", "source", "dt", "state", "status", "parts", "rows", "bytes", "spooled"]
    assert listing[1].split()[:4] + listing[1].split()[5:6] + listing[1].split()[-1:] == [
        RUN, "shop", "2026-03-14", "incomplete", "3", "3"
    ]  # fmt: skip

    assert main(["stage", "resume", RUN, "--staging", staging]) == 0
    out = "\n".join(printed)
    assert f"shop raw run {RUN}: 3 part(s) uploaded, manifest written" in out
    assert f"shop outcomes run {RUN}: 1 part(s) uploaded, manifest written" in out
    assert _spooled_files(tmp_path) == []
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    async def read_back() -> list[int]:
        async with await asyncio.to_thread(open_stager, staging, settings=settings) as stager:
            [m] = await stager.manifests()
            return [orjson.loads(line)["data"]["id"] for p in m.parts async for line in stager.read_part(p)]

    assert asyncio.run(read_back()) == list(range(10))
    assert main(["runs", "ls", "--staging", staging]) == 0
    row = printed[1].split()
    assert row[:7] == [RUN, "shop", "2026-03-14", "committed", "complete", "3", "10"]
    assert main(["stage", "resume", RUN, "--staging", staging]) == 0
    assert "nothing to resume" in "\n".join(printed)


async def test_a_full_spool_holds_staging_back_until_parts_are_in_s3(
    s3_bucket: str, s3_proxy: TcpProxy, tmp_path: Path
) -> None:
    settings = s3_settings(
        s3_bucket, s3_proxy.url, tmp_path, part_max_records=2, s3_spool_max_bytes=1, s3_commit_timeout=1
    )
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        # S3 up: each new part waits for the previous one to be uploaded (back-pressure), nothing fails.
        _, raw = await stage(stager, 8)
        assert len(raw.parts) == 4
        st = stager.open_source("shop", "20260314T120000Z-full01", STARTED)
        s3_proxy.cut()
        for i in range(3):
            await st.records.write(envelope(i))
        with pytest.raises(StagingUnavailable, match=r"spool .* is full .* did not take any for 1s"):
            await st.records.write(envelope(3))  # closes part 2: a new part needs room that never comes
        s3_proxy.restore()
        for _ in range(1000):  # the spooled part goes up once S3 answers (after botocore's and our backoff)
            # Not just "no failed part waiting": an upload begun while S3 was cut may still be timing out.
            if stager.healthy and not stager.spooled and not stager.spooled_bytes:
                break
            await asyncio.sleep(0.02)
        await st.records.write(envelope(4))  # S3 is back: staging goes on where it stopped
        _, raw = await st.commit(status="complete", schema=SCHEMA, stats={})
        ids = [orjson.loads(line)["data"]["id"] for p in raw.parts async for line in stager.read_part(p)]
    assert ids == [0, 1, 2, 3, 4]


async def test_a_permanent_s3_error_fails_the_commit_naming_the_object(
    moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    settings = s3_settings("trawl-no-such-bucket", moto_endpoint, tmp_path)
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        with pytest.raises(
            StagingError, match=r"S3 refused parts \(s3://trawl-no-such-bucket/lake/.*NoSuchBucket"
        ) as info:
            await stage(stager, 3)
    assert not info.value.transient
    assert any(
        f.endswith("part-00001.jsonl.gz") for f in await asyncio.to_thread(_spooled_files, tmp_path)
    )  # kept, not lost

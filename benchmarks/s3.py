"""S3 staging throughput and memory against moto's server on loopback: `make bench-s3`.

    python -m benchmarks.s3 [--records 1000000] [--upload-mib 64]

Starts ``moto_server`` on a free 127.0.0.1 port (in RAM; its memory is its own,
not counted), then in this process:

1. stages RECORDS small records (~250 B JSON each, one source, default part
   limits) through the S3 stager — gzip parts streamed up with multipart uploads,
   manifest last — and reports records/s, compressed MB staged and MB/s, and the
   process's peak RSS (the issue's bound: under 250 MB for 1,000,000 records);
2. uploads one UPLOAD_MIB incompressible file through the stager's uploader
   (multipart, ``s3_part_size`` chunks, ``s3_max_concurrency`` in flight) and
   reports the raw upload MB/s to the local endpoint.

Prints one JSON line per phase. Numbers depend on the machine; moto, not the
network, is usually the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from sinks.s3 import S3Stager
from tests.helpers.net import free_port
from trawl.settings import Settings

BUCKET = "trawl-bench"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("moto_server did not start")


async def _run(records: int, upload_mib: int, endpoint: str, spool: Path) -> list[dict[str, Any]]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    settings = Settings(
        staging=f"s3://{BUCKET}/bench",
        s3_endpoint_url=endpoint,
        s3_region="us-east-1",
        s3_addressing_style="path",
        s3_spool_dir=spool,
    )
    out = []
    stager = S3Stager.from_url(
        settings.staging, settings, part_max_records=settings.part_max_records, part_max_bytes=settings.part_max_bytes
    )
    async with stager:
        await stager.client.create_bucket(Bucket=BUCKET)
        started = datetime.now(UTC)
        stage = stager.open_source("bench", "bench-run", started)
        fetched = started.isoformat()
        t0 = time.perf_counter()
        for i in range(records):
            await stage.records.write(
                {
                    "source": "bench",
                    "key": str(i),
                    "url": f"https://shop.example/items/{i}",
                    "fetched_at": fetched,
                    "run_id": "bench-run",
                    "content_hash": f"{i * 2654435761 % 2**32:08x}",
                    "data": {"id": i, "sku": f"SKU-{i}", "price": (i % 997) / 10, "qty": i % 50, "tag": "x" * (i % 40)},
                }
            )
        _, raw = await stage.commit(status="complete", schema={}, stats={})
        seconds = time.perf_counter() - t0
        staged = sum(p.bytes for p in raw.parts)
        out.append(
            {
                "phase": "stage",
                "records": records,
                "parts": len(raw.parts),
                "seconds": round(seconds, 2),
                "records_per_s": round(records / seconds),
                "staged_mb": round(staged / 1e6, 1),
                "staged_mb_per_s": round(staged / 1e6 / seconds, 1),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
            }
        )
        path = spool / "upload.bin"
        chunk = os.urandom(1024 * 1024)
        with open(path, "wb") as f:  # noqa: ASYNC230 - benchmark setup, before the timed part
            for _ in range(upload_mib):
                f.write(chunk)
        t0 = time.perf_counter()
        await stager._upload_file(path, "bench/upload.bin")
        seconds = time.perf_counter() - t0
        out.append(
            {
                "phase": "upload",
                "mib": upload_mib,
                "chunk_mib": settings.s3_part_size // (1024 * 1024),
                "concurrency": settings.s3_max_concurrency,
                "seconds": round(seconds, 2),
                "mb_per_s": round(upload_mib * 1.048576 / seconds, 1),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--upload-mib", type=int, default=64)
    args = p.parse_args(argv)
    proc, endpoint = _moto()
    try:
        with tempfile.TemporaryDirectory(prefix="trawl-bench-s3-") as tmp:
            for line in asyncio.run(_run(args.records, args.upload_mib, endpoint, Path(tmp))):
                print(orjson.dumps(line).decode(), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()

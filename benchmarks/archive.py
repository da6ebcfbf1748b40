"""The page archive's figures on `make bench`'s site: crawl pages/s with and without it, bytes per page,
re-extraction pages/s, and the two WARC writers side by side.

    python -m benchmarks.archive [--pages 20000] [--repeat 3]

Generates (or reuses) the benchmark site, serves it with nginx, then, alternating
so the machine's load hits both alike, runs ``benchmarks.trawl_crawl`` (the full
`html` crawl, in its own process) with ``archive: true`` and ``archive: false``;
each row is the median by pages/s. Then re-extracts the last archived run
(``trawl.reextract.reextract_source``, in its own process, the same source's rules)
and reports its pages/s. Finally writes 2,000 of the site's pages as WARC
response+request records with warcio and with fastwarc (gzip member per record)
and reports µs per page, beside trawl's own writer (``trawl.archive.warc_members``: headers in
Python, ISA-L level 1, what the crawl runs). Results go to ``.trawl/bench/archive.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from benchmarks.nginx import Nginx
from benchmarks.site import DEFAULT_DIR, DEFAULT_PAGES, DEFAULT_SEED, SiteParams, ensure_site, page_path

OUT = Path(".trawl/bench/archive")


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRAWL_")}


def _crawl(url: str, out: Path, archive: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.trawl_crawl", "--url", url, "--out", str(out)]
    if not archive:
        cmd.append("--no-archive")
    with open(out / "log.jsonl", "wb") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    report["pages_per_s"] = report["pages"] / report["crawl_seconds"]
    return report


def _reextract(manifest_uri: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.archive", "--reextract", manifest_uri, "--out", str(out)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_child_env())
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def _reextract_in_process(manifest_uri: str, raw: bytes) -> dict[str, Any]:
    from benchmarks.trawl_crawl import bench_settings, bench_source
    from sinks.stage import LocalStager
    from trawl.reextract import reextract_source
    from trawl.staging import Manifest

    path = Path(manifest_uri.removeprefix("file://"))
    manifest = Manifest.from_json(manifest_uri, raw)
    stager = LocalStager(path.parents[4])  # .../staging/raw/source=/dt=/run=/_manifest.json
    source = bench_source(["http://127.0.0.1/"])
    t0, c0 = time.perf_counter(), time.process_time()
    result = await reextract_source(
        source, manifest, run_id=f"{manifest.run_id}-re", settings=bench_settings(64), stager=stager
    )
    seconds = time.perf_counter() - t0
    return {
        "pages": result.stats["pages"],
        "records": result.stats["records"],
        "seconds": seconds,
        "cpu_s": time.process_time() - c0,
        "pages_per_s": result.stats["pages"] / seconds,
    }


def _writers(root: Path, n: int = 2000) -> dict[str, float]:
    try:
        from fastwarc.warc import WarcRecord, WarcRecordType
    except ImportError:  # the `bench` extra: pip install -e '.[bench]'
        print("fastwarc is not installed (pip install -e '.[bench]'): its writer is left out", file=sys.stderr)
        WarcRecord = None
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    bodies = [(root / page_path(i).lstrip("/")).read_bytes() for i in range(n)]

    def with_warcio() -> int:
        out = io.BytesIO()
        writer = WARCWriter(out, gzip=True, warc_version="WARC/1.1")
        for i, body in enumerate(bodies):
            url = f"http://127.0.0.1/{i}"
            head = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=head))
            req = StatusAndHeaders(f"GET /{i} HTTP/1.1", [("Host", "127.0.0.1")], is_http_request=True)
            writer.write_record(writer.create_warc_record(url, "request", payload=io.BytesIO(b""), http_headers=req))
        return out.tell()

    def with_fastwarc() -> int:
        out = io.BytesIO()
        for i, body in enumerate(bodies):
            for kind, block in (
                (WarcRecordType.response, b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + body),
                (WarcRecordType.request, f"GET /{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()),
            ):
                rec = WarcRecord()
                rec.init_headers(kind)
                rec.headers["WARC-Target-URI"] = f"http://127.0.0.1/{i}"
                rec.set_bytes_content(block)
                buf = io.BytesIO()
                rec.write(buf, checksum_data=True)
                z = zlib.compressobj(6, zlib.DEFLATED, 31)
                out.write(z.compress(buf.getvalue()) + z.flush())
        return out.tell()

    def with_trawl() -> int:
        from trawl.archive import Exchange, warc_members

        out = io.BytesIO()
        for i, body in enumerate(bodies):
            ex = Exchange(f"http://127.0.0.1/{i}", 200, {"Content-Type": "text/html"}, body)
            out.write(warc_members(ex, 1 << 30)[0])
        return out.tell()

    result = {}
    writers = (("warcio", with_warcio), ("fastwarc", with_fastwarc), ("trawl", with_trawl))
    for name, fn in (w for w in writers if WarcRecord is not None or w[0] != "fastwarc"):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[f"{name}_us_per_page"] = min(times) / n * 1e6
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=DEFAULT_PAGES)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--site-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reextract", metavar="MANIFEST_URI", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.reextract:
        raw = Path(args.reextract.removeprefix("file://")).read_bytes()
        print(json.dumps(asyncio.run(_reextract_in_process(args.reextract, raw))))
        return 0
    site, _ = ensure_site(SiteParams(args.pages, args.seed), args.site_dir)
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    with Nginx(site.root) as server:
        url = f"{server.url}{page_path(0)}"
        for i in range(args.repeat):
            for archive in (True, False):
                r = _crawl(url, args.out / f"{'on' if archive else 'off'}-{i}", archive)
                runs[archive].append(r)
                print(f"run {i + 1}: archive {'on ' if archive else 'off'} {r['pages_per_s']:,.0f} pages/s", flush=True)

    def median(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return sorted(rs, key=lambda r: r["pages_per_s"])[(len(rs) - 1) // 2]

    on, off = median(runs[True]), median(runs[False])
    last = runs[True][-1]
    manifest = json.loads(Path(last["manifest"].removeprefix("file://")).read_text())
    archive_bytes = sum(p["bytes"] for p in manifest.get("archive", []))
    body_bytes = last["bytes"]
    re = _reextract(last["manifest"], args.out)
    figures = {
        "pages": on["pages"],
        "crawl_archive_off_pages_per_s": off["pages_per_s"],
        "crawl_archive_on_pages_per_s": on["pages_per_s"],
        "archive_overhead_pct": 100 * (1 - on["pages_per_s"] / off["pages_per_s"]),
        "all_runs_pages_per_s": {
            "on": [round(r["pages_per_s"]) for r in runs[True]],
            "off": [round(r["pages_per_s"]) for r in runs[False]],
        },
        "cpu_s_per_1000_pages_on": 1000 * on["crawl_cpu_s"] / on["pages"],
        "cpu_s_per_1000_pages_off": 1000 * off["crawl_cpu_s"] / off["pages"],
        "loop_cpu_s_per_1000_pages_on": 1000 * on["loop_cpu_s"] / on["pages"],
        "loop_cpu_s_per_1000_pages_off": 1000 * off["loop_cpu_s"] / off["pages"],
        "archive_bytes_per_page": archive_bytes / last["pages"],
        "body_bytes_per_page": body_bytes / last["pages"],
        "reextract_pages_per_s": re["pages_per_s"],
        "reextract_vs_crawl": re["pages_per_s"] / on["pages_per_s"],
        "reextract": re,
        **_writers(site.root),
        "median_of": args.repeat,
        "cpus": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
    }
    Path(".trawl/bench").mkdir(parents=True, exist_ok=True)
    Path(".trawl/bench/archive.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

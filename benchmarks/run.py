"""trawl against the hand-written ceiling and Scrapy (plain and tuned), on generated sites served by nginx.

    python -m benchmarks.run [--sites default,large,small] [--pages 20000] [--repeat 1]
        [--only trawl,minimal,scrapy-tuned,scrapy] [--no-chaos]

For each site shape of ``--sites`` (``benchmarks/site.py``: ``default`` 15-30 KB
pages with 20-40 links, ``large`` ~60 KB with ~100, ``small`` ~5 KB with ~10;
each generated once into its own directory under ``.trawl/bench/``), starts
nginx on loopback and runs each contender in its own subprocess, one after
another on the same site:

- ``trawl``: the full `html` crawl (fetch, parse 4 fields, follow links, stage
  gzip parts, JSON logs at INFO) — ``benchmarks/trawl_crawl.py`` — with
  ``archive: false``, as no other contender keeps a copy of the pages;
- ``trawl+archive``: the same crawl with the `html` source's default,
  ``archive: true`` (every response also written to the WARC page archive);
- ``minimal``: aiohttp + selectolax in ~100 lines, the ceiling —
  ``benchmarks/minimal.py``;
- ``scrapy-tuned``: the Scrapy spider with ``CONCURRENT_ITEMS=10`` and its own
  seen-set check before yielding requests (FIELD-NOTES: 3x the plain spider) —
  ``benchmarks/scrapy_baseline.py -a tuned=1``;
- ``scrapy``: the same spider plain, Scrapy's defaults, feed export to JSON
  lines.

All keep 64 requests in flight and obey robots.txt. For each run it measures
process wall time and CPU (user+sys) of the child (``wait4``), its peak RSS
(``VmHWM``, which the child reports: ``wait4``'s ``ru_maxrss`` also counts this
runner's RSS at the spawn, ``benchmarks/rss.py``), the crawl's own wall time and
CPU as the child reports them (without interpreter start-up and imports), and
nginx's CPU meanwhile; then checks the outputs: every one of the site's pages
fetched once (a 500 or a missed page is a failure), every product's record
present once with the generator's field values.

pages/s is unique pages / the crawl's own wall time; CPU s per 1,000 pages and
peak RSS are of the whole child process. With ``--repeat N`` each contender's
row is its median run by pages/s (the lower middle one for even N); every run is
in the JSON. One table per site, then trawl's ratios to the others against the
issue's targets (``TARGETS``): trawl/minimal >= 0.7x pages/s at <= 2x CPU per
page, trawl/scrapy-tuned >= 3x, trawl/scrapy >= 10x pages/s.

Last, the in-memory frontier's bytes per seen URL (``trawl_crawl.py
--frontier-memory``, tracemalloc in a fresh process: the seen set of 64-bit
hashes at the site's page count and at 1,000,000 URLs, and a queued URL's extra
cost). Target: <= 100 B per seen URL at 1,000,000.

Results go to ``.trawl/bench/results.json`` (one section per site), outputs and
logs of the last runs to ``.trawl/bench/runs/SITE/``. Exit status 1 when any run
failed its checks.

The chaos variant (on by default, ``--no-chaos`` skips it; on the first site of
``--sites`` only): trawl's crawl again, with every host of the chaos fleet (its
seeds and 20 product URLs each) (``tests.helpers.chaos``: 500s, resets, hangs,
drips, 429 bursts, hosts that throttle with 503/429 + Retry-After or for ever, a
gzip bomb, redirect loops, ...) among the seeds, and the fleet's short timeouts
(``EXPECTED_SETTINGS``) so the crawl's tail stays short. The figure is the
healthy host's rate: the site's pages / seconds from the crawl's start to the
site's last outcome, against the plain run's same figure. Target: less than 10%
lower.

``--extra-seed URL`` (repeatable) adds seeds on other hosts to every contender;
the checks then cover only the generated site's pages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from benchmarks.nginx import Nginx, NginxError, find_nginx
from benchmarks.site import (
    BENCH_DIR,
    DEFAULT_PAGES,
    DEFAULT_SEED,
    FOLLOW_ALLOW,
    RECORD_URLS,
    SITES,
    Site,
    ensure_site,
    page_path,
    site_dir,
)
from tests.helpers.chaos import ChaosFleetThread
from tests.helpers.staged import part_lines, staged_parts

__all__ = ["CONTENDERS", "RunResult", "main"]

CONTENDERS = ("trawl", "trawl+archive", "minimal", "scrapy-tuned", "scrapy")
TRAWLS = ("trawl", "trawl+archive")
"""``trawl`` crawls with ``archive: false``, as the others keep no copy of the pages; ``trawl+archive`` is the
`html` source's default, every response also written to the page archive (WARC)."""
SCRAPY = ("scrapy", "scrapy-tuned")
CHAOS = "trawl+chaos"
# Issue 23's targets: trawl's pages/s at least this multiple of the other's, and (vs the ceiling) its CPU per page
# at most this multiple.
TARGETS = {"trawl/minimal": 0.70, "trawl/scrapy-tuned": 3.0, "trawl/scrapy": 10.0}
CPU_TARGETS = {"trawl/minimal": 2.0}
FRONTIER_MAX_BYTES = 100  # per seen URL, at FRONTIER_URLS
FRONTIER_URLS = 1_000_000
CHAOS_MAX_DROP = 0.10
_CHAOS_URLS_PER_HOST = 20  # the healthy host's pages/s with the chaos fleet among the seeds
REPO = Path(__file__).resolve().parents[1]
_CONCURRENCY = 64


@dataclass(slots=True)
class RunResult:
    """One contender's run: what the runner measured and what the checks found."""

    contender: str
    repeat: int
    exit_code: int | None
    wall_s: float  # the child process, start-up included
    cpu_s: float  # user+sys of the child process (wait4)
    peak_rss_mb: float  # the child's VmHWM as it reports it; wait4's figure when it reported none
    wait4_maxrss_mb: float = 0.0  # wait4's ru_maxrss: also counts this runner's RSS at the spawn
    crawl_s: float = 0.0  # the crawl itself, as the child reports it
    crawl_cpu_s: float = 0.0
    host_s: float = 0.0  # trawl only: crawl start to the site's last outcome (the healthy host's own time)
    nginx_cpu_s: float = 0.0
    fleet_cpu_s: float = 0.0  # this runner's own CPU meanwhile: the chaos fleet serves from a thread here
    other_cpu_s: float = 0.0  # everything else on the machine meanwhile: noise when large
    steal_s: float = 0.0  # CPU the hypervisor gave to other guests meanwhile
    pages: int = 0  # unique pages of the site fetched with a 2xx
    records: int = 0  # unique product records with the right field values
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.crawl_s if self.crawl_s > 0 else 0.0

    @property
    def host_pages_per_s(self) -> float:
        return self.pages / self.host_s if self.host_s > 0 else 0.0

    @property
    def cpu_s_per_1k(self) -> float:
        return self.cpu_s / self.pages * 1000 if self.pages else 0.0

    @property
    def crawl_cpu_s_per_1k(self) -> float:
        return self.crawl_cpu_s / self.pages * 1000 if self.pages else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ok": self.ok,
            "pages_per_s": round(self.pages_per_s, 1),
            "host_pages_per_s": round(self.host_pages_per_s, 1),
            "cpu_s_per_1k_pages": round(self.cpu_s_per_1k, 3),
            "crawl_cpu_s_per_1k_pages": round(self.crawl_cpu_s_per_1k, 3),
        }


# --- running a child ------------------------------------------------------------------------------------------------


def _chaos_settings() -> dict[str, Any]:
    from tests.helpers.chaos import EXPECTED_SETTINGS

    return {k: v for k, v in EXPECTED_SETTINGS.items() if k != "allowed_networks"}


def _chaos_seeds(fleet: ChaosFleetThread) -> list[str]:
    """The fleet's own seeds plus 20 product URLs on every host, so each misbehaviour is met many times."""
    extra = [fleet.url(b, f"/products/{i}") for b in fleet.hosts for i in range(1, _CHAOS_URLS_PER_HOST + 1)]
    return list(dict.fromkeys([*fleet.seed_urls(), *extra]))


def _command(contender: str, seeds: list[str], out: Path) -> list[str]:
    py = sys.executable
    if contender in (*TRAWLS, CHAOS):
        argv = [py, "-m", "benchmarks.trawl_crawl", *(f"--url={u}" for u in seeds), f"--out={out}"]
        if contender != "trawl+archive":
            argv.append("--no-archive")
        if contender == CHAOS:
            argv.append(f"--settings={json.dumps(_chaos_settings())}")
        return argv
    if contender == "minimal":
        return [py, "-m", "benchmarks.minimal", *(f"--url={u}" for u in seeds), f"--out={out}"]
    return [
        py,
        "-m",
        "scrapy",
        "runspider",
        str(REPO / "benchmarks" / "scrapy_baseline.py"),
        "-O",
        str(out / "items.jsonl"),
        "-a",
        f"start_url={','.join(seeds)}",
        "-a",
        f"out={out}",
        "-a",
        f"allow={FOLLOW_ALLOW}",
        "-a",
        f"record={RECORD_URLS}",
        *(["-a", "tuned=1"] if contender == "scrapy-tuned" else []),
    ]


def _child_env() -> dict[str, str]:
    # No TRAWL_* (the settings are the benchmark's), no Scrapy project settings module.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAWL_", "SCRAPY_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def _spawn(argv: list[str], log: Path, timeout: float) -> tuple[int | None, float, float, float]:
    """Run a child to its end; (exit code or None on timeout, wall s, user+sys CPU s, peak RSS MB)."""
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, env=_child_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's so far
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped above: tell Popen
    code = None if timed_out.is_set() else proc.returncode
    return code, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


# --- checking outputs ------------------------------------------------------------------------------------------------


def _check_records(result: RunResult, rows: Iterable[dict[str, Any]], site: Site, base: str) -> None:
    """Every product page's record exactly once, with the field values the generator wrote."""
    expected = site.expected_fields()
    seen: Counter[str] = Counter()
    wrong: list[str] = []
    other_hosts = 0
    for row in rows:
        url = row.get("url") or ""
        if not url.startswith(base + "/"):
            other_hosts += 1
            continue
        path = urlsplit(url).path
        want = expected.get(path)
        if want is None:
            wrong.append(f"record for an unexpected URL {url}")
            continue
        seen[path] += 1
        for name, value in want.items():
            got = row.get(name)
            same = got is not None and (float(got) == float(value) if name == "price" else str(got) == value)
            if not same:
                wrong.append(f"{url}: {name} is {got!r}, expected {value!r}")
    result.records = len(seen)
    missing = len(expected) - len(seen)
    dupes = sum(n - 1 for n in seen.values() if n > 1)
    if missing:
        result.problems.append(f"{missing} of {len(expected)} product records missing")
    if dupes:
        result.problems.append(f"{dupes} duplicate records")
    if wrong:
        result.problems.append(f"{len(wrong)} wrong field values, e.g. {wrong[0]}")
    if other_hosts:
        result.notes.append(f"{other_hosts} records from extra seeds (not checked)")


def _check_pages(result: RunResult, fetched: int, site: Site, what: str) -> None:
    result.pages = fetched
    if fetched != site.params.pages:
        result.problems.append(f"{fetched} unique pages of the site {what}, expected exactly {site.params.pages}")


def _check_trawl(
    result: RunResult, out: Path, report: dict[str, Any], site: Site, base: str, strict_status: bool
) -> None:
    staging = out / "staging"
    raw = staged_parts(staging, "bench")
    outcomes = staged_parts(staging, "bench", kind="outcomes")
    manifests = sorted(staging.glob("raw/source=bench/dt=*/run=*/_manifest.json"))
    if not manifests:
        result.problems.append("no committed manifest")
    else:
        manifest = orjson.loads(manifests[-1].read_bytes())
        if manifest["status"] != "complete":
            result.problems.append(f"manifest status {manifest['status']}: {manifest.get('error')}")
    _check_records(result, (r["data"] | {"url": r["url"]} for p in raw for r in part_lines(p)), site, base)
    kinds: Counter[str] = Counter()
    fetched: set[str] = set()
    last = 0.0
    for part in outcomes:
        for o in part_lines(part):
            if not o["url"].startswith(base + "/"):
                continue
            last = max(last, datetime.fromisoformat(o["at"]).timestamp())
            kinds[f"{o['outcome']}/{o['http_status']}"] += 1
            if o["outcome"] == "fetched" and 200 <= (o["http_status"] or 0) < 300:
                fetched.add(urlsplit(o["url"]).path)
    _check_pages(result, len(fetched), site, "fetched (outcomes)")
    if report.get("started_at") and last:
        result.host_s = round(last - float(report["started_at"]), 3)
    bad = {k: n for k, n in kinds.items() if k != "fetched/200"}
    if bad:
        (result.problems if strict_status else result.notes).append(f"outcomes other than fetched/200: {bad}")


def _check_scrapy(result: RunResult, out: Path, report: dict[str, Any], site: Site, base: str, strict: bool) -> None:
    items = out / "items.jsonl"
    if not items.exists():
        result.problems.append("no feed export (items.jsonl)")
    else:
        _check_records(result, part_lines(items), site, base)
    _check_pages(result, report.get("pages_by_origin", {}).get(base, 0), site, "parsed")
    stats: dict[str, Any] = report.get("stats", {})
    bad = {
        k.rsplit("/", 1)[1]: v
        for k, v in stats.items()
        if k.startswith("downloader/response_status_count/") and not k.endswith("/200")
    }
    errors = {k: v for k, v in stats.items() if k.startswith(("log_count/ERROR", "spider_exceptions/", "retry/"))}
    if bad:
        (result.problems if strict else result.notes).append(f"responses other than 200: {bad}")
    if errors:
        (result.problems if strict else result.notes).append(f"errors and retries: {errors}")
    if report.get("reason") != "finished":
        result.problems.append(f"spider closed: {report.get('reason')}")
    if report.get("pages", 0) > result.pages:
        result.notes.append(
            f"{report['pages'] - result.pages} page(s) parsed twice (Scrapy: the start URL skips the dupefilter)"
        )


def _check_minimal(result: RunResult, out: Path, report: dict[str, Any], site: Site, base: str, strict: bool) -> None:
    _check_records(result, part_lines(out / "records.jsonl"), site, base)
    by_origin: dict[str, dict[str, int]] = report.get("statuses_by_origin", {})
    statuses = by_origin.get(base, {})
    _check_pages(result, statuses.get("200", 0), site, "fetched")
    bad = {k: n for k, n in statuses.items() if k != "200"}
    if bad:
        (result.problems if strict else result.notes).append(f"responses other than 200: {bad}")


def _machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine so far, stolen CPU seconds so far) from /proc/stat."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _run_one(
    contender: str, repeat: int, site_name: str, site: Site, server: Nginx, seeds: list[str], timeout: float
) -> RunResult:
    out = BENCH_DIR.resolve() / "runs" / site_name / f"{contender}-{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.with_suffix(".log")
    errors_before = server.error_log()
    nginx_cpu = server.cpu_seconds()
    busy, steal = _machine_cpu()
    own = time.process_time()
    code, wall, cpu, rss = _spawn(_command(contender, seeds, out), log, timeout)
    busy_after, steal_after = _machine_cpu()
    own = time.process_time() - own
    result = RunResult(contender, repeat, code, round(wall, 3), round(cpu, 3), round(rss, 1), round(rss, 1))
    result.nginx_cpu_s = round(server.cpu_seconds() - nginx_cpu, 3)
    result.fleet_cpu_s = round(own, 3)
    result.other_cpu_s = round(max(0.0, busy_after - busy - cpu - result.nginx_cpu_s - own), 3)
    result.steal_s = round(steal_after - steal, 3)
    if result.other_cpu_s > 0.1 * wall or result.steal_s > 0.1 * wall:
        result.notes.append(
            f"noisy machine: other processes used {result.other_cpu_s:.1f} CPU s and the hypervisor stole "
            f"{result.steal_s:.1f} s during this {wall:.0f} s run; figures may be low"
        )
    if code is None:
        result.problems.append(f"timed out after {timeout:.0f}s (log: {log})")
    elif code != 0:
        result.problems.append(f"exit code {code} (log: {log})")
    report_file = out / "report.json"
    report: dict[str, Any] = orjson.loads(report_file.read_bytes()) if report_file.exists() else {}
    if not report:
        result.problems.append(f"no report.json (log: {log})")
    result.crawl_s = round(float(report.get("crawl_seconds", 0.0)), 3)
    if report.get("peak_rss_mb"):
        result.peak_rss_mb = round(float(report["peak_rss_mb"]), 1)
    else:
        result.notes.append(f"no VmHWM in the report: peak RSS is wait4's, which includes the runner's ({rss:.0f} MB)")
    result.crawl_cpu_s = round(float(report.get("crawl_cpu_s", 0.0)), 3)
    strict = len(seeds) == 1  # with chaos hosts among the seeds, failures elsewhere are expected
    base = seeds[0].rsplit("/", 1)[0]
    try:
        if contender in (*TRAWLS, CHAOS):
            _check_trawl(result, out, report, site, base, strict)
        elif contender in SCRAPY:
            _check_scrapy(result, out, report, site, base, strict)
        else:
            _check_minimal(result, out, report, site, base, strict)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        result.problems.append(f"unreadable output: {type(exc).__name__}: {exc}")
    new_errors = server.error_log()[len(errors_before) :].strip()
    if new_errors:
        result.problems.append(f"nginx logged errors: {new_errors.splitlines()[0]}")
    return result


# --- reporting -------------------------------------------------------------------------------------------------------


def _median(runs: list[RunResult]) -> RunResult:
    """The median run by pages/s among the runs that passed their checks (among all when none did)."""
    key = (lambda r: r.host_pages_per_s) if runs[0].contender == CHAOS else (lambda r: r.pages_per_s)
    ordered = sorted([r for r in runs if r.ok] or runs, key=key)
    return ordered[(len(ordered) - 1) // 2]


def _chaos_ratio(summary: dict[str, RunResult]) -> dict[str, Any] | None:
    plain, chaos = summary.get("trawl"), summary.get(CHAOS)
    if plain is None or chaos is None or not plain.host_pages_per_s:
        return None
    drop = 1 - chaos.host_pages_per_s / plain.host_pages_per_s
    return {
        "valid": plain.ok and chaos.ok,
        "healthy_pages_per_s": round(plain.host_pages_per_s, 1),
        "healthy_pages_per_s_with_chaos": round(chaos.host_pages_per_s, 1),
        "drop": round(drop, 3),
        "target_max_drop": CHAOS_MAX_DROP,
        "meets_target": drop < CHAOS_MAX_DROP,
        "chaos_settings": _chaos_settings(),
    }


_COLUMNS = (
    ("contender", "{:<12}"),
    ("check", "{:<5}"),
    ("pages", "{:>7,}"),
    ("records", "{:>7,}"),
    ("crawl s", "{:>8.1f}"),
    ("pages/s", "{:>8.0f}"),
    ("site host pages/s", "{:>17.0f}"),
    ("CPU s/1k pages", "{:>14.2f}"),
    ("crawl CPU s/1k", "{:>14.2f}"),
    ("peak RSS MB", "{:>11.0f}"),
    ("process s", "{:>9.1f}"),
    ("nginx CPU s", "{:>11.1f}"),
    ("fleet CPU s", "{:>11.1f}"),
    ("other CPU s", "{:>11.1f}"),
)


def _row(r: RunResult) -> list[Any]:
    return [
        r.contender,
        "OK" if r.ok else "FAIL",
        r.pages,
        r.records,
        r.crawl_s,
        r.pages_per_s,
        r.host_pages_per_s,
        r.cpu_s_per_1k,
        r.crawl_cpu_s_per_1k,
        r.peak_rss_mb,
        r.wall_s,
        r.nginx_cpu_s,
        r.fleet_cpu_s,
        r.other_cpu_s,
    ]


def _table(rows: list[RunResult]) -> str:
    cells = [[fmt.format(v) for (_, fmt), v in zip(_COLUMNS, _row(r), strict=True)] for r in rows]
    widths = [max([len(name), *(len(c[i]) for c in cells)]) for i, (name, _) in enumerate(_COLUMNS)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    head = line([name for name, _ in _COLUMNS])
    return "\n".join([head, "-" * len(head), *map(line, cells)])


def _ratios(summary: dict[str, RunResult]) -> dict[str, dict[str, Any]]:
    """trawl against each other contender of the run: pages/s and CPU per page, with the issue's targets."""
    out: dict[str, dict[str, Any]] = {}
    for name, other in ((t, o) for t in TRAWLS for o in CONTENDERS if o not in TRAWLS):
        trawl, base = summary.get(name), summary.get(other)
        if trawl is None or base is None or not base.pages_per_s:
            continue
        key = f"{name}/{other}"
        ratio = trawl.pages_per_s / base.pages_per_s
        cpu = trawl.cpu_s_per_1k / base.cpu_s_per_1k if base.cpu_s_per_1k else None
        crawl_cpu = trawl.crawl_cpu_s_per_1k / base.crawl_cpu_s_per_1k if base.crawl_cpu_s_per_1k else None
        cpu_target = CPU_TARGETS.get(f"trawl/{other}")
        cpu_ok = cpu_target is None or (cpu is not None and cpu <= cpu_target)
        out[key] = {
            "valid": trawl.ok and base.ok,  # a ratio against a failed run means nothing
            "pages_per_s": round(ratio, 3),
            "cpu_per_page": round(cpu, 3) if cpu is not None else None,  # whole processes, start-up included
            "crawl_cpu_per_page": round(crawl_cpu, 3) if crawl_cpu is not None else None,
            "target": TARGETS[f"trawl/{other}"],
            "cpu_target": cpu_target,
            "meets_target": ratio >= TARGETS[f"trawl/{other}"] and cpu_ok,
        }
    return out


def _print_ratios(ratios: dict[str, dict[str, Any]]) -> None:
    for key, ratio in ratios.items():
        invalid = "" if ratio["valid"] else " — INVALID, a run failed its checks"
        pages = "meets" if ratio["pages_per_s"] >= ratio["target"] else "BELOW"
        line = f"{key}: {ratio['pages_per_s']:.2f}x pages/s ({pages} target >= {ratio['target']}x)"
        cpu, crawl_cpu, target = ratio["cpu_per_page"], ratio["crawl_cpu_per_page"], ratio["cpu_target"]
        if cpu is not None:
            line += f"; CPU per page {cpu:.2f}x"
            if target is not None:
                line += f" ({'meets' if cpu <= target else 'ABOVE'} target <= {target}x)"
            if crawl_cpu is not None:
                line += f", the crawl alone {crawl_cpu:.2f}x"
        print(line + invalid)


def _frontier_memory(pages: list[int]) -> list[dict[str, Any]] | None:
    """trawl's in-memory frontier per URL (``trawl_crawl.py --frontier-memory``, a fresh process); None on failure."""
    sizes = ",".join(str(n) for n in sorted({*pages, FRONTIER_URLS}))
    argv = [sys.executable, "-m", "benchmarks.trawl_crawl", f"--frontier-memory={sizes}"]
    proc = subprocess.run(argv, cwd=REPO, env=_child_env(), capture_output=True, check=False)
    if proc.returncode != 0:
        print(f"frontier memory: FAILED: {proc.stderr.decode(errors='replace').strip()[-500:]}")
        return None
    rows: list[dict[str, Any]] = orjson.loads(proc.stdout)
    return rows


def _print_frontier_memory(rows: list[dict[str, Any]]) -> bool:
    """One line per size, then the verdict at FRONTIER_URLS; whether it meets the target."""
    print("trawl's in-memory frontier, bytes per seen URL (tracemalloc; a set[int] of 64-bit url_hash values):")
    for r in rows:
        print(
            f"  {r['urls']:>9,} URLs: {r['seen_set_bytes_per_url']:.0f} B per seen URL; a URL still queued "
            f"+{r['queued_bytes_per_url']:.0f} B (its Claim in the queue) + {r['url_str_bytes']:.0f} B "
            f"(its {r['avg_url_chars']:.0f}-character string)"
        )
    at = next(r for r in rows if r["urls"] == FRONTIER_URLS)
    ok = bool(at["seen_set_bytes_per_url"] <= FRONTIER_MAX_BYTES)
    print(
        f"  {'meets' if ok else 'ABOVE'} target <= {FRONTIER_MAX_BYTES} B per seen URL at {FRONTIER_URLS:,} "
        "(a set overallocates 4x below 50,000 entries, 2x above: small sets cost more per URL)"
    )
    return ok


def _machine() -> dict[str, Any]:
    nginx = subprocess.run([find_nginx(), "-v"], capture_output=True, text=True, check=False).stderr.strip()
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nginx": nginx,
        **{pkg: version(pkg) for pkg in ("aiohttp", "selectolax", "scrapy", "twisted", "orjson", "structlog")},
    }


def _warm(root: Path) -> None:
    """Read every file once, so no contender pays for reading the site from disk."""
    for path in root.rglob("*"):
        if path.is_file():
            path.read_bytes()


def _run_site(name: str, site: Site, args: argparse.Namespace, contenders: list[str]) -> list[RunResult]:
    """Every contender (and repeat) on one site, behind one nginx; raises NginxError."""
    runs: list[RunResult] = []
    with Nginx(site.root) as server:
        seeds = [f"{server.url}{page_path(0)}", *args.extra_seed]
        print(f"nginx: {server.url} (workers: {len(server.pids()) - 1})", flush=True)
        for repeat in range(1, args.repeat + 1):
            for contender in contenders:
                print(f"[{name}] run {repeat}/{args.repeat}: {contender} ...", end=" ", flush=True)
                if contender == CHAOS:
                    with ChaosFleetThread() as fleet:
                        chaos_seeds = [*seeds, *_chaos_seeds(fleet)]
                        r = _run_one(contender, repeat, name, site, server, chaos_seeds, args.timeout)
                    rate = f"healthy host {r.host_pages_per_s:,.0f} pages/s"
                else:
                    r = _run_one(contender, repeat, name, site, server, seeds, args.timeout)
                    rate = f"{r.pages_per_s:,.0f} pages/s"
                runs.append(r)
                verdict = "ok" if r.ok else "FAILED: " + "; ".join(r.problems)
                print(f"{rate} in {r.crawl_s:.1f}s, {verdict}", flush=True)
    return runs


def _describe(name: str, site: Site) -> str:
    p = site.params
    return (
        f"site {name}: {p.pages:,} pages of {round(p.min_bytes / 1000, 1):g}-{round(p.max_bytes / 1000, 1):g} KB with "
        f"{p.min_links}-{p.max_links} links"
    )


def _report_site(name: str, site: Site, runs: list[RunResult], contenders: list[str]) -> dict[str, Any]:
    """Print one site's table, ratios, chaos figure and notes; its section of the results JSON."""
    summary = {c: _median([r for r in runs if r.contender == c]) for c in contenders}
    ratios = _ratios(summary)
    chaos = _chaos_ratio(summary)
    print(f"\n== {_describe(name, site)} ({site.root}) ==")
    print(_table(list(summary.values())))
    print()
    _print_ratios(ratios)
    if chaos is not None:
        mark = "meets" if chaos["meets_target"] else "MISSES"
        if not chaos["valid"]:
            mark = "INVALID, a run failed its checks; vs"
        print(
            f"chaos: the healthy host at {chaos['healthy_pages_per_s_with_chaos']:,.0f} pages/s with the chaos fleet "
            f"among the seeds vs {chaos['healthy_pages_per_s']:,.0f} without: {chaos['drop']:+.1%} slower "
            f"({mark} target < {CHAOS_MAX_DROP:.0%})"
        )
    for r in runs:
        for note in r.notes:
            print(f"note: {r.contender} run {r.repeat}: {note}")
    return {
        "site": {**asdict(site.params), "root": str(site.root)},
        "summary": {c: r.as_dict() for c, r in summary.items()},
        "ratios": ratios,
        "chaos": chaos,
        "runs": [r.as_dict() for r in runs],
        "ok": all(r.ok for r in runs),
    }


_EPILOG = f"""\
contenders, each in its own process on the same nginx-served site, 64 requests in flight, robots.txt obeyed:
  trawl         the full html crawl (benchmarks/trawl_crawl.py), archive: false like the others
  trawl+archive the same with the html source's default, archive: true (every response kept as WARC)
  minimal       aiohttp + selectolax, the hand-written ceiling (benchmarks/minimal.py)
  scrapy-tuned  the Scrapy spider with CONCURRENT_ITEMS=10 and a seen-set before yielding requests
  scrapy        the same spider plain (benchmarks/scrapy_baseline.py)
targets: trawl/minimal >= {TARGETS["trawl/minimal"]}x pages/s at <= {CPU_TARGETS["trawl/minimal"]}x CPU per page, \
trawl/scrapy-tuned >= {TARGETS["trawl/scrapy-tuned"]}x, trawl/scrapy >= {TARGETS["trawl/scrapy"]}x; \
the in-memory frontier <= {FRONTIER_MAX_BYTES} B per seen URL.
Quick check: --sites default --pages 2000 --no-chaos. Details: the docstring of benchmarks/run.py.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the epilog's lines kept."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=_EPILOG, formatter_class=_HelpFormatter
    )
    parser.add_argument(
        "--sites",
        default=",".join(SITES),
        help="comma-separated site shapes to run every contender on, one table each: "
        "default (15-30 KB pages, 20-40 links), large (~60 KB, ~100 links), small (~5 KB, ~10 links)",
    )
    parser.add_argument("--pages", type=int, default=DEFAULT_PAGES, help="pages of each generated site")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the generated sites")
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender; the median by pages/s is shown")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated subset of the contenders")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take before it is killed")
    parser.add_argument("--extra-seed", action="append", default=[], metavar="URL", help="more seeds (other hosts)")
    parser.add_argument(
        "--chaos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also crawl the first site with trawl with the chaos fleet among the seeds (needs trawl in --only)",
    )
    parser.add_argument(
        "--frontier-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"measure trawl's in-memory frontier per seen URL (at each site's pages and {FRONTIER_URLS:,})",
    )
    args = parser.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CONTENDERS]
    if unknown or not only or args.repeat < 1:
        parser.error(f"--only takes some of {','.join(CONTENDERS)}; --repeat at least 1")
    names = list(dict.fromkeys(n.strip() for n in args.sites.split(",") if n.strip()))
    if not names or any(n not in SITES for n in names):
        parser.error(f"--sites takes some of {','.join(SITES)}")
    try:
        params = {n: replace(SITES[n], pages=args.pages, seed=args.seed) for n in names}
    except ValueError as exc:
        parser.error(str(exc))

    shutil.rmtree(BENCH_DIR / "runs", ignore_errors=True)  # only this invocation's outputs and logs stay
    sections: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        site, made = ensure_site(params[name], site_dir(name))
        print(
            f"\n{_describe(name, site)} in {site.root} ({'generated' if made else 'reused'}, "
            f"{time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
        _warm(site.root)
        contenders = [*only, CHAOS] if args.chaos and i == 0 and "trawl" in only else only
        try:
            runs = _run_site(name, site, args, contenders)
        except NginxError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        sections[name] = {"contenders": contenders, "site": site, "runs": runs}

    print("\n" + "=" * 78)
    results_sites = {
        name: _report_site(name, section["site"], section["runs"], section["contenders"])
        for name, section in sections.items()
    }
    frontier: dict[str, Any] | None = None
    if args.frontier_memory and "trawl" in only:
        print()
        rows = _frontier_memory([p.pages for p in params.values()])
        if rows is not None:
            ok = _print_frontier_memory(rows)
            frontier = {"rows": rows, "target_max_bytes": FRONTIER_MAX_BYTES, "at_urls": FRONTIER_URLS, "meets": ok}
    failed = [(name, r) for name, section in sections.items() for r in section["runs"] if not r.ok]
    if failed:
        print()
        print("!" * 78)
        for name, r in failed:
            print(f"!! FAILED: {name}: {r.contender} run {r.repeat}: {'; '.join(r.problems)}")
        print("!" * 78)

    results = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "concurrency": _CONCURRENCY,
        "robots_txt": "obeyed by all contenders",
        "repeat": args.repeat,
        "aggregate": "median run by pages/s (lower middle for an even count)",
        "targets": {"pages_per_s": TARGETS, "cpu_per_page": CPU_TARGETS, "chaos_max_drop": CHAOS_MAX_DROP},
        "sites": results_sites,
        "frontier_memory": frontier,
        "ok": not failed,
    }
    path = BENCH_DIR / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""trawl against Scrapy and a hand-written ceiling, on one generated site served by nginx: `make bench`.

    python -m benchmarks.run [--pages 20000] [--repeat 1] [--only trawl,scrapy,minimal]

Generates (or reuses) the site, starts nginx on loopback, and runs each
contender in its own subprocess, one after another on the same site:

- ``trawl``: the full `html` crawl (fetch, parse 4 fields, follow links, stage
  gzip parts, JSON logs at INFO) — ``benchmarks/trawl_crawl.py``;
- ``scrapy``: a plain spider via ``scrapy runspider``, feed export to JSON lines
  — ``benchmarks/scrapy_baseline.py``;
- ``minimal``: aiohttp + selectolax in ~100 lines, the ceiling —
  ``benchmarks/minimal.py``.

All three keep 64 requests in flight and obey robots.txt. For each run it
measures process wall time, CPU (user+sys) and peak RSS of the child (``wait4``),
the crawl's own wall time and CPU as the child reports them (without
interpreter start-up and imports), and nginx's CPU meanwhile; then checks the
outputs: every one of the site's pages fetched once (a 500 or a missed page is a
failure), every product's record present once with the generator's field values.

pages/s is unique pages / the crawl's own wall time; CPU s per 1,000 pages and
peak RSS are of the whole child process. With ``--repeat N`` each contender's
row is its median run by pages/s (the lower middle one for even N); every run is
in the JSON. Results go to ``.trawl/bench/results.json``, outputs and logs of
the last runs to ``.trawl/bench/runs/``. Exit status 1 when any run failed its
checks.

The chaos variant (on by default, ``--no-chaos`` skips it): trawl's crawl
again, with every host of the chaos fleet (its seeds and 20 product URLs each) (``tests.helpers.chaos``: 500s, resets,
hangs, drips, 429 bursts, hosts that throttle with 503/429 + Retry-After or for ever, a gzip bomb, redirect
loops, ...) among the seeds, and
the fleet's short timeouts (``EXPECTED_SETTINGS``) so the crawl's tail stays
short. The figure is the healthy host's rate: the site's pages / seconds from
the crawl's start to the site's last outcome, against the plain run's same
figure. Target: less than 10% lower.

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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from benchmarks.nginx import Nginx, NginxError, find_nginx
from benchmarks.site import (
    DEFAULT_DIR,
    DEFAULT_PAGES,
    DEFAULT_SEED,
    FOLLOW_ALLOW,
    RECORD_URLS,
    Site,
    SiteParams,
    ensure_site,
    page_path,
)
from tests.helpers.chaos import ChaosFleetThread
from tests.helpers.staged import part_lines, staged_parts

__all__ = ["CONTENDERS", "RunResult", "main"]

CONTENDERS = ("trawl", "scrapy", "minimal")
CHAOS = "trawl+chaos"
TARGETS = {"trawl/minimal": 0.60, "trawl/scrapy": 3.0}  # the targets on pages/s
CHAOS_MAX_DROP = 0.10
_CHAOS_URLS_PER_HOST = 20  # the healthy host's pages/s with the chaos fleet among the seeds
BENCH_DIR = Path(".trawl/bench")
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
    peak_rss_mb: float
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
    if contender in ("trawl", CHAOS):
        argv = [py, "-m", "benchmarks.trawl_crawl", *(f"--url={u}" for u in seeds), f"--out={out}"]
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


def _run_one(contender: str, repeat: int, site: Site, server: Nginx, seeds: list[str], timeout: float) -> RunResult:
    out = BENCH_DIR.resolve() / "runs" / f"{contender}-{repeat}"
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
    result = RunResult(contender, repeat, code, round(wall, 3), round(cpu, 3), round(rss, 1))
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
    result.crawl_cpu_s = round(float(report.get("crawl_cpu_s", 0.0)), 3)
    strict = len(seeds) == 1  # with chaos hosts among the seeds, failures elsewhere are expected
    base = seeds[0].rsplit("/", 1)[0]
    try:
        if contender in ("trawl", CHAOS):
            _check_trawl(result, out, report, site, base, strict)
        elif contender == "scrapy":
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
    ("contender", "{:<9}"),
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
    widths = [len(fmt.format(_row(rows[0])[i])) if rows else 0 for i, (_, fmt) in enumerate(_COLUMNS)]
    widths = [max(w, len(name)) for w, (name, _) in zip(widths, _COLUMNS, strict=True)]
    head = "  ".join(
        name.rjust(w) if i > 1 else name.ljust(w) for i, ((name, _), w) in enumerate(zip(_COLUMNS, widths, strict=True))
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [fmt.format(v) for (_, fmt), v in zip(_COLUMNS, _row(r), strict=True)]
        lines.append(
            "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        )
    return "\n".join(lines)


def _ratios(summary: dict[str, RunResult]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    trawl = summary.get("trawl")
    for other in ("minimal", "scrapy"):
        base = summary.get(other)
        if trawl is None or base is None or not base.pages_per_s:
            continue
        key = f"trawl/{other}"
        ratio = trawl.pages_per_s / base.pages_per_s
        cpu = trawl.cpu_s_per_1k / base.cpu_s_per_1k if base.cpu_s_per_1k else None
        out[key] = {
            "valid": trawl.ok and base.ok,  # a ratio against a failed run means nothing
            "pages_per_s": round(ratio, 3),
            "cpu_per_page": round(cpu, 3) if cpu is not None else None,
            "target": TARGETS[key],
            "meets_target": ratio >= TARGETS[key],
        }
    return out


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=DEFAULT_PAGES, help="pages of the generated site")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the generated site")
    parser.add_argument("--site-dir", type=Path, default=DEFAULT_DIR, help="where the site is generated or reused")
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender; the median by pages/s is shown")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated subset of: trawl,scrapy,minimal")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take before it is killed")
    parser.add_argument("--extra-seed", action="append", default=[], metavar="URL", help="more seeds (other hosts)")
    parser.add_argument(
        "--chaos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also crawl with trawl with the chaos fleet among the seeds (needs trawl in --only)",
    )
    args = parser.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CONTENDERS]
    if unknown or not only or args.repeat < 1:
        parser.error(f"--only takes some of {','.join(CONTENDERS)}; --repeat at least 1")

    t0 = time.perf_counter()
    site, made = ensure_site(SiteParams(args.pages, args.seed), args.site_dir)
    print(
        f"site: {site.params.pages:,} pages in {site.root} ({'generated' if made else 'reused'}, "
        f"{time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    _warm(site.root)
    shutil.rmtree(BENCH_DIR / "runs", ignore_errors=True)  # only this invocation's outputs and logs stay
    runs: list[RunResult] = []
    contenders = [*only, CHAOS] if args.chaos and "trawl" in only else only
    try:
        with Nginx(site.root) as server:
            seeds = [f"{server.url}{page_path(0)}", *args.extra_seed]
            print(f"nginx: {server.url} (workers: {len(server.pids()) - 1})", flush=True)
            for repeat in range(1, args.repeat + 1):
                for contender in contenders:
                    print(f"run {repeat}/{args.repeat}: {contender} ...", end=" ", flush=True)
                    if contender == CHAOS:
                        with ChaosFleetThread() as fleet:
                            r = _run_one(contender, repeat, site, server, [*seeds, *_chaos_seeds(fleet)], args.timeout)
                        rate = f"healthy host {r.host_pages_per_s:,.0f} pages/s"
                    else:
                        r = _run_one(contender, repeat, site, server, seeds, args.timeout)
                        rate = f"{r.pages_per_s:,.0f} pages/s"
                    runs.append(r)
                    verdict = "ok" if r.ok else "FAILED: " + "; ".join(r.problems)
                    print(f"{rate} in {r.crawl_s:.1f}s, {verdict}", flush=True)
    except NginxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    summary = {c: _median([r for r in runs if r.contender == c]) for c in contenders}
    ratios = _ratios(summary)
    chaos = _chaos_ratio(summary)
    print()
    print(_table(list(summary.values())))
    print()
    for key, ratio in ratios.items():
        mark = "meets" if ratio["meets_target"] else "BELOW"
        if not ratio["valid"]:
            mark = "INVALID, a run failed its checks; vs"
        print(
            f"{key}: {ratio['pages_per_s']:.2f}x pages/s ({mark} target {ratio['target']}x); "
            f"CPU per page {ratio['cpu_per_page']}x"
        )
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
    failed = [r for r in runs if not r.ok]
    if failed:
        print()
        print("!" * 78)
        for r in failed:
            print(f"!! FAILED: {r.contender} run {r.repeat}: {'; '.join(r.problems)}")
        print("!" * 78)

    results = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "site": {**asdict(site.params), "root": str(site.root)},
        "concurrency": _CONCURRENCY,
        "robots_txt": "obeyed by all contenders",
        "repeat": args.repeat,
        "aggregate": "median run by pages/s (lower middle for an even count)",
        "summary": {c: r.as_dict() for c, r in summary.items()},
        "ratios": ratios,
        "chaos": chaos,
        "runs": [r.as_dict() for r in runs],
        "ok": not failed,
    }
    path = BENCH_DIR / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

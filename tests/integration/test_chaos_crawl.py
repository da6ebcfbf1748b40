"""The fetch layer against the chaos fleet: one crawl over every misbehaving host, staged and loaded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest

from sinks.postgres import Loader
from sinks.stage import LocalStager
from tests.helpers.chaos import EXPECTED_SETTINGS, ChaosFleet
from trawl.config import HtmlSource
from trawl.crawler import SourceResult, crawl_source
from trawl.database import connect_pool
from trawl.errors import SourceFailed
from trawl.fetch import Fetcher
from trawl.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


async def _staged(stager: LocalStager, kind: str) -> list[dict[str, object]]:
    lines = []
    for manifest in await stager.manifests(kind):  # type: ignore[arg-type]
        for part in manifest.parts:
            lines.extend([orjson.loads(line) async for line in stager.read_part(part)])
    return lines


THROTTLE_AFTER = 0.2  # Retry-After of throttle503 and throttle_forever: the 2 s, scaled down for a test
IN_FLIGHT_SLACK = 0.05  # a request already on its way when a 429 went out may still arrive just after it


async def test_crawl_over_the_whole_fleet(tmp_path: Path, database_url: str, db: asyncpg.Connection) -> None:
    async with ChaosFleet(throttle_after=THROTTLE_AFTER) as fleet:
        settings = Settings(**EXPECTED_SETTINGS, staging=f"file://{tmp_path}")
        source = HtmlSource.model_validate(fleet.source())
        stager = await asyncio.to_thread(LocalStager, tmp_path)  # resolves the path
        async with Fetcher(settings) as fetcher:
            try:
                result: SourceResult = await crawl_source(
                    source, run_id="chaos-1", settings=settings, fetcher=fetcher, stager=stager
                )
            except SourceFailed as exc:  # pragma: no cover - the assertion below says why
                pytest.fail(f"the crawl broke off: {exc}")
            breaker_states = fetcher.breakers.states()
            trips = {b: fetcher.breakers.trips(urlsplit(url).netloc) for b, url in fleet.hosts.items()}
        requests = fleet.requests
        hits = list(fleet.hits)
        refusals = list(fleet.refusals)
        expected = fleet.expected
        hosts = dict(fleet.hosts)
        behaviour_of = {urlsplit(url).netloc: b for b, url in hosts.items()}

    assert result.status == "complete"

    # Every URL the crawl touched has exactly one outcome, and per host they are what the fleet was built for.
    outcomes = await _staged(stager, "outcomes")
    per_url = Counter(str(o["url"]) for o in outcomes)
    assert max(per_url.values()) == 1
    got = {b: Counter[str]() for b in expected}
    for o in outcomes:
        got[behaviour_of[urlsplit(str(o["url"])).netloc]][str(o["outcome"])] += 1
    assert got == {b: Counter(e.outcomes) for b, e in expected.items()}

    # The fleet saw exactly the requests a correct crawler makes (at least those, where timing decides how many
    # times a throttling host refuses); robots-disallowed paths never.
    for b, e in expected.items():
        seen = {path: n for (host, path), n in requests.items() if host == b}
        if e.exact:
            assert seen == dict(e.requests), b
        else:
            assert set(seen) == set(e.requests) and all(seen[p] >= n for p, n in e.requests.items()), (b, seen)
        assert not set(e.never_requested) & set(seen), b

    # Throttling hosts: each URL's attempts are the requests the host saw for it (throttled ones included), and
    # none of them used a retry or tripped a breaker.
    for b in ("throttle503", "rate429", "burst429", "retry_after"):
        base = hosts[b]
        for o in outcomes:
            if str(o["url"]).startswith(base + "/"):
                assert o["attempts"] == requests[(b, str(o["url"])[len(base) :])], (b, o)
        assert trips[b] == 0 and breaker_states[urlsplit(base).netloc] == "closed", b
    assert max(requests[("rate429", p)] for _, p in (k for k in requests if k[0] == "rate429")) > 1  # it did refuse
    # No request to rate429 started inside a Retry-After window it asked for.
    for b, _, at, after in refusals:
        if b == "rate429":
            inside = [h.at - at for h in hits if h.behaviour == b and at + IN_FLIGHT_SLACK < h.at < at + after]
            assert not inside, (at, inside)
    # throttle503: a path is asked again only after the Retry-After its 503 gave.
    for (b, path), n in requests.items():
        if b == "throttle503":
            times = sorted(h.at for h in hits if h.behaviour == b and h.path == path)
            assert n == 3 and min(y - x for x, y in pairwise(times)) >= THROTTLE_AFTER - 0.01, (path, times)
    # throttle_forever: its URL ends failed "throttled" (429) once the budget is spent, not skipped_breaker.
    forever = [o for o in outcomes if str(o["url"]).startswith(hosts["throttle_forever"] + "/")]
    assert [(o["outcome"], o["http_status"]) for o in forever] == [("failed", 429)]
    assert str(forever[0]["error"]).startswith("throttled")
    forever_hits = [h.at for h in hits if h.behaviour == "throttle_forever" and h.path != "/robots.txt"]
    budget = float(EXPECTED_SETTINGS["throttle_budget"])
    assert budget <= forever_hits[-1] - forever_hits[0] < budget + 2 * THROTTLE_AFTER + 0.5
    assert trips["throttle_forever"] == 0
    # A host that resets connections still opens its breaker after fail_max.
    assert trips["reset"] >= 1
    assert result.stats["throttled"][urlsplit(hosts["rate429"]).netloc] >= 1

    # Retry-After: 2 is honoured: the retry of each URL comes at least 2 s after the 503.
    for path in ("/products/1", "/date/products/2"):
        times = [h.at for h in hits if h.behaviour == "retry_after" and h.path == path]
        assert len(times) == 2 and times[1] - times[0] >= 2.0, (path, times)
    # Crawl-delay: 1 spaces the robots host's requests (robots.txt itself comes first).
    robots_times = [h.at for h in hits if h.behaviour == "robots" and h.path != "/robots.txt"]
    assert min(b - a for a, b in pairwise(robots_times)) >= 0.95

    # The breaker of the always-failing host opened; the healthy host's never did.
    assert breaker_states[urlsplit(hosts["error500"]).netloc] == "open"
    assert breaker_states[urlsplit(hosts["healthy"]).netloc] == "closed"

    # Every record is staged and loaded: all healthy pages among them.
    records = await _staged(stager, "raw")
    assert len(records) == sum(e.records for e in expected.values())
    pool = await connect_pool(database_url)
    try:
        loader = Loader(pool, stager)
        await loader.setup()
        for kind in ("outcomes", "raw"):
            for manifest in await stager.manifests(kind):  # type: ignore[arg-type]
                await loader.load_manifest(manifest)
    finally:
        await pool.close()
    healthy = hosts["healthy"]
    assert await db.fetchval("SELECT count(*) FROM trawl.chaos") == len(records)
    assert await db.fetchval("SELECT count(*) FROM trawl.chaos WHERE _url LIKE $1", f"{healthy}/%") == (
        expected["healthy"].records
    )
    assert await db.fetchval("SELECT count(*) FROM trawl._outcomes") == len(outcomes)


BOMB_SCRIPT = """
import asyncio, resource, sys
from tests.helpers.chaos import ChaosFleet
from trawl.errors import PermanentFetchError
from trawl.fetch import Fetcher
from trawl.settings import Settings

async def main() -> None:
    async with ChaosFleet(["gzip_bomb"]) as fleet, Fetcher(Settings(allowed_networks=["127.0.0.0/8"])) as fetcher:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            await fetcher.get(fleet.url("gzip_bomb", "/"), robots=False)
        except PermanentFetchError as exc:
            print("refused:", exc, file=sys.stderr)
        else:
            print("NOT REFUSED", file=sys.stderr)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)

asyncio.run(main())
"""


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_gzip_bomb_is_refused_without_blowing_memory(transport: str) -> None:
    script = BOMB_SCRIPT.replace(
        "robots=False)\n        except", f'robots=False, transport="{transport}")\n        except'
    )
    # cwd: the script imports ``tests.helpers`` from the checkout
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stderr and "larger than" in done.stderr, done.stderr
    grew_mb = int(done.stdout.strip())
    assert grew_mb < 200, f"peak RSS grew {grew_mb} MB fetching a 1 GiB gzip bomb"

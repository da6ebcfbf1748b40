"""The chaos fleet: every host misbehaves exactly as documented, and shuts down promptly whatever it is doing."""

from __future__ import annotations

import asyncio
import gzip
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict
from protego import Protego
from selectolax.lexbor import LexborHTMLParser

from tests.helpers.chaos import BEHAVIOURS, EXPECTED_SETTINGS, ChaosFleet, ChaosFleetThread, gzip_bomb
from trawl.records import OutcomeKind, utcnow
from trawl.settings import Settings

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.get(url, allow_redirects=False, **kwargs) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def fields(html: str) -> dict[str, str | None]:
    tree = LexborHTMLParser(html)

    def text(sel: str) -> str | None:
        node = tree.css_first(sel)
        return node.text(strip=True) if node is not None else None

    price = tree.css_first("p.price")
    return {
        "name": text("h1.name"),
        "sku": text("span.sku"),
        "category": text("span.category"),
        "price": price.attributes.get("data-amount") if price is not None else None,
    }


def links(html: str) -> list[str]:
    return [a.attributes.get("href") or "" for a in LexborHTMLParser(html).css("a[href]")]


async def test_one_address_per_behaviour_on_one_port() -> None:
    async with ChaosFleet() as fleet, ChaosFleet(["healthy", "robots"]) as other:
        hosts = {b: urlsplit(u) for b, u in fleet.hosts.items()}
        assert list(hosts) == list(BEHAVIOURS)
        assert len({h.hostname for h in hosts.values()}) == len(BEHAVIOURS)
        assert {h.port for h in hosts.values()} == {fleet.port}
        assert all(h.hostname and h.hostname.startswith("127.0.0.") for h in hosts.values())
        # A subset keeps each behaviour's address; a second fleet gets a port of its own.
        assert other.addresses == {"healthy": fleet.addresses["healthy"], "robots": fleet.addresses["robots"]}
        assert other.port != fleet.port
        assert fleet.url("huge", "products/2") == f"{fleet.hosts['huge']}/products/2"
        with pytest.raises(KeyError, match="not in this fleet"):
            other.url("hang")
        with pytest.raises(RuntimeError, match="already running"):
            await fleet.start()
    with pytest.raises(RuntimeError, match="not running"):
        _ = fleet.hosts
    with pytest.raises(ValueError, match="unknown behaviours"):
        ChaosFleet(["healthy", "teapot"])


async def test_seeds_cover_every_host() -> None:
    async with ChaosFleet() as fleet:
        seeds = fleet.seed_urls()
        assert {urlsplit(u).netloc for u in seeds} == {urlsplit(u).netloc for u in fleet.hosts.values()}
        assert fleet.url("redirect_forbidden", "/metadata") in seeds
        assert fleet.source()["start_urls"] == seeds


async def test_healthy_is_a_small_linked_shop(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["healthy"], pages=12) as fleet:
        status, _, body = await get(http, fleet.url("healthy"))
        assert status == 200
        assert links(body.decode()) == [f"/products/{i}" for i in range(1, 13)]
        status, headers, body = await get(http, fleet.url("healthy", "/products/5"))
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        page = fields(body.decode())
        assert page["sku"] == "SKU-00005" and page["name"] and page["category"]
        assert float(page["price"] or "") > 0
        hrefs = links(body.decode())
        assert hrefs[0] == "/" and len(hrefs) == 4 and "/products/5" not in hrefs
        # Conditional requests: the same ETag gives a bodiless 304.
        status, _, body = await get(
            http, fleet.url("healthy", "/products/5"), headers={"If-None-Match": headers["ETag"]}
        )
        assert (status, body) == (304, b"")
        assert (await get(http, fleet.url("healthy", "/products/13")))[0] == 404
        assert (await get(http, fleet.url("healthy", "/robots.txt")))[2] == b"User-agent: *\nAllow: /\n"
        assert fleet.requests[("healthy", "/products/5")] == 2
        assert fleet.totals["healthy"] == 5


async def test_error500_fails_everything_robots_included(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["error500"]) as fleet:
        for path in ("/", "/robots.txt", "/products/1"):
            assert (await get(http, fleet.url("error500", path)))[0] == 500
        assert fleet.totals == {"error500": 3}


async def test_retry_after_answers_503_once_per_path(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["retry_after"]) as fleet:
        status, headers, _ = await get(http, fleet.url("retry_after", "/products/1"))
        assert (status, headers["Retry-After"]) == (503, "2")
        status, _, body = await get(http, fleet.url("retry_after", "/products/1"))
        assert status == 200 and fields(body.decode())["sku"] == "SKU-RETRY_AFTER-00001"
        # The HTTP-date form, rounded up to a whole second: never earlier than asked.
        before = utcnow()
        status, headers, _ = await get(http, fleet.url("retry_after", "/date/products/2"))
        wait = (parsedate_to_datetime(headers["Retry-After"]) - before).total_seconds()
        assert status == 503 and 1.9 <= wait <= 3.1
        assert (await get(http, fleet.url("retry_after", "/date/products/2")))[0] == 200
        # robots.txt too.
        assert (await get(http, fleet.url("retry_after", "/robots.txt")))[0] == 503
        assert (await get(http, fleet.url("retry_after", "/robots.txt")))[0] == 200
        assert fleet.requests[("retry_after", "/products/1")] == 2
        first, second = [h.at for h in fleet.hits if h.path == "/products/1"]
        assert second >= first


async def test_burst429_then_ok_and_robots_exempt(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["burst429"], burst=2) as fleet:
        assert (await get(http, fleet.url("burst429", "/robots.txt")))[0] == 200
        statuses = [(await get(http, fleet.url("burst429")))[0] for _ in range(3)]
        assert statuses == [429, 429, 200]
        assert (await get(http, fleet.url("burst429", "/products/5")))[0] == 200
        assert fleet.totals["burst429"] == 5


async def test_reset_sends_an_rst_and_no_response(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["reset"]) as fleet:
        with pytest.raises(aiohttp.ClientOSError, match="reset by peer"):
            await get(http, fleet.url("reset", "/robots.txt"))
        parts = urlsplit(fleet.url("reset"))
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        # aiohttp resends an idempotent request once when the connection drops: 2 + 1 requests.
        assert fleet.totals["reset"] == 3


async def test_hang_never_answers_and_does_not_hold_up_shutdown(http: aiohttp.ClientSession) -> None:
    fleet = ChaosFleet(["hang"])
    async with fleet:
        assert (await get(http, fleet.url("hang", "/robots.txt")))[0] == 200
        with pytest.raises(TimeoutError):
            await get(http, fleet.url("hang"), timeout=aiohttp.ClientTimeout(total=0.3))
        pending = asyncio.create_task(get(http, fleet.url("hang", "/slow")))
        while not fleet.requests[("hang", "/slow")]:  # noqa: ASYNC110 -- the server's counter has no event to await
            await asyncio.sleep(0.01)
        started = time.monotonic()
    assert time.monotonic() - started < 0.5
    with pytest.raises(aiohttp.ClientConnectionError):
        await pending


async def test_drip_outlasts_a_read_timeout_but_not_a_total_one(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["drip"], drip_seconds=1.0, drip_interval=0.1) as fleet:
        started = time.monotonic()
        async with http.get(fleet.url("drip", "/products/1"), timeout=aiohttp.ClientTimeout(sock_read=0.5)) as resp:
            headers_after = time.monotonic() - started
            chunks = [c async for c in resp.content.iter_any()]
        assert headers_after < 0.3
        assert time.monotonic() - started >= 0.9
        assert len(chunks) >= 5
        assert fields(b"".join(chunks).decode())["sku"] == "SKU-DRIP-00001"
        with pytest.raises(TimeoutError):
            await get(http, fleet.url("drip", "/products/1"), timeout=aiohttp.ClientTimeout(total=0.3))
        started = time.monotonic()
    assert time.monotonic() - started < 0.5  # a drip in progress is cut off at shutdown


async def test_truncated_declares_more_than_it_sends(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["truncated"]) as fleet:
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(http, fleet.url("truncated", "/products/1"))
        parts = urlsplit(fleet.url("truncated"))
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(b"GET /products/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await reader.read()  # until the server closes
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        declared = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
        assert 0 < len(body) < declared
        assert (await get(http, fleet.url("truncated", "/robots.txt")))[0] == 200


def test_gzip_bomb_is_valid_gzip_of_zeros() -> None:
    for size in (0, 1, MiB, 3 * MiB + 5):
        assert gzip.decompress(gzip_bomb(size)) == bytes(size)  # CRC and length checked by gzip


async def test_gzip_bomb_is_small_on_the_wire_and_huge_inflated(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["gzip_bomb"]) as fleet:
        status, headers, raw = await get(http, fleet.url("gzip_bomb"), auto_decompress=False)
        assert status == 200 and headers["Content-Encoding"] == "gzip"
        assert len(raw) < 1.2 * MiB and int(headers["Content-Length"]) == len(raw)
        assert int.from_bytes(raw[-4:], "little") == (1 << 30) & 0xFFFFFFFF  # ISIZE: 1 GiB
        # Inflate incrementally with a cap, as a careful client would: past 64 MiB after a few KB of input.
        inflater = zlib.decompressobj(wbits=31)
        inflated, used, pending = 0, 0, b""
        while inflated <= 64 * MiB:
            if not pending:
                pending, used = raw[used : used + 4096], used + 4096
            inflated += len(inflater.decompress(pending, MiB))
            pending = inflater.unconsumed_tail
        assert used < 128 * 1024
        status, headers, raw = await get(http, fleet.url("gzip_bomb", "/robots.txt"), auto_decompress=False)
        assert headers["Content-Encoding"] == "gzip" and len(raw) < 1.2 * MiB


async def test_redirect_loop_never_ends(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["redirect_loop"]) as fleet:
        assert (await get(http, fleet.url("redirect_loop", "/a")))[1]["Location"] == "/b"
        assert (await get(http, fleet.url("redirect_loop", "/b")))[1]["Location"] == "/a"
        with pytest.raises(aiohttp.TooManyRedirects):
            async with http.get(fleet.url("redirect_loop", "/a"), max_redirects=5):
                pass
        a, b = fleet.requests[("redirect_loop", "/a")], fleet.requests[("redirect_loop", "/b")]
        assert a + b >= 2 + 5 and a - b in (0, 1)  # /a, /b, /a, ... for as long as the client follows


async def test_redirect_forbidden_points_at_metadata_and_private_nets(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["redirect_forbidden"]) as fleet:
        status, headers, _ = await get(http, fleet.url("redirect_forbidden", "/metadata"))
        assert (status, headers["Location"]) == (302, "http://169.254.169.254/latest/meta-data/")
        status, headers, _ = await get(http, fleet.url("redirect_forbidden", "/private-net"))
        assert (status, headers["Location"]) == (302, "http://10.0.0.1/")


async def test_huge_pages_streamed_with_and_without_length(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["huge"]) as fleet:
        async with http.get(fleet.url("huge", "/products/2")) as resp:
            assert resp.content_length == 20 * MiB
            head = await resp.content.read(4096)
        assert b'class="sku">SKU-HUGE-00002<' in head
        async with http.get(fleet.url("huge", "/products/1")) as resp:
            assert resp.content_length is None and resp.headers["Transfer-Encoding"] == "chunked"
            size = 0
            async for chunk in resp.content.iter_chunked(MiB):
                size += len(chunk)
        assert size == 20 * MiB
    async with ChaosFleet(["huge"], huge_bytes=MiB) as fleet:
        status, _, body = await get(http, fleet.url("huge", "/products/2"))
        assert status == 200 and len(body) == MiB
        assert body.endswith(b"</html>\n") and fields(body.decode())["sku"] == "SKU-HUGE-00002"


async def test_malformed_pages_still_carry_their_fields(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["malformed"]) as fleet:
        status, _, body = await get(http, fleet.url("malformed"))
        assert status == 200
        assert links(body.decode("utf-8", "replace")) == ["/products/1", "/products/2", "/products/3"]
        for i in (1, 2, 3):
            status, headers, body = await get(http, fleet.url("malformed", f"/products/{i}"))
            with pytest.raises(UnicodeDecodeError):
                body.decode("utf-8")
            assert b"\x00" in body and b"</html>" not in body
            page = fields(body.decode("utf-8", "replace"))
            assert page["sku"] == f"SKU-MALFORMED-{i:05d}" and page["name"] and page["category"] and page["price"]
        assert headers["Content-Type"] == "text/html; charset=x-no-such-charset"
        _, _, robots = await get(http, fleet.url("malformed", "/robots.txt"))
        with pytest.raises(UnicodeDecodeError):
            robots.decode("utf-8")
        rules = Protego.parse(robots.decode("utf-8", "replace"))
        assert rules.can_fetch(fleet.url("malformed", "/products/1"), "trawl")
        assert rules.crawl_delay("trawl") is None


async def test_robots_host_disallows_private_with_a_crawl_delay(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["robots"]) as fleet:
        _, _, body = await get(http, fleet.url("robots", "/robots.txt"))
        rules = Protego.parse(body.decode())
        assert rules.crawl_delay("trawl") == 1
        _, _, index = await get(http, fleet.url("robots"))
        hrefs = links(index.decode())
        assert [h for h in hrefs if h.startswith("/private/")] == ["/private/products/1", "/private/products/2"]
        for href in hrefs:
            allowed = rules.can_fetch(fleet.url("robots", href), "trawl")
            assert allowed == href.startswith("/public/")
        # Private pages exist, so a crawler that ignores robots.txt shows up in the counter.
        assert (await get(http, fleet.url("robots", "/private/products/1")))[0] == 200
        assert fleet.requests[("robots", "/private/products/1")] == 1


@pytest.mark.parametrize(
    ("behaviour", "expect"),
    [
        ("healthy", 200),
        ("error500", 500),
        ("burst429", 200),
        ("hang", 200),
        ("drip", 200),
        ("truncated", 200),
        ("redirect_loop", 200),
        ("redirect_forbidden", 200),
        ("huge", 200),
        ("malformed", 200),
        ("robots", 200),
    ],
)
async def test_robots_txt_per_host(http: aiohttp.ClientSession, behaviour: str, expect: int) -> None:
    async with ChaosFleet([behaviour], burst=10) as fleet:
        status, headers, _ = await get(http, fleet.url(behaviour, "/robots.txt"))
        assert status == expect and headers["Content-Type"].startswith("text/")


async def test_expected_table_matches_the_fleet() -> None:
    assert set(EXPECTED_SETTINGS) <= set(Settings.model_fields)
    Settings(**EXPECTED_SETTINGS)
    async with ChaosFleet(pages=7, burst=3) as fleet:
        expected = fleet.expected
        assert list(expected) == list(BEHAVIOURS)
        kinds = {k.value for k in OutcomeKind}
        for behaviour, e in expected.items():
            assert e.outcome in kinds and set(e.outcomes) <= kinds and e.outcome in e.outcomes
            assert e.requests["/robots.txt"] >= 1
            assert set(e.seeds) <= set(fleet.seed_urls())
            assert not set(e.never_requested) & set(e.requests), behaviour
        assert expected["healthy"].outcomes == {"fetched": 8} and expected["healthy"].records == 7
        assert expected["burst429"].requests["/"] == 4
        assert expected["reset"].requests == {"/robots.txt": 4, "/": 3}  # one hit per attempt: no hidden resend
        assert expected["robots"].never_requested == ("/private/products/1", "/private/products/2")
        assert expected["redirect_forbidden"].outcomes == {"blocked_network": 2}
        # One more 429 than the index has attempts: before throttle signals stopped using retries this ended
        # `failed`; now the index outlasts any burst.
        fleet.burst = 4
        assert fleet.expected["burst429"].outcomes == {"fetched": 6}
        assert fleet.expected["burst429"].requests["/"] == 5
        assert expected["throttle503"].requests["/products/20"] == 3 and expected["throttle503"].exact
        assert expected["rate429"].outcomes == {"fetched": 51} and not expected["rate429"].exact
        assert expected["throttle_forever"].outcomes == {"failed": 1}
        fleet.drip_seconds = 1.0  # inside total_timeout: the page arrives
        assert fleet.expected["drip"].outcomes == {"fetched": 1}


async def test_throttle503_answers_503_twice_per_path(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["throttle503"], throttle_after=2, throttle_pages=3) as fleet:
        for path in ("/robots.txt", "/", "/products/3"):
            answers = [await get(http, fleet.url("throttle503", path)) for _ in range(3)]
            assert [a[0] for a in answers] == [503, 503, 200], path
            assert answers[0][1]["Retry-After"] == "2"
        assert links((await get(http, fleet.url("throttle503", "/")))[2].decode()) == [
            f"/products/{i}" for i in (1, 2, 3)
        ]
        assert [(b, p) for b, p, _, _ in fleet.refusals].count(("throttle503", "/")) == 2


async def test_rate429_serves_at_most_rate_per_second(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["rate429"], rate=3, rate_after=1) as fleet:
        statuses = [(await get(http, fleet.url("rate429", f"/products/{i}")))[0] for i in range(1, 6)]
        assert statuses == [200, 200, 200, 429, 429]
        assert (await get(http, fleet.url("rate429", "/robots.txt")))[0] == 429  # robots.txt counts too
        assert len(fleet.refusals) == 3 and all(r[3] == 1 for r in fleet.refusals)
        await asyncio.sleep(1.05)
        assert (await get(http, fleet.url("rate429", "/")))[0] == 200


async def test_throttle_forever_never_serves_a_page(http: aiohttp.ClientSession) -> None:
    async with ChaosFleet(["throttle_forever"], throttle_after=0.5) as fleet:
        for _ in range(3):
            status, headers, _ = await get(http, fleet.url("throttle_forever", "/"))
            assert (status, headers["Retry-After"]) == (429, "0.5")
        assert (await get(http, fleet.url("throttle_forever", "/robots.txt")))[0] == 200


def test_thread_serves_from_its_own_loop() -> None:
    with ChaosFleetThread(["healthy", "hang"], pages=3) as chaos:
        with urllib.request.urlopen(chaos.url("healthy", "/products/3"), timeout=5) as resp:
            assert fields(resp.read().decode())["sku"] == "SKU-00003"
        assert chaos.requests[("healthy", "/products/3")] == 1
        assert set(chaos.hosts) == {"healthy", "hang"}
        parts = urlsplit(chaos.url("hang"))
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=5) as sock:
            sock.sendall(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n")
            deadline = time.monotonic() + 5
            while not chaos.requests[("hang", "/stuck")] and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            chaos.stop()
            assert time.monotonic() - started < 0.5
            with pytest.raises(ConnectionResetError):  # cut off without a response
                sock.recv(1024)


def test_main_prints_one_line_per_host() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.chaos", "--behaviours", "healthy,robots", "--port", "0"],
        cwd=REPO,  # `-m tests.helpers.chaos` resolves from the checkout
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = dict(proc.stdout.readline().split() for _ in range(2))
        assert set(lines) == {"healthy", "robots"}
        with urllib.request.urlopen(lines["robots"] + "/robots.txt", timeout=5) as resp:
            assert b"Disallow: /private/" in resp.read()
    finally:
        proc.terminate()
        proc.wait(5)
        if proc.stdout is not None:  # else an unclosed pipe (ResourceWarning) when it is collected
            proc.stdout.close()

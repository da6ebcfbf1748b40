"""The hostile fleet's parts count what reaches them, and the guard's DNS is the test's."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.helpers.hostile import FORBIDDEN_IP, SECRET, Dns, ForbiddenListener, Hostile
from trawl.errors import BlockedNetworkError
from trawl.fetch import Fetcher
from trawl.netguard import NetworkGuard, RefusedAddress
from trawl.settings import Settings


async def test_the_forbidden_listener_counts_connections_and_datagrams() -> None:
    async with ForbiddenListener() as forbidden, aiohttp.ClientSession() as http:
        async with http.get(forbidden.url()) as resp:
            assert SECRET in await resp.text()
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(FORBIDDEN_IP, forbidden.port)
        )
        udp.sendto(b"stun")
        udp.close()
        for _ in range(50):
            if forbidden.datagrams:
                break
            await asyncio.sleep(0.01)
        assert (forbidden.connections, forbidden.datagrams, forbidden.hits) == (1, 1, 2)


async def test_dns_answers_in_sequence_and_falls_through() -> None:
    dns = Dns()
    dns.rebind("rebind.test", "127.0.0.2")
    assert await dns("rebind.test", 80) == ["127.0.0.2"]
    assert await dns("REBIND.test.", 80) == [FORBIDDEN_IP]
    assert await dns("rebind.test", 80) == [FORBIDDEN_IP]
    assert "127.0.0.1" in await dns("localhost", 80)


async def test_installed_dns_reaches_every_guard(hostile: Hostile) -> None:
    hostile.dns.rebind("rebind.test", "127.0.0.2")
    guard = NetworkGuard(hostile.allowed)
    assert await guard.addresses("rebind.test") == ["127.0.0.2"]
    with pytest.raises(RefusedAddress, match=r"rebind\.test resolves to 127\.0\.1\.1"):
        await guard.addresses("rebind.test")


async def test_aiohttp_connects_only_to_the_addresses_it_checked(hostile: Hostile) -> None:
    # The guard's check sees an allowed address; the connection's lookup gets the forbidden one.
    hostile.dns.rebind("rebind.test", "127.0.0.2")
    settings = Settings(allowed_networks=hostile.allowed, max_retries=0, connect_timeout=2, total_timeout=5)
    async with Fetcher(settings) as fetcher:
        with pytest.raises(BlockedNetworkError, match="a network the settings do not allow"):
            await fetcher.get(f"http://rebind.test:{hostile.forbidden.port}/", robots=False)
    assert hostile.forbidden.hits == 0

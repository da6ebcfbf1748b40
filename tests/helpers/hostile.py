"""The hostile fleet's fixed parts: a forbidden listener that counts what reaches it, and DNS the test controls.

The allowed network in these tests is ``127.0.0.0/24`` (:data:`ALLOWED`); the
forbidden listener binds ``127.0.1.1`` — still loopback, so the test can reach
it, but outside the allowed range, so trawl must never connect to it. It counts
every TCP connection and UDP datagram (WebRTC/STUN) it receives and answers
TCP with a small HTTP page holding :data:`SECRET`, so a leak shows in data too.

:class:`Dns` plays the resolver: names map to a sequence of answers, the last one
repeating, e.g. ``{"rebind.test": [["127.0.0.2"], ["127.0.1.1"]]}`` answers an
allowed address to the guard's check and the forbidden one to the connection
that follows. ``dns.install(monkeypatch)`` makes every guard of the process use it
(the crawls under test build their own); names it does not know fall through to
the system resolver.

Use the ``hostile`` fixture (registered in tests/conftest.py) or the classes directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

import trawl.netguard

__all__ = ["ALLOWED", "FORBIDDEN_IP", "SECRET", "Dns", "ForbiddenListener", "Hostile", "hostile"]

ALLOWED = ["127.0.0.0/24"]
FORBIDDEN_IP = "127.0.1.1"
SECRET = "forbidden-network-secret-7d1f"


class ForbiddenListener:
    """TCP and UDP on ``127.0.1.1:<port>``, counting every connection and datagram it receives."""

    def __init__(self, host: str = FORBIDDEN_IP) -> None:
        self.host = host
        self.port = 0
        self.connections = 0
        self.datagrams = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._udp: asyncio.DatagramTransport | None = None

    @property
    def hits(self) -> int:
        """Everything that reached the listener: TCP connections plus UDP datagrams."""
        return self.connections + self.datagrams

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/latest/meta-data/") -> str:
        return f"{self.base}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await asyncio.wait_for(reader.read(4096), 2)
            self.requests.append(head)
            body = f"<html><body><h1>{SECRET}</h1><a href='/more'>{SECRET}</a></body></html>".encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> ForbiddenListener:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        listener = self

        class _Udp(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
                listener.datagrams += 1

        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(_Udp, local_addr=(self.host, self.port))
        self._udp = transport
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Dns:
    """A resolver the test controls (a :data:`trawl.netguard.Resolve`)."""

    names: dict[str, list[list[str]]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def set(self, name: str, *answers: list[str]) -> None:
        """``name`` answers ``answers[0]`` to the first lookup, ``answers[1]`` to the second, ... the last for ever."""
        self.names[name.lower()] = list(answers)
        self.calls[name.lower()] = 0

    def rebind(self, name: str, first: str, then: str = FORBIDDEN_IP) -> None:
        """``name`` answers ``first`` once (the guard's check), then ``then`` for every later lookup."""
        self.set(name, [first], [then])

    async def __call__(self, host: str, port: int) -> list[str]:
        host = host.lower().rstrip(".")
        answers = self.names.get(host)
        if answers is None:
            return await _system(host, port)
        n = self.calls.get(host, 0)
        self.calls[host] = n + 1
        return list(answers[min(n, len(answers) - 1)])

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every NetworkGuard of this process (built without its own resolver) resolves through this one."""
        monkeypatch.setattr(trawl.netguard, "resolve", self)


_system = trawl.netguard.resolve


@dataclass
class Hostile:
    """What the ``hostile`` fixture gives a test: the forbidden listener and the DNS, installed."""

    forbidden: ForbiddenListener
    dns: Dns
    allowed: list[str] = field(default_factory=lambda: list(ALLOWED))


@pytest_asyncio.fixture
async def hostile(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hostile]:
    """A forbidden listener on 127.0.1.1 and DNS the test controls, installed for every guard of the process.

    The test asserts ``hostile.forbidden.hits == 0`` at the end (the fixture does not, so a test can also
    show the listener counts what reaches it)."""
    dns = Dns()
    dns.install(monkeypatch)
    async with ForbiddenListener() as forbidden:
        yield Hostile(forbidden, dns)

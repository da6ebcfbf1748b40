"""The browser's way out: an in-process HTTP forward proxy that connects only where the network guard allows.

Chromium is launched with this proxy for everything (``--proxy-server``, loopback
included, and DNS mapped to nothing so it never resolves a name itself):
documents, redirect hops, subresources, ``fetch()``, WebSockets and TURN over TCP
all arrive here, as ``CONNECT host:port`` (https, wss) or as an absolute-URI
request (plain http). For each one the proxy resolves the host through
:meth:`trawl.netguard.NetworkGuard.addresses` and connects to an address that
call returned, so what was checked is what is connected to, whatever DNS says a
moment later. A refusal is answered ``403`` with a body that says nothing about
the address (a page must not learn what internal names resolve to) and kept
for a while, so a navigation can tell a refused document from a page's own 403.

With ``upstream`` (the source's forward proxies, :class:`trawl.proxies.ProxyPool`)
the target host is still checked the same way, and then the request goes on
through one of those proxies (its own address passed by the guard too): a tunnel
is opened with ``CONNECT`` there, a plain http request is sent in absolute form.
A proxy that cannot be reached or refuses the tunnel counts against its breaker
and the next one is tried.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import structlog

from trawl.errors import TrawlError
from trawl.netguard import NetworkGuard, RefusedAddress, UnresolvedHost
from trawl.proxies import Proxy, ProxyPool

__all__ = ["GuardedProxy"]

log = structlog.get_logger("trawl.connectors.proxy")

_HEAD_LIMIT = 64 * 1024
"""Largest request or response head the proxy reads (Chromium's own limit is 256 KiB for responses)."""
_CHUNK = 64 * 1024
_REMEMBERED = 4096
"""Refusals kept (host, port) for :meth:`GuardedProxy.refusal`; the oldest are forgotten first."""
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te", b"upgrade"})


def _reply(status: str, body: str) -> bytes:
    data = body.encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\nProxy-Connection: close\r\n\r\n"
    ).encode() + data


_REFUSED = _reply("403 Forbidden", "refused by trawl's network guard\n")
_BAD_GATEWAY = _reply("502 Bad Gateway", "trawl's proxy could not reach the host\n")
_BAD_REQUEST = _reply("400 Bad Request", "trawl's proxy did not understand the request\n")


def _split_authority(authority: str) -> tuple[str, int] | None:
    """``host:port`` of a CONNECT request (``[v6]:port`` too); None when it is not one."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]").lower()
    number = int(port)
    return (host, number) if host and 0 < number < 65536 else None


class GuardedProxy:
    """An HTTP/1.1 forward proxy on ``127.0.0.1`` whose every upstream connection passes the network guard.

    An async context manager; :attr:`url` is what Chromium's ``--proxy-server`` gets.
    ``on_refused(host, port, reason)`` is called for each refused request.
    """

    def __init__(
        self,
        guard: NetworkGuard,
        *,
        connect_timeout: float = 10.0,
        host: str = "127.0.0.1",
        on_refused: Callable[[str, int, str], None] | None = None,
        upstream: ProxyPool | None = None,
    ) -> None:
        self._guard = guard
        self._upstream = upstream
        self._connect_timeout = connect_timeout
        self.host = host
        self.port = 0
        self._on_refused = on_refused
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._refusals: OrderedDict[tuple[str, int], tuple[float, str]] = OrderedDict()
        self.refused = 0
        """Requests refused by the guard since the proxy started."""
        self.connections = 0
        """Upstream connections made."""
        self.via: Counter[str] = Counter()
        """Requests carried per upstream proxy (``scheme://host:port``), with ``upstream``."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> GuardedProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0, limit=_HEAD_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening and drop every connection in flight (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    def refusal(self, url: str, since: float = 0.0) -> str | None:
        """Why the proxy refused the URL's host and port at or after ``since`` (``time.monotonic()``), or None."""
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
        except ValueError:
            return None
        seen = self._refusals.get(((parts.hostname or "").lower(), port))
        return seen[1] if seen is not None and seen[0] >= since else None

    def _refuse(self, host: str, port: int, reason: str) -> None:
        self.refused += 1
        self._refusals[(host, port)] = (time.monotonic(), reason)
        self._refusals.move_to_end((host, port))
        while len(self._refusals) > _REMEMBERED:
            self._refusals.popitem(last=False)
        log.warning("browser request refused by the network guard", host=host, port=port, reason=reason)
        if self._on_refused is not None:
            self._on_refused(host, port, reason)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._connect_timeout)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            lines = head[:-4].split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                writer.write(_BAD_REQUEST)
                return
            method, target, version = parts
            tunnel = method == b"CONNECT"
            where = self._target(target.decode("latin-1"), tunnel)
            if where is None:
                writer.write(_BAD_REQUEST)
                return
            host, port, path = where
            opened = await self._open(host, port, tunnel)
            if isinstance(opened, bytes):
                writer.write(opened)
                return
            up_reader, upstream, via = opened
            self._writers.add(upstream)
            if tunnel:
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            else:
                # One request per connection both ways: the next request may be for another host,
                # and it must come back here (through the guard), not down this socket.
                kept = [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in _HOP_BY_HOP]
                line = method + b" " + (target if via is not None else path) + b" " + version
                auth = [_proxy_authorization(via)] if via is not None and _has_credentials(via) else []
                upstream.write(b"\r\n".join([line, *kept, *auth, b"Connection: close"]))
                upstream.write(b"\r\n\r\n")
            await _splice(reader, writer, up_reader, upstream, response_head=not tunnel)
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.close()

    def _target(self, target: str, tunnel: bool) -> tuple[str, int, bytes] | None:
        """(host, port, origin-form path) of a request target; None when it is not one a proxy serves."""
        if tunnel:
            split = _split_authority(target)
            return None if split is None else (*split, b"")
        parts = urlsplit(target)
        if parts.scheme not in ("http", "ws") or not parts.hostname:
            return None
        try:
            port = parts.port or 80
        except ValueError:
            return None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return parts.hostname.lower(), port, path.encode("latin-1")

    async def _open(
        self, host: str, port: int, tunnel: bool = True
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Proxy | None] | bytes:
        """Connect to an address the guard returned for ``host`` (never the proxy itself), or with ``upstream``
        to a proxy on the way there; when refused (the refusal is recorded) or unreachable, the reply for the
        client instead."""
        try:
            if self._server is not None and port == self.port and _same_ip(host, self.host):
                raise RefusedAddress(f"{host}:{port} is trawl's own browser proxy")
            ips = await self._guard.addresses(host, port)
        except RefusedAddress as exc:
            self._refuse(host, port, str(exc))
            return _REFUSED
        except UnresolvedHost as exc:  # a failed lookup is a refusal, with an upstream proxy too
            log.info("browser request: host not resolved", host=host, port=port, error=str(exc))
            return _BAD_GATEWAY
        if self._upstream is not None:
            return await self._through_upstream(host, port, tunnel)
        opened = await self._connect(ips, port)
        return _BAD_GATEWAY if opened is None else (*opened, None)

    async def _connect(self, ips: list[str], port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for ip in ips:
            try:
                opened = await asyncio.wait_for(asyncio.open_connection(ip, port), self._connect_timeout)
            except (OSError, TimeoutError):
                continue
            self.connections += 1
            return opened
        return None

    async def _through_upstream(
        self, host: str, port: int, tunnel: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Proxy] | bytes:
        """A connection through one of the upstream proxies (a tunnel to ``host:port`` when ``tunnel``)."""
        pool = self._upstream
        assert pool is not None
        for _ in range(len(pool.proxies)):
            try:
                proxy, probe = pool.pick(host, f"http://{host}:{port}/")
            except TrawlError:
                break  # every proxy benched
            breaker = pool.breaker(proxy)
            parts = urlsplit(proxy.url)
            try:
                ips = await self._guard.addresses(parts.hostname or "", parts.port or 80)
            except (RefusedAddress, UnresolvedHost) as exc:
                breaker.release(probe)
                self._refuse(host, port, f"proxy {proxy.label}: {exc}")
                return _REFUSED
            opened = await self._connect(ips, parts.port or 80)
            if opened is not None and tunnel and not await _tunnel(opened, host, port, proxy, self._connect_timeout):
                opened[1].close()
                opened = None
            if opened is None:
                breaker.record(False, probe)
                log.warning("browser request: upstream proxy failed", proxy=proxy.label, host=host, port=port)
                continue
            breaker.record(True, probe)
            self.via[proxy.label] += 1
            return (*opened, proxy)
        return _BAD_GATEWAY


def _has_credentials(proxy: Proxy) -> bool:
    return urlsplit(proxy.url).username is not None


def _proxy_authorization(proxy: Proxy) -> bytes:
    parts = urlsplit(proxy.url)
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return b"Proxy-Authorization: Basic " + base64.b64encode(pair.encode())


async def _tunnel(
    opened: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str, port: int, proxy: Proxy, wait: float
) -> bool:
    """Ask the upstream proxy for a tunnel to ``host:port``; whether it agreed (2xx)."""
    reader, writer = opened
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = [f"CONNECT {authority} HTTP/1.1".encode(), f"Host: {authority}".encode()]
    if _has_credentials(proxy):
        head.append(_proxy_authorization(proxy))
    writer.write(b"\r\n".join([*head, b"", b""]))
    try:
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return False
    status = answer.split(b" ", 2)
    return len(status) > 1 and status[1].startswith(b"2")


def _same_ip(host: str, other: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(other)
    except ValueError:
        return False


async def _splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    upstream: asyncio.StreamWriter,
    *,
    response_head: bool,
) -> None:
    """Copy bytes both ways until either side closes (so a client that goes away ends a slow upstream too).

    With ``response_head``, the upstream's response head is passed on saying the connection closes
    after it, so Chromium sends its next request on a new connection, through the guard.
    """

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, head: bool = False) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            if head:
                lines = (await src.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
                kept = [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in _HOP_BY_HOP]
                dst.write(b"\r\n".join([lines[0], *kept, b"Connection: close", b"Proxy-Connection: close", b"", b""]))
            while data := await src.read(_CHUNK):
                dst.write(data)
                await dst.drain()

    tasks = [
        asyncio.ensure_future(pump(reader, upstream)),
        asyncio.ensure_future(pump(up_reader, writer, head=response_head)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

"""A local forward HTTP proxy (absolute-form requests and CONNECT) that logs what it carried and can be killed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from types import TracebackType
from typing import Self

__all__ = ["ForwardProxy"]


class ForwardProxy:
    """Carries ``GET http://host/path`` requests (and ``CONNECT host:port`` tunnels) on ``host``:random port.

    ``log`` holds ``(method, target)`` of every request carried; ``auth`` (``user:password``) makes it
    answer 407 without a matching ``Proxy-Authorization``. :meth:`kill` closes the listener and every
    connection at once (a proxy that dies mid-run).
    """

    def __init__(self, host: str = "127.0.0.1", auth: str | None = None) -> None:
        self.host = host
        self.auth = auth
        self.port = 0
        self.log: list[tuple[str, str]] = []
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        creds = f"{self.auth}@" if self.auth else ""
        return f"http://{creds}{self.host}:{self.port}"

    @property
    def label(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            while await self._one(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away, or the target could not be reached: the connection just closes
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [ln for ln in lines[1:] if ln]
        given = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in headers)}
        if self.auth is not None:
            want = "Basic " + base64.b64encode(self.auth.encode()).decode()
            if given.get("proxy-authorization") != want:
                self.refused += 1
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return True
        self.log.append((method, target))
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_r, up_w = await asyncio.open_connection(host, int(port))
            try:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
            finally:
                up_w.close()
            return False
        rest = target.removeprefix("http://")
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        body = b""
        if int(given.get("content-length", "0")):
            body = await reader.readexactly(int(given["content-length"]))
        up_r, up_w = await asyncio.open_connection(host, int(port or 80))
        try:
            kept = [h for h in headers if not h.lower().startswith(("proxy-", "connection:", "keep-alive:"))]
            up_w.write(f"{method} /{path} HTTP/1.1\r\n".encode() + "\r\n".join([*kept, "Connection: close"]).encode())
            up_w.write(b"\r\n\r\n" + body)
            await up_w.drain()
            response = await up_r.read()  # the upstream closes after its answer (Connection: close)
        finally:
            up_w.close()
        status_head, _, payload = response.partition(b"\r\n\r\n")
        resp_lines = [
            ln
            for ln in status_head.split(b"\r\n")
            if not ln.lower().startswith((b"connection:", b"keep-alive:", b"transfer-encoding:", b"content-length:"))
        ]
        if b"transfer-encoding: chunked" in status_head.lower():
            payload = _unchunk(payload)
        resp_lines.append(b"Content-Length: %d" % len(payload))
        writer.write(b"\r\n".join(resp_lines) + b"\r\n\r\n" + payload)
        await writer.drain()
        return True

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def kill(self) -> None:
        """Stop listening and drop every connection (requests in flight through it fail)."""
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._client, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.kill()


def _unchunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)

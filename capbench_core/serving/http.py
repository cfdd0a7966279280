"""A lean HTTP/1.1 streaming client: h11 for the protocol, asyncio streams for I/O.

The measuring client must add as little as possible between "request sent" and
"first byte seen": general-purpose clients add 1–2 ms per request on a small
machine, which is larger than the TTFT error we allow (0.5 ms). h11 does the
HTTP parsing (a well-kept library, the one httpx is built on); this module only
keeps a pool of keep-alive connections with TCP_NODELAY and streams bodies.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11


class ConnectionClosed(Exception):
    """The server closed the connection before the response ended."""


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection


class StreamingClient:
    """Keep-alive connections to one host; not shared across event loops."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 600.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http:// URLs are supported, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = [("host", f"{self.host}:{self.port}"), *(headers or {}).items()]
        self.timeout_s = timeout_s
        self._idle: list[_Conn] = []

    async def _connect(self, fresh: bool = False) -> _Conn:
        """An idle keep-alive connection the server has not closed, else a new one."""
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.writer.close()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port, limit=1 << 22), 10)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(reader, writer, h11.Connection(h11.CLIENT))

    async def _next(self, conn: _Conn) -> h11.Event:
        while True:
            event = conn.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await asyncio.wait_for(conn.reader.read(1 << 16), self.timeout_s)
            conn.h11.receive_data(data)

    async def post_stream(self, path: str, body: bytes,
                          content_type: str = "application/json") -> AsyncIterator[tuple[int, bytes]]:
        """POST and yield (status, body piece) as bytes arrive; the status comes with every piece.

        A kept-alive connection the server closed between requests (some servers close idle ones
        without saying so) fails before any response byte: the request is sent again, once, on a
        new connection; it cannot have been processed."""
        reused = bool(self._idle)
        got_any = False
        try:
            async for piece in self._post_once(await self._connect(), path, body, content_type):
                got_any = True
                yield piece
        except ConnectionClosed:
            if not reused or got_any:
                raise
            async for piece in self._post_once(await self._connect(fresh=True), path, body, content_type):
                yield piece

    async def _post_once(self, conn: _Conn, path: str, body: bytes,
                         content_type: str) -> AsyncIterator[tuple[int, bytes]]:
        headers = [*self.headers, ("content-type", content_type), ("content-length", str(len(body)))]
        try:
            conn.writer.write(conn.h11.send(h11.Request(method="POST", target=self.prefix + path, headers=headers))
                              + conn.h11.send(h11.Data(data=body)) + conn.h11.send(h11.EndOfMessage()))
            status = 0
            while True:
                event = await self._next(conn)
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    yield status, bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionClosed("server closed the connection mid-response")
        except (h11.RemoteProtocolError, ConnectionError, asyncio.IncompleteReadError) as exc:
            conn.writer.close()
            raise ConnectionClosed(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            conn.writer.close()
            raise
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            self._idle.append(conn)
        else:
            conn.writer.close()

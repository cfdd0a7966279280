"""A lean HTTP/1.1 streaming client: llhttp (through httptools) for the protocol, asyncio streams for I/O.

The measuring client must add as little as possible between "request sent" and
"first byte seen": general-purpose clients add 1–2 ms per request on a small
machine, which is larger than the TTFT error we allow (0.5 ms). At hundreds of
streams the cost per streamed chunk matters as much: httptools wraps llhttp,
Node.js's C parser (the one uvicorn uses), which parses a chunk in a fraction of
the time a pure-Python parser takes. This module only writes the request, keeps a
pool of keep-alive connections with TCP_NODELAY and streams the body as it comes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools


class ConnectionClosed(Exception):
    """The server closed the connection before the response ended."""


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class _Response:
    """httptools' callbacks for one response: its body pieces as they are parsed, and whether it ended."""

    pieces: list[bytes] = field(default_factory=list)
    complete: bool = False
    framed: bool = False  # a content-length or chunked body; else the body ends when the server closes
    headers_done: bool = False
    keep_alive: bool = False  # read when the message completes: llhttp forgets it right after
    parser: httptools.HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()


class StreamingClient:
    """Keep-alive connections to one host; not shared across event loops."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 600.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http:// URLs are supported, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in {"host": f"{self.host}:{self.port}",
                                                             **(headers or {})}.items())
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
        return _Conn(reader, writer)

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
        head = (f"POST {self.prefix}{path} HTTP/1.1\r\n{self.headers}content-type: {content_type}\r\n"
                f"content-length: {len(body)}\r\n\r\n")
        response = _Response()
        parser = response.parser = httptools.HttpResponseParser(response)
        idle = _IdleTimeout(conn, self.timeout_s)
        try:
            conn.writer.write(head.encode() + body)
            while not response.complete:
                data = await conn.reader.read(1 << 16)
                idle.touch()
                if idle.fired:
                    raise asyncio.TimeoutError(f"no byte from the server for {self.timeout_s:g} s")
                if not data and response.headers_done and not response.framed:
                    break  # a body delimited by the connection's end: it ended
                if not data:
                    raise ConnectionClosed("server closed the connection mid-response")
                parser.feed_data(data)
                if response.pieces:
                    piece = b"".join(response.pieces) if len(response.pieces) > 1 else response.pieces[0]
                    response.pieces.clear()
                    yield parser.get_status_code(), piece
        except (httptools.HttpParserError, ConnectionError) as exc:
            conn.writer.close()
            raise ConnectionClosed(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            conn.writer.close()
            raise
        finally:
            idle.cancel()
        if response.complete and response.keep_alive:
            self._idle.append(conn)
        else:
            conn.writer.close()


class _IdleTimeout:
    """Ends a response's connection when no byte has come for ``timeout_s``. One timer per response, checked
    when it fires: a read only notes its time (arming a timer for every read, or ``wait_for``'s task around
    it, costs more than the read itself at thousands of chunks a second). A response abandoned half-read
    has its connection closed by the same timer."""

    def __init__(self, conn: _Conn, timeout_s: float):
        self.conn, self.timeout_s, self.fired = conn, timeout_s, False
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self._handle = self.loop.call_at(self.last + timeout_s, self._check)

    def touch(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        if self.loop.time() - self.last >= self.timeout_s:
            self.fired = True
            self.conn.writer.transport.abort()  # the pending read sees the end of the stream
        else:
            self._handle = self.loop.call_at(self.last + self.timeout_s, self._check)

    def cancel(self) -> None:
        self._handle.cancel()

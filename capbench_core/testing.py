"""Fixtures for plugin authors and capbench's own tests.

``ReferenceServer`` is an OpenAI-compatible streaming server whose timing is
set by the caller: time to first token, per-token delay, jitter, tokens per
chunk, failure rate, and whether a usage block is sent. Tokens are emitted on
an absolute schedule (first at TTFT, then one every TPOT), so a correct client
measures exactly the configured values. It is plain asyncio (no web
framework) and runs in its own process, so it never shares a GIL with the
client under test:

    python -m capbench_core.testing --port 8123 --ttft-ms 50 --tpot-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Timing:
    ttft_ms: float = 50.0
    tpot_ms: float = 10.0
    jitter_ms: float = 0.0
    tokens_per_chunk: int = 1
    failure_rate: float = 0.0
    usage: bool = True
    model: str = "reference"
    seed: int = 0
    fault: str = ""  # "no_done" | "malformed" | "exit_after:N" (the process exits mid-stream of request N)


class _Handler:
    def __init__(self, timing: Timing):
        self.t = timing
        self.rng = random.Random(timing.seed)
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self.route(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if path == "/health":
            return await self._send(writer, 200, b"")
        if path == "/v1/models":
            doc = {"object": "list", "data": [{"id": self.t.model, "object": "model", "owned_by": "capbench"}]}
            return await self._send(writer, 200, json.dumps(doc).encode(), "application/json")
        if path in ("/v1/completions", "/v1/chat/completions") and method == "POST":
            return await self.completions(json.loads(body or b"{}"), writer, chat=path.endswith("chat/completions"))
        return await self._send(writer, 404, b'{"error": "not found"}', "application/json")

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str = "text/plain") -> None:
        reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}.get(status, "")
        writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                     f"\r\n".encode() + body)
        await writer.drain()

    async def completions(self, req: dict[str, Any], writer: asyncio.StreamWriter, chat: bool = False) -> None:
        self.requests += 1
        rid = f"cmpl-{self.requests}"
        if self.rng.random() < self.t.failure_rate:
            return await self._send(writer, 500, b'{"error": "injected failure"}', "application/json")
        n = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
        start = time.perf_counter()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        sent = 0
        if self.t.fault == "malformed":
            await self._chunk(writer, b"data: {not json\n\n")
        if self.t.fault.startswith("exit_after:") and self.requests > int(self.t.fault.split(":")[1]):
            os._exit(3)
        while sent < n:
            k = min(self.t.tokens_per_chunk, n - sent)
            due = start + (self.t.ttft_ms + (sent + k - 1) * self.t.tpot_ms) / 1e3
            due += self.rng.uniform(0, self.t.jitter_ms) / 1e3
            await _sleep_until(due)
            sent += k
            finish = "length" if sent == n else None
            text = "".join(f"t{i} " for i in range(sent - k, sent))
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            await self._event(writer, {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                       "model": self.t.model, "choices": [choice]})
        if self.t.usage and (req.get("stream_options") or {}).get("include_usage"):
            prompt = len(str(req.get("prompt") or req.get("messages", "")).split())
            await self._event(writer, {"id": rid, "object": "text_completion", "model": self.t.model, "choices": [],
                                       "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                                 "total_tokens": prompt + n}})
        if self.t.fault != "no_done":
            await self._chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _event(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        await self._chunk(writer, f"data: {json.dumps(obj)}\n\n".encode())

    @staticmethod
    async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()


async def _sleep_until(deadline: float) -> None:
    """asyncio.sleep overshoots by the loop's timer granularity; finish with a short spin."""
    remaining = deadline - time.perf_counter()
    if remaining > 0.002:
        await asyncio.sleep(remaining - 0.0015)
    while time.perf_counter() < deadline:
        await asyncio.sleep(0)


async def _main(host: str, port: int, timing: Timing) -> None:
    handler = _Handler(timing)
    server = await asyncio.start_server(handler.serve, host, port, limit=1 << 20)
    print(f"reference server on http://{host}:{port} {json.dumps(asdict(timing))}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="OpenAI-compatible streaming server with known delays")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    for f in ("ttft_ms", "tpot_ms", "jitter_ms", "failure_rate"):
        p.add_argument("--" + f.replace("_", "-"), type=float, default=getattr(Timing, f))
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--no-usage", action="store_true", help="never send a usage block (like llama.cpp's server)")
    p.add_argument("--model", default="reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault", default="", help="no_done | malformed | exit_after:N")
    a = p.parse_args(argv)
    timing = Timing(a.ttft_ms, a.tpot_ms, a.jitter_ms, a.tokens_per_chunk, a.failure_rate, not a.no_usage,
                    a.model, a.seed, a.fault)
    asyncio.run(_main(a.host, a.port, timing))


def reference_argv(port: int, timing: Timing) -> list[str]:
    argv = [sys.executable, "-m", "capbench_core.testing", "--port", str(port), "--model", timing.model,
            "--ttft-ms", str(timing.ttft_ms), "--tpot-ms", str(timing.tpot_ms), "--jitter-ms", str(timing.jitter_ms),
            "--tokens-per-chunk", str(timing.tokens_per_chunk), "--failure-rate", str(timing.failure_rate),
            "--seed", str(timing.seed), "--fault", timing.fault]
    return argv + ([] if timing.usage else ["--no-usage"])


@contextmanager
def reference_server(timing: Timing, log_dir: Any = None) -> Iterator[str]:
    """Start a ReferenceServer in its own process group; yields its base URL."""
    from pathlib import Path
    from tempfile import mkdtemp

    from capbench_core.launcher import free_port, launch

    port = free_port()
    log = Path(log_dir or mkdtemp(prefix="capbench-ref-")) / f"reference-{port}.log"
    with launch(reference_argv(port, timing), f"http://127.0.0.1:{port}", log, ("/health",), timeout_s=30,
                env={"PYTHONUNBUFFERED": "1"}) as server:
        yield server.base_url


if __name__ == "__main__":
    main()

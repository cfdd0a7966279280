"""A known-delay OpenAI streaming server that keeps its schedule at hundreds of streams, and says when it did not.

It serves the same schedule as capbench_core.testing's ReferenceServer (first token TTFT after the request
arrives, then one every TPOT, on an absolute schedule; `/v1/completions` and `/v1/chat/completions`, a usage
block when asked, `[DONE]`), but is built for load: one kernel timer (timerfd, nanosecond deadlines, no
busy-waiting) drives every stream of a process, each chunk is one pre-built write, and several processes share
the port (SO_REUSEPORT, the kernel spreads connections), scheduled ahead of the clients under test (real-time
where allowed). Each token's text is " the", one token of the tiny MoE's tokenizer, so a client that counts
tokens with the tokenizer counts what the usage block says.

Every chunk's lateness (the time it was written minus the time it was due) is kept in a histogram of
10-microsecond bins, first tokens apart from the rest. Over standard input the process answers ``stats``
with one JSON line (those histograms, the requests it served, its CPU seconds) and starts afresh,
so a benchmark can tell for each run whether the server itself fell behind.

    python benchmarks/known_delay_server.py --port 8123 --ttft-ms 50 --tpot-ms 10 --model NAME
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import heapq
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

LATE_BIN_S = 1e-5
LATE_BINS = 20_000  # 10 µs bins up to 200 ms; the last bin holds everything later
TOKEN_TEXT = " the"


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class KernelTimer:
    """A CLOCK_MONOTONIC timerfd (the clock of time.perf_counter on Linux) armed at absolute deadlines."""

    def __init__(self) -> None:
        if time.get_clock_info("perf_counter").implementation != "clock_gettime(CLOCK_MONOTONIC)":
            raise SystemExit("known_delay_server needs Linux (timerfd on the clock of time.perf_counter)")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK: 1 ns, so the kernel does not batch our wake-ups
        self.fd = self._libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")

    def arm(self, deadline_s: float) -> None:
        ns = max(1, int(deadline_s * 1e9))
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(ns // 1_000_000_000, ns % 1_000_000_000))
        self._libc.timerfd_settime(self.fd, 1, ctypes.byref(spec), None)  # TFD_TIMER_ABSTIME

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass


@dataclass
class Stream:
    transport: asyncio.Transport
    start_s: float
    tokens: int
    token_frame: bytes
    last_frame: bytes
    sent: int = 0


@dataclass
class Stats:
    first_late: list[int] = field(default_factory=lambda: [0] * LATE_BINS)
    token_late: list[int] = field(default_factory=lambda: [0] * LATE_BINS)
    requests: int = 0
    cpu0_s: float = field(default_factory=time.process_time)


def _frame(payload: bytes) -> bytes:
    """One SSE event as one HTTP/1.1 chunk."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


class Schedule:
    """Every stream of this process on one heap of due times, served by one kernel timer."""

    def __init__(self, ttft_s: float, tpot_s: float, model: str):
        self.ttft_s, self.tpot_s, self.model = ttft_s, tpot_s, model
        self.heap: list[tuple[float, int, Stream]] = []
        self.seq = 0
        self.stats = Stats()
        self.timer = KernelTimer()
        self.armed_s = float("inf")
        asyncio.get_running_loop().add_reader(self.timer.fd, self._fire)

    def add(self, transport: asyncio.Transport, req: dict[str, Any], chat: bool) -> None:
        now = time.perf_counter()
        self.seq += 1
        rid = f"cmpl-{os.getpid()}-{self.seq}"
        tokens = max(1, int(req.get("max_tokens") or req.get("max_completion_tokens") or 16))
        kind = "chat.completion.chunk" if chat else "text_completion"
        choice: dict[str, Any] = {"index": 0, "finish_reason": None}
        choice.update({"delta": {"role": "assistant", "content": TOKEN_TEXT}} if chat else {"text": TOKEN_TEXT})
        body = {"id": rid, "object": kind, "created": 0, "model": self.model, "choices": [choice]}
        token_frame = _frame(json.dumps(body).encode())
        choice["finish_reason"] = "length"
        last = _frame(json.dumps(body).encode())
        if (req.get("stream_options") or {}).get("include_usage"):
            prompt = len(str(req.get("prompt") or req.get("messages") or "").split())
            usage = {"id": rid, "object": kind, "created": 0, "model": self.model, "choices": [],
                     "usage": {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}}
            last += _frame(json.dumps(usage).encode())
        last += _frame(b"[DONE]") + b"0\r\n\r\n"
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                        b"transfer-encoding: chunked\r\n\r\n")
        self.stats.requests += 1
        self._push(now + self.ttft_s, Stream(transport, now, tokens, token_frame, last))

    def _push(self, due_s: float, stream: Stream) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (due_s, self.seq, stream))
        if due_s < self.armed_s:
            self.armed_s = due_s
            self.timer.arm(due_s)

    def _fire(self) -> None:
        self.timer.clear()
        heap, stats = self.heap, self.stats
        while heap and heap[0][0] <= time.perf_counter():
            due, _, s = heapq.heappop(heap)
            if s.transport.is_closing():
                continue
            s.sent += 1
            done = s.sent >= s.tokens
            s.transport.write(s.last_frame if done else s.token_frame)
            late = time.perf_counter() - due
            hist = stats.first_late if s.sent == 1 else stats.token_late
            hist[min(LATE_BINS - 1, max(0, int(late / LATE_BIN_S)))] += 1
            if not done:
                self.seq += 1
                heapq.heappush(heap, (s.start_s + self.ttft_s + s.sent * self.tpot_s, self.seq, s))
        self.armed_s = heap[0][0] if heap else float("inf")
        if heap:
            self.timer.arm(self.armed_s)

    def report(self) -> dict[str, Any]:
        """This process's figures since the last report, then a fresh start."""
        s = self.stats
        self.stats = Stats()
        return {"pid": os.getpid(), "requests": s.requests, "cpu_s": time.process_time() - s.cpu0_s,
                "late_bin_s": LATE_BIN_S, "late_bins": LATE_BINS, "first_late": _sparse(s.first_late),
                "token_late": _sparse(s.token_late)}


def _sparse(hist: list[int]) -> dict[str, int]:
    return {str(i): n for i, n in enumerate(hist) if n}


class Connection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; requests on one connection come one after another."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            method, path = (head[0].split(" ") + ["", ""])[:2]
            self.route(method, path.split("?")[0], body)

    def route(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            try:
                req = json.loads(body or b"{}")
            except ValueError:
                return self.send(400, b'{"error": "body is not JSON"}')
            return self.schedule.add(self.transport, req, chat=path.endswith("chat/completions"))
        if path == "/health":
            return self.send(200, b"")
        if path == "/v1/models":
            doc = {"object": "list", "data": [{"id": self.schedule.model, "object": "model", "created": 0,
                                               "owned_by": "capbench"}]}
            return self.send(200, json.dumps(doc).encode())
        return self.send(404, b'{"error": "not found"}')

    def send(self, status: int, body: bytes) -> None:
        assert self.transport is not None
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (status, reason.encode(), len(body), body))


def _ahead_of_clients() -> None:
    """Real-time scheduling where allowed (the server sleeps between chunks, so it never hogs a core; the
    kernel's real-time throttling bounds it anyway), else a higher priority: on a machine whose cores the
    clients under test fill, the server keeps its schedule."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return
    except (PermissionError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except PermissionError:
        pass


async def serve(host: str, port: int, ttft_s: float, tpot_s: float, model: str) -> None:
    _ahead_of_clients()
    schedule = Schedule(ttft_s, tpot_s, model)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(schedule), host, port, reuse_port=True, backlog=4096)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with server:
        while line := await stdin.readline():
            if line.strip() == b"stats":
                print(json.dumps(schedule.report()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ttft-ms", type=float, default=50.0)
    p.add_argument("--tpot-ms", type=float, default=10.0)
    p.add_argument("--model", default="reference")
    a = p.parse_args()
    try:
        asyncio.run(serve(a.host, a.port, a.ttft_ms / 1e3, a.tpot_ms / 1e3, a.model))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

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
    fault: str = ""  # no_done | malformed | exit_after:N (dies mid-stream of request N) | bad_metrics | bad_dump
    flavor: str = ""  # "" (plain OpenAI) | "vllm" | "sglang": that engine's /version or /server_info and /metrics
    experts_per_layer: str = ""  # sglang flavor: distinct experts each layer activates per forward pass, "3,5"
    num_experts: int = 8
    recorder_dir: str = ""  # sglang flavor: where /dump_expert_distribution_record writes its .pt
    capacity: int = 0  # requests served at once (0: unlimited); the rest wait, so TTFT grows past it
    burst: bool = False  # every token of a response in one write after TTFT: faster than any client parses


class _Handler:
    def __init__(self, timing: Timing):
        self.t = timing
        self.rng = random.Random(timing.seed)
        self.requests = 0
        self.engine = EngineStandIn(timing) if timing.flavor else None
        self.slots = asyncio.Semaphore(timing.capacity) if timing.capacity else None

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
        if self.engine is not None and (answer := self.engine.route(method, path)) is not None:
            status, ctype, payload = answer
            return await self._send(writer, status, payload, ctype)
        if path in ("/v1/completions", "/v1/chat/completions") and method == "POST":
            if self.slots is None:
                return await self.completions(json.loads(body or b"{}"), writer, chat=path.endswith("chat/completions"))
            async with self.slots:  # a fixed service rate: capacity / (TTFT + (n - 1) TPOT) requests per second
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
        if self.engine is not None:
            self.engine.started()
        if self.t.fault == "malformed":
            await self._chunk(writer, b"data: {not json\n\n")
        if self.t.fault.startswith("exit_after:") and self.requests > int(self.t.fault.split(":")[1]):
            os._exit(3)
        if self.t.burst:
            await _sleep_until(start + self.t.ttft_ms / 1e3)
            events = "".join(f'data: {{"id":"{rid}","object":"text_completion","choices":[{{"index":0,"text":"t{i} ",'
                             f'"finish_reason":{"null" if i < n - 1 else chr(34) + "length" + chr(34)}}}]}}\n\n'
                             for i in range(n))
            await self._chunk(writer, events.encode())
            sent = n
        while sent < n:
            k = min(self.t.tokens_per_chunk, n - sent)
            due = start + (self.t.ttft_ms + (sent + k - 1) * self.t.tpot_ms) / 1e3
            due += self.rng.uniform(0, self.t.jitter_ms) / 1e3
            await _sleep_until(due)
            sent += k
            if self.engine is not None:
                self.engine.forward_pass()
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
        if self.engine is not None:
            prompt_words = len(str(req.get("prompt") or req.get("messages", "")).split())
            self.engine.finished(prompt_words, n, time.perf_counter() - start)
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


class EngineStandIn:
    """The engine-specific surface of vLLM or SGLang, as their sources document it:
    version/server-info, Prometheus metrics under the engine's own names, and (SGLang) the
    expert-distribution recorder whose dump is a torch file with ``logical_count``."""

    def __init__(self, t: Timing):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.t = t
        self.registry = CollectorRegistry()
        p = t.flavor
        labels = ["model_name", "engine"] if p == "vllm" else ["model_name"]
        lv = [t.model, "0"] if p == "vllm" else [t.model]
        names = {
            "vllm": ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
                     "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                     "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                     "vllm:e2e_request_latency_seconds", "vllm:num_preemptions"),
            "sglang": ("sglang:prompt_tokens", "sglang:generation_tokens", "sglang:num_requests",
                       "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                       "sglang:time_to_first_token_seconds", "sglang:inter_token_latency_seconds",
                       "sglang:e2e_request_latency_seconds", "sglang:num_retracted_requests"),
        }[p]
        r = self.registry
        self.prompt = Counter(names[0], "prompt tokens", labels, registry=r).labels(*lv)
        self.generation = Counter(names[1], "generation tokens", labels, registry=r).labels(*lv)
        self.finished_requests = Counter(names[2], "finished requests", labels, registry=r).labels(*lv)
        self.running = Gauge(names[3], "running", labels, registry=r).labels(*lv)
        Gauge(names[4], "waiting", labels, registry=r).labels(*lv).set(0)
        Gauge(names[5], "kv cache usage", labels, registry=r).labels(*lv).set(0.25)
        self.ttft = Histogram(names[6], "ttft", labels, registry=r).labels(*lv)
        self.itl = Histogram(names[7], "itl", labels, registry=r).labels(*lv)
        self.e2e = Histogram(names[8], "e2e", labels, registry=r).labels(*lv)
        Counter(names[9], "preemptions", labels, registry=r).labels(*lv)
        self.experts = [int(x) for x in t.experts_per_layer.split(",") if x]
        self.recording = False
        self.passes: list[list[list[int]]] = []

    def started(self) -> None:
        self.running.inc()

    def forward_pass(self) -> None:
        if self.recording and self.experts:
            self.passes.append([[1 if e < a else 0 for e in range(self.t.num_experts)] for a in self.experts])

    def finished(self, prompt_tokens: int, output_tokens: int, seconds: float) -> None:
        self.running.dec()
        self.prompt.inc(prompt_tokens)
        self.generation.inc(output_tokens)
        self.finished_requests.inc()
        self.ttft.observe(self.t.ttft_ms / 1e3)
        for _ in range(output_tokens - 1):
            self.itl.observe(self.t.tpot_ms / 1e3)
        self.e2e.observe(seconds)

    def route(self, method: str, path: str) -> tuple[int, str, bytes] | None:
        from prometheus_client import generate_latest

        if path == "/metrics":
            if self.t.fault == "bad_metrics":
                return 200, "text/plain; version=0.0.4", b"vllm:prompt_tokens_total{model_name= oops\n"
            return 200, "text/plain; version=0.0.4", generate_latest(self.registry)
        if self.t.flavor == "vllm" and path == "/version":
            return 200, "application/json", b'{"version": "0.0.0-stand-in"}'
        if self.t.flavor == "sglang" and path in ("/server_info", "/get_server_info"):
            doc = {"version": "0.0.0-stand-in", "model_path": self.t.model,
                   "expert_distribution_recorder_mode": "stat"}
            return 200, "application/json", json.dumps(doc).encode()
        if self.t.flavor == "sglang" and path == "/start_expert_distribution_record":
            self.recording, self.passes = True, []
            return 200, "text/plain", b"Start recording the expert distribution.\n"
        if self.t.flavor == "sglang" and path == "/stop_expert_distribution_record":
            self.recording = False
            return 200, "text/plain", b"Stop recording the expert distribution.\n"
        if self.t.flavor == "sglang" and path == "/dump_expert_distribution_record":
            self._dump()
            return 200, "text/plain", b"Dump expert distribution record.\n"
        return None

    def _dump(self) -> None:
        from pathlib import Path as _Path

        import torch

        directory = _Path(self.t.recorder_dir or ".")
        directory.mkdir(parents=True, exist_ok=True)
        if self.t.fault == "bad_dump":
            (directory / f"expert_distribution_recorder_{time.time()}.pt").write_bytes(b"not a torch file")
            return
        counts = torch.tensor(self.passes or [[[0] * self.t.num_experts] * max(len(self.experts), 1)],
                              dtype=torch.int32)
        torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None},
                   str(directory / f"expert_distribution_recorder_{time.time()}.pt"))


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
    p.add_argument("--flavor", default="", choices=["", "vllm", "sglang"])
    p.add_argument("--experts-per-layer", default="")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--recorder-dir", default="")
    p.add_argument("--capacity", type=int, default=0, help="requests served at once (0: unlimited)")
    p.add_argument("--burst", action="store_true", help="every token of a response in one write after TTFT")
    a = p.parse_args(argv)
    timing = Timing(a.ttft_ms, a.tpot_ms, a.jitter_ms, a.tokens_per_chunk, a.failure_rate, not a.no_usage,
                    a.model, a.seed, a.fault, a.flavor, a.experts_per_layer, a.num_experts, a.recorder_dir,
                    a.capacity, a.burst)
    asyncio.run(_main(a.host, a.port, timing))


def reference_argv(port: int, timing: Timing) -> list[str]:
    argv = [sys.executable, "-m", "capbench_core.testing", "--port", str(port), "--model", timing.model,
            "--ttft-ms", str(timing.ttft_ms), "--tpot-ms", str(timing.tpot_ms), "--jitter-ms", str(timing.jitter_ms),
            "--tokens-per-chunk", str(timing.tokens_per_chunk), "--failure-rate", str(timing.failure_rate),
            "--seed", str(timing.seed), "--fault", timing.fault, "--flavor", timing.flavor,
            "--experts-per-layer", timing.experts_per_layer, "--num-experts", str(timing.num_experts),
            "--recorder-dir", timing.recorder_dir, "--capacity", str(timing.capacity)]
    return argv + ([] if timing.usage else ["--no-usage"]) + (["--burst"] if timing.burst else [])


@contextmanager
def reference_server(timing: Timing, log_dir: Any = None) -> Iterator[str]:
    """Start a ReferenceServer in its own process group; yields its base URL."""
    from pathlib import Path
    from tempfile import mkdtemp

    from capbench_core.serving.launcher import free_port, launch

    port = free_port()
    log = Path(log_dir or mkdtemp(prefix="capbench-ref-")) / f"reference-{port}.log"
    with launch(reference_argv(port, timing), f"http://127.0.0.1:{port}", log, ("/health",), timeout_s=30,
                env={"PYTHONUNBUFFERED": "1"}) as server:
        yield server.base_url


if __name__ == "__main__":
    main()

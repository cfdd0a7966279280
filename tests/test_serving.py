"""The shared serving layer: launcher, OpenAI streaming client, timing truth, faults."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from capbench_core.analytics.metrics import latency_and_throughput, request_timings
from capbench_core.contract.backend import EngineInfo, Request
from capbench_core.contract.records import RequestRecord
from capbench_core.errors import CapbenchError
from capbench_core.measure.loadgen import Arrivals, Phase, run_phase
from capbench_core.serving.launcher import free_port, launch
from capbench_core.serving.openai_client import OpenAISession, check_endpoint
from capbench_core.testing import Timing, reference_server
from tests.conftest import run_cli


def measure(url: str, n: int, concurrency: int, max_tokens: int = 20,
            rate: float | None = None) -> Phase:
    session = OpenAISession(url, "reference", EngineInfo("ref", "0", {}), count_tokens=lambda t: len(t.split()))
    reqs = [Request(id=str(i), prompt="a b c", max_tokens=max_tokens) for i in range(n)]
    phase = Phase()
    asyncio.run(run_phase(session, reqs, Arrivals(concurrency, rate, seed=1), time.perf_counter_ns(), phase, False,
                          lambda rid, text: None))
    return phase


async def _minimal_client(url: str, n: int, concurrency: int, max_tokens: int) -> list[tuple[float, float]]:
    """The least a client can do: a raw socket, one request, the time of each `data:` line. (TTFT, TPOT) in ms."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "reference", "prompt": "a b c", "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    gate = asyncio.Semaphore(concurrency)

    async def one() -> tuple[float, float]:
        async with gate:
            reader, writer = await asyncio.open_connection(host, int(port))
            sent = time.perf_counter_ns()
            writer.write(head + body)
            times = []
            while (line := await reader.readline()) and not line.startswith(b"data: [DONE]"):
                if line.startswith(b'data: {"id"') and b'"text"' in line:
                    times.append(time.perf_counter_ns())
            writer.close()
            return (times[0] - sent) / 1e6, (times[-1] - times[0]) / 1e6 / (len(times) - 1)

    return await asyncio.gather(*(one() for _ in range(n)))


@pytest.mark.parametrize("concurrency", [1, 16])
def test_client_timing_matches_a_minimal_client_on_the_same_server(concurrency: int) -> None:
    """capbench's client against the least a client can do, measured in this test on the same server with
    known delays, so a busy machine slows both alike; benchmarks/bench_client_timing.py measures the
    absolute error. At 16 streams every first token is due at once, so both see queueing."""
    with reference_server(Timing(ttft_ms=40, tpot_ms=8)) as url:
        phase = measure(url, 48, concurrency)
        minimal = asyncio.run(_minimal_client(url, 48, concurrency, 20))
    timings = [request_timings(r) for r in phase.records]
    assert all(r.error_kind is None for r in phase.records)
    ours_ttft, base_ttft = (statistics.median(t.ttft_ms for t in timings),
                            statistics.median(t for t, _ in minimal))
    ours_tpot, base_tpot = (statistics.median(t.tpot_ms for t in timings), statistics.median(p for _, p in minimal))
    assert ours_ttft >= 40 and base_ttft >= 40  # nobody sees a token before the server sends it
    assert ours_ttft - base_ttft < max(5.0, 0.25 * (base_ttft - 40)), (ours_ttft, base_ttft)
    assert abs(ours_tpot - base_tpot) < 0.1 * base_tpot, (ours_tpot, base_tpot)
    assert all(r.token_count_source == "engine" and r.output_tokens == 20 for r in phase.records)


def test_multi_token_chunks_and_missing_usage() -> None:
    with reference_server(Timing(ttft_ms=20, tpot_ms=5, tokens_per_chunk=4, usage=False)) as url:
        phase = measure(url, 6, 2, max_tokens=12)
    rec = phase.records[0]
    assert rec.token_count_source == "tokenizer" and rec.output_tokens == 12
    m = latency_and_throughput(phase.records, phase.window_ns)
    assert m.multi_token_chunks == 0  # the client cannot see tokens per chunk without usage deltas
    t = request_timings(rec)  # three chunks of four tokens: two gaps of four token times (structure, not timing)
    assert t.tpot_ms == pytest.approx(((20 + 11 * 5) - (20 + 3 * 5)) / 11, rel=0.5)
    assert len(t.itl_ms) == 2 and all(10 < g < 40 for g in t.itl_ms)


def test_poisson_arrivals_are_seeded_and_open_loop() -> None:
    with reference_server(Timing(ttft_ms=5, tpot_ms=1)) as url:
        a = measure(url, 30, 64, max_tokens=4, rate=50.0)
        b = measure(url, 30, 64, max_tokens=4, rate=50.0)
    gaps_a = sorted(r.sent_ns for r in a.records)
    gaps_b = sorted(r.sent_ns for r in b.records)
    span_a = (gaps_a[-1] - gaps_a[0]) / 1e9
    assert 0.2 < span_a < 1.5  # 29 gaps of mean 20 ms
    rel = [(x - gaps_a[0]) - (y - gaps_b[0]) for x, y in zip(gaps_a, gaps_b)]
    assert max(abs(d) for d in rel) < 20e6  # same seed -> same schedule (within scheduling noise)


@pytest.mark.parametrize("fault,kind", [("no_done", "IncompleteStream"), ("malformed", "MalformedChunk")])
def test_stream_faults_are_recorded_by_kind(fault: str, kind: str) -> None:
    with reference_server(Timing(ttft_ms=2, tpot_ms=1, fault=fault)) as url:
        phase = measure(url, 4, 2, max_tokens=3)
    assert [r.error_kind for r in phase.records] == [kind] * 4


def test_http_errors_are_counted_and_the_run_goes_on() -> None:
    with reference_server(Timing(ttft_ms=2, tpot_ms=1, failure_rate=0.5, seed=3)) as url:
        phase = measure(url, 40, 4, max_tokens=3)
    m = latency_and_throughput(phase.records, phase.window_ns)
    assert 5 < m.num_failed < 35 and m.error_kinds == {"HTTPError": m.num_failed}
    assert m.num_completed == 40 - m.num_failed


def test_check_endpoint_is_one_clear_error() -> None:
    with pytest.raises(CapbenchError, match="cannot reach http://127.0.0.1:9/v1/models.*Is the server running"):
        check_endpoint("http://127.0.0.1:9")


def test_launcher_quotes_the_log_when_the_engine_dies(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('loading weights'); print('CUDA out of memory'); sys.exit(7)"]
    with pytest.raises(CapbenchError) as err:
        with launch(argv, "http://127.0.0.1:9", tmp_path / "engine.log", timeout_s=20):
            pass
    text = str(err.value)
    assert "exited with code 7 during start-up" in text and "CUDA out of memory" in text and "-c" in text


def test_launcher_times_out_and_kills_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = (f"import signal, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import signal; "
              f"signal.pause()']); open({str(pidfile)!r}, 'w').write(str(p.pid)); signal.pause()")
    with pytest.raises(CapbenchError, match="did not become ready within 3 s"):
        with launch([sys.executable, "-c", script], "http://127.0.0.1:9", tmp_path / "e.log", timeout_s=3):
            pass
    child = int(pidfile.read_text())
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower()


def test_free_port_avoids_a_taken_port() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert all(free_port() != taken for _ in range(20))


def test_openai_backend_measures_a_server_started_by_hand(db_url: str) -> None:
    with reference_server(Timing(ttft_ms=30, tpot_ms=5, model="hand-started")) as url:
        proc = run_cli("run", "--backend", "openai", "--endpoint", url, "--task", "random", "--num-requests", "12",
                       "--warmup", "2", "--concurrency", "4", "--task-option", "output_len=10", "--db", db_url,
                       "--slo", "ttft_ms=100,tpot_ms=10", check=True)
    assert "openai" in proc.stdout
    [row] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert row["status"] == "complete" and row["output_tokens_total"] == 120
    assert 30 <= row["ttft_ms_p50"] < 40 and 4.9 < row["tpot_ms_p50"] < 5.5
    assert row["expert_activation_source"] == "estimated" and row["slo_attainment"] == 1.0
    assert row["goodput_rps"] > 0


def test_endpoint_down_is_one_line_before_the_run(db_url: str) -> None:
    proc = run_cli("run", "--backend", "openai", "--endpoint", f"http://127.0.0.1:{free_port()}", "--db", db_url)
    assert proc.returncode == 3
    assert "cannot reach" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_server_dying_mid_run_fails_the_rest_and_marks_partial(db_url: str) -> None:
    with reference_server(Timing(ttft_ms=2, tpot_ms=1, fault="exit_after:5")) as url:
        run_cli("run", "--backend", "openai", "--endpoint", url, "--task", "random", "--num-requests", "12",
                "--warmup", "0", "--concurrency", "1", "--task-option", "output_len=4", "--db", db_url)
    [row] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert row["status"] == "partial"
    assert row["num_completed"] == 5 and row["num_failed"] == 7


def test_endpoint_without_backend_is_refused(db_url: str) -> None:
    proc = run_cli("run", "--endpoint", "http://127.0.0.1:1", "--db", db_url)
    assert proc.returncode == 1 and "--endpoint needs --backend" in proc.stderr


def test_backend_options_are_routed_and_checked(db_url: str) -> None:
    proc = run_cli("run", "--backend", "torch_moe", "--backend-option", "n_ctx=64", "--db", db_url)
    assert proc.returncode == 1 and "no backend in this run takes option 'n_ctx'" in proc.stderr
    proc = run_cli("run", "--backend", "torch_moe", "--backend-option", "vllm:dtype=x", "--db", db_url)
    assert "names backend 'vllm', which is not in this run" in proc.stderr


def test_rate_levels_are_stored_and_labelled(db_url: str) -> None:
    with reference_server(Timing(ttft_ms=2, tpot_ms=1)) as url:
        proc = run_cli("run", "--backend", "openai", "--endpoint", url, "--task", "random", "--num-requests", "10",
                       "--warmup", "0", "--rate", "20,40", "--task-option", "output_len=4", "--db", db_url,
                       check=True)
    assert "20/s" in proc.stdout and "40/s" in proc.stdout
    rows = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert len(rows) == 2 and all(r["num_completed"] == 10 for r in rows)


def _raw_server(reply: bytes, then_close: bool) -> tuple[Callable[[], Awaitable[asyncio.Server]], list[int]]:
    """A server that answers every request with ``reply`` and then closes the connection or goes silent."""
    port: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        if then_close:
            writer.close()
        else:
            await asyncio.sleep(30)

    async def start() -> asyncio.Server:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        return server

    return start, port


def _one_request(reply: bytes, then_close: bool, timeout_s: float) -> RequestRecord:
    start, port = _raw_server(reply, then_close)

    async def run() -> RequestRecord:
        async with await start():
            session = OpenAISession(f"http://127.0.0.1:{port[0]}", "m", EngineInfo("raw", "0", {}),
                                    count_tokens=lambda t: len(t.split()), timeout_s=timeout_s)
            phase = Phase()
            await run_phase(session, [Request(id="0", prompt="a", max_tokens=4)], Arrivals(1), time.perf_counter_ns(),
                            phase, False, lambda rid, text: None)
            return phase.records[0]

    return asyncio.run(run())


SSE = b'data: {"id":"x","choices":[{"text":" the","finish_reason":null}]}\n\n'


def test_a_silent_server_times_out_and_a_close_delimited_body_ends() -> None:
    """The idle timeout (one timer per response) ends a stream that stops sending; a body without a length that
    ends with the connection (HTTP/1.0 style) is a complete response."""
    began = time.monotonic()
    stalled = _one_request(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + f"{len(SSE):x}\r\n".encode()
                           + SSE + b"\r\n", then_close=False, timeout_s=0.5)
    assert stalled.error_kind == "timeout" and len(stalled.chunk_offsets_ns) == 1
    assert time.monotonic() - began < 10
    closed = _one_request(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + SSE * 2
                          + b"data: [DONE]\n\n", then_close=True, timeout_s=5)
    assert closed.error_kind is None and closed.output_text == " the the"


def test_connections_are_kept_alive_across_requests() -> None:
    """A stream's requests share one keep-alive connection (a new connection per request adds its set-up to every
    TTFT): after 8 requests on 2 streams, this process holds exactly 2 open connections to the server."""
    import psutil

    with reference_server(Timing(ttft_ms=2, tpot_ms=1)) as url:
        session = OpenAISession(url, "reference", EngineInfo("ref", "0", {}), count_tokens=lambda t: len(t.split()))
        port = int(url.rsplit(":", 1)[1])

        async def run() -> int:
            phase = Phase()
            reqs = [Request(id=str(i), prompt="a b c", max_tokens=4) for i in range(8)]
            await run_phase(session, reqs, Arrivals(2), time.perf_counter_ns(), phase, False, lambda rid, text: None)
            assert all(r.error_kind is None for r in phase.records)
            return sum(1 for c in psutil.Process().net_connections("tcp")
                       if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)

        assert asyncio.run(run()) == 2

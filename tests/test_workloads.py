"""Workloads shaped like traffic: trace replay at its timestamps (latency from the scheduled time), the prefix
ceiling of a trace, conversations that carry the model's real replies, and the SLO search."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from capbench_core.contract.backend import EngineInfo, ModelRef, Request, Session, TokenChunk
from capbench_core.measure.loadgen import Arrivals, Phase, run_phase, turn_prompt
from capbench_core.measure.search import probes
from capbench_core.store import Store
from capbench_core.testing import Timing, reference_server
from capbench_tasks.workloads import ChatSessionsTask, TraceTask, block_text, shared_prefixes
from tests.conftest import run_cli

TINY = ModelRef("tiny", Path("."))


def _trace(path: Path, rows: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_prefix_ceiling_of_a_hand_built_trace_is_exact(tmp_path: Path) -> None:
    rows = [{"timestamp": 0, "input_length": 20, "output_length": 2, "hash_ids": [1, 2, 3], "block_tokens": 8},
            {"timestamp": 100, "input_length": 12, "output_length": 2, "hash_ids": [1, 4], "block_tokens": 8},
            {"timestamp": 250, "input_length": 24, "output_length": 2, "hash_ids": [1, 2, 5], "block_tokens": 8},
            {"timestamp": 400, "input_length": 6, "output_length": 2, "hash_ids": [9], "block_tokens": 8}]
    # request 1 shares block 1 (8 tokens) with request 0; request 2 shares blocks 1, 2 (16); 3 shares nothing
    assert shared_prefixes(rows, 8) == [0, 8, 16, 0]
    workload = TraceTask().build(TINY, 10, {"data": str(_trace(tmp_path / "t.jsonl", rows)), "speedup": "2"})
    prompts = [r.prompt for r in workload.requests]
    assert [len(p) for p in prompts] == [20, 12, 24, 6]
    assert prompts[2][:16] == prompts[0][:16] == block_text(1, 8) + block_text(2, 8)
    assert prompts[1][8:] != prompts[0][8:12]
    assert [r.at_s for r in workload.requests] == [0.0, 0.05, 0.125, 0.2]  # ms / 1000 / speedup
    assert [r.shared_prefix_tokens for r in workload.requests] == [0, 8, 16, 0]
    assert workload.params["block_tokens"] == 8


def test_trace_lines_that_do_not_fit_are_one_clear_error(tmp_path: Path) -> None:
    from capbench_core.errors import CapbenchError

    bad = _trace(tmp_path / "bad.jsonl", [{"timestamp": 0, "input_length": 40, "output_length": 2, "hash_ids": [1],
                                           "block_tokens": 8}])
    with pytest.raises(CapbenchError, match="asks for 40 prompt tokens but its 1 hash ids cover only 8"):
        TraceTask().build(TINY, 10, {"data": str(bad)})


def test_a_trace_is_sent_on_schedule_and_a_client_held_back_reports_its_lag(tmp_path: Path, db_url: str) -> None:
    """40 requests, 25 ms apart, against a server answering in ~12 ms: sent within a few ms of their times. With
    one request in flight allowed and a 60 ms server, the schedule cannot be kept: the lag and the TTFT counted
    from the scheduled time show it, the TTFT from the sent time does not."""
    rows = [{"timestamp": 25 * i, "input_length": 8, "output_length": 4, "hash_ids": [i], "block_tokens": 8}
            for i in range(40)]
    data = str(_trace(tmp_path / "even.jsonl", rows))
    common = ["--backend", "openai", "--task", "trace", "--data", data, "--num-requests", "40", "--warmup", "0",
              "--db", db_url]
    with reference_server(Timing(ttft_ms=5, tpot_ms=2)) as url:
        run_cli("run", *common, "--endpoint", url, check=True)
    with reference_server(Timing(ttft_ms=30, tpot_ms=10)) as url:
        run_cli("run", *common, "--endpoint", url, "--concurrency", "1", check=True)
    kept, held = sorted(Store(db_url).runs(), key=lambda r: r.workload.concurrency, reverse=True)
    assert kept.workload.arrival == "trace" and kept.metrics.num_completed == 40
    assert kept.metrics.schedule_lag_ms_p50 is not None and kept.metrics.schedule_lag_ms_p50 < 5
    assert held.metrics.schedule_lag_ms_max is not None and held.metrics.schedule_lag_ms_max > 500  # 40 x 35 ms late
    assert (held.metrics.ttft_from_scheduled_ms_p99 or 0) > 10 * (held.metrics.ttft_ms_p99 or 0)
    assert kept.metrics.prefix_cache_ceiling == 0.0  # no two requests share a block


class EchoSession(Session):
    """A minimal in-test session: records every prompt and answers 'rN' for the N-th request."""

    def __init__(self) -> None:
        self.engine = EngineInfo("echo", "0")
        self.prompts: list[str] = []

    def count_tokens(self, text: str) -> int:
        return len(text)

    async def stream(self, request: Request) -> AsyncIterator[TokenChunk]:
        self.prompts.append(request.prompt)
        await asyncio.sleep(0.001)
        yield TokenChunk(text=f"r{len(self.prompts)}", num_tokens=1, finish_reason="length")


def test_a_conversation_sends_the_whole_history_with_the_real_replies() -> None:
    workload = ChatSessionsTask().build(TINY, 6, {"turns": "3", "message_len": "4"})
    assert [(r.session, r.turn) for r in workload.requests] == [(f"chat-{s}", k) for s in (0, 1) for k in (1, 2, 3)]
    session, phase = EchoSession(), Phase()
    asyncio.run(run_phase(session, workload.requests, Arrivals(1), time.perf_counter_ns(), phase, False,
                          lambda _i, _t: None))
    first = [r.prompt for r in workload.requests[:3]]
    assert session.prompts[0] == turn_prompt("", first[0])
    assert session.prompts[1] == turn_prompt(f"{session.prompts[0]}r1\n", first[1])
    assert session.prompts[2] == turn_prompt(f"{session.prompts[1]}r2\n", first[2])
    records = {r.id: r for r in phase.records}
    assert records["chat-0-t2"].shared_prefix_tokens == len(session.prompts[0]) + 1  # turn 1's prompt + reply
    assert records["chat-0-t1"].turn == 1 and records["chat-0-t1"].shared_prefix_tokens == 0


def test_probes_double_then_bisect() -> None:
    walk = probes(1, True, 0.1, 10)
    tried, capacity = [next(walk)], 5
    try:
        while True:
            tried.append(walk.send(tried[-1] <= capacity))
    except StopIteration as stop:
        assert stop.value == capacity
    assert tried == [1, 2, 4, 8, 6, 5]
    walk = probes(10.0, False, 0.1, 20)
    seen = [next(walk)]
    try:
        while True:
            seen.append(walk.send(seen[-1] <= 33.0))
    except StopIteration as stop:
        assert 33.0 * 0.9 <= stop.value <= 33.0


def test_the_slo_search_finds_a_stand_in_servers_capacity(db_url: str) -> None:
    """A server that serves 4 requests at once (TTFT 20 ms, 8 tokens 5 ms apart: 55 ms each): at 5 and more
    in flight a request waits a whole service time, so a 45 ms TTFT p99 budget holds up to exactly 4; at Poisson
    rates the queue builds towards 4 / 55 ms = 73 requests/s."""
    common = ["--backend", "openai", "--task", "random", "--task-option", "output_len=8", "--num-requests", "40",
              "--warmup", "2", "--slo", "ttft_ms=45", "--db", db_url]
    with reference_server(Timing(ttft_ms=20, tpot_ms=5, capacity=4)) as url:
        run_cli("run", *common, "--endpoint", url, "--search", "max-concurrency", check=True)
        found = [r for r in Store(db_url).runs() if r.search and r.search.winner]
        assert [r.workload.concurrency for r in found] == [4]
        probed = sorted((r.search.step, r.workload.concurrency, r.search.met) for r in Store(db_url).runs()
                        if r.search)
        assert probed[0] == (1, 1, True) and all(met == (c <= 4) for _, c, met in probed)
        said = run_cli("run", *common, "--endpoint", url, "--search", "max-rate", "--rate", "16",
                       "--search-steps", "10", check=True)
    assert "SLO capacity" in said.stderr + said.stdout
    [winner] = [r for r in Store(db_url).runs() if r.search and r.search.winner and r.search.goal == "max-rate"]
    assert winner.workload.rate_rps is not None and 0.4 * 73 <= winner.workload.rate_rps <= 1.1 * 73


def test_search_without_an_slo_is_refused_in_one_line(db_url: str) -> None:
    proc = run_cli("run", "--backend", "torch_moe", "--search", "max-rate", "--db", db_url)
    assert proc.returncode != 0 and "--search needs the SLO it searches for" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compare_pareto_lists_each_backends_frontier(db_url: str) -> None:
    from tests.seed import seeded

    store = Store(db_url)
    runs = seeded()[:4]
    for r in runs:
        store.save(r)
    rows = json.loads(run_cli("compare", "--pareto", "--json", "--db", db_url, check=True).stdout)
    assert rows and {r["backend"] for r in rows} == {r.backend for r in runs}
    for row in rows:
        assert row["tok_per_s_per_user"] == pytest.approx(1000 / row["tpot_ms"])
        assert row["tpot_source"] in ("client p50", "engine mean (bursty stream)")
    table = run_cli("compare", "--pareto", "--db", db_url, check=True).stdout
    assert "Pareto frontier" in table and "tok/s/user" in table

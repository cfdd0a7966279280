"""The load generator over several client processes, and the client's own health on every row (issue 31):
records merge on one clock, arrivals keep their schedule across processes, Ctrl-C ends every worker, and a run
that starves its own client is marked client_limited in the store, the table and the verifier."""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
from pathlib import Path

import psutil
import pytest

from capbench_core.analytics.metrics import request_timings
from capbench_core.contract.backend import EngineInfo, Request
from capbench_core.measure.loadgen import Arrivals, Phase, schedule
from capbench_core.measure.workers import measured_phase, split
from capbench_core.serving.openai_client import OpenAISession
from capbench_core.testing import Timing, reference_server
from tests.conftest import run_cli
from tests.engines import background, stored
from tests.test_serving import _minimal_client


def _requests(n: int, max_tokens: int = 10) -> list[Request]:
    return [Request(id=str(i), prompt="a b c", max_tokens=max_tokens) for i in range(n)]


def _session(url: str) -> OpenAISession:
    return OpenAISession(url, "reference", EngineInfo("ref", "0", {}), count_tokens=lambda t: len(t.split()))


def test_shares_split_streams_requests_and_conversations() -> None:
    reqs = _requests(10)
    shares = split(reqs, Arrivals(5), 2)
    assert [s.streams for s in shares] == [3, 2] and sorted(len(s.requests) for s in shares) == [4, 6]
    assert sorted(r.id for s in shares for r in s.requests) == sorted(r.id for r in reqs)
    poisson = split(reqs, Arrivals(4, rate_rps=20, seed=3), 3)
    due = dict(zip((r.id for r in reqs), schedule(reqs, Arrivals(4, rate_rps=20, seed=3)) or []))
    assert all(due[r.id] == t for s in poisson for r, t in zip(s.requests, s.offsets or []))
    talks = [Request(id=f"{c}-{t}", prompt="hi", max_tokens=2, session=str(c), turn=t) for c in range(3)
             for t in (1, 2)]
    by_proc = [{r.session for r in s.requests} for s in split(talks, Arrivals(2), 2)]
    assert by_proc[0].isdisjoint(by_proc[1]) and set().union(*by_proc) == {"0", "1", "2"}


def test_two_client_processes_time_like_a_minimal_client_and_merge_on_one_clock() -> None:
    """Closed loop over two processes: every request once, TTFT and TPOT as close to the server's as a minimal
    client's measured in the same test; Poisson arrivals over three processes keep the single schedule."""
    timing = Timing(ttft_ms=30, tpot_ms=5)
    with reference_server(timing) as url:
        phase, origin = Phase(), time.perf_counter_ns()
        asyncio.run(measured_phase(_session(url), _requests(24), Arrivals(8), origin, phase,
                                             lambda rid, text: None, procs=2))
        minimal = asyncio.run(_minimal_client(url, 24, 8, 10))
        poisson, arrivals = Phase(), Arrivals(16, rate_rps=60, seed=5)
        asyncio.run(measured_phase(_session(url), _requests(30, 3), arrivals, origin, poisson,
                                   lambda rid, text: None, procs=3))
    assert len(phase.health) == 2 and all(h.lag_ms and h.wall_s > 0 for h in phase.health)
    assert sorted(int(r.id) for r in phase.records) == list(range(24))
    assert all(r.error_kind is None and r.output_tokens == 10 for r in phase.records)
    timings = [request_timings(r) for r in phase.records]
    ttft, tpot = statistics.median(t.ttft_ms for t in timings), statistics.median(t.tpot_ms for t in timings)
    ref_ttft, ref_tpot = (statistics.median(x) for x in zip(*minimal))
    assert ttft >= 30 and ttft - ref_ttft < max(5.0, 0.25 * (ref_ttft - 30)), (ttft, ref_ttft)  # as test_serving
    assert abs(tpot - ref_tpot) < 0.1 * ref_tpot, (tpot, ref_tpot)
    assert all(origin + r.sent_ns >= phase.start_ns for r in phase.records)  # the common start, one clock
    due = sorted(r.scheduled_ns + origin - poisson.start_ns for r in poisson.records if r.scheduled_ns is not None)
    expected = sorted(round(t * 1e9) for t in schedule(_requests(30, 3), arrivals) or [])
    assert len(due) == 30 and due == expected


def test_ctrl_c_ends_every_client_process_and_keeps_what_was_measured(db_url: str) -> None:
    with reference_server(Timing(ttft_ms=5, tpot_ms=50)) as url, \
            background("run", "--backend", "openai", "--endpoint", url, "--task", "random", "--num-requests", "400",
                       "--warmup", "0", "--concurrency", "8", "--client-procs", "2", "--task-option",
                       "output_len=40", "--db", db_url) as run:
        run.wait_for("openai c=8: ", 120)  # a count line: requests have ended
        workers = psutil.Process(run.proc.pid).children(recursive=True)
        assert len(workers) == 2, workers
        run.proc.send_signal(signal.SIGINT)
        assert run.finish(120) == 130, "".join(run.lines)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, alive
    [result] = stored(db_url)
    kinds = {q["error_kind"] for q in result["requests"]}
    assert result["status"] == "partial" and "interrupted" in result["status_reason"]
    assert result["metrics"]["num_completed"] > 0 and "cancelled" in kinds
    assert result["metrics"]["client_procs"] == 2


def test_a_starved_client_is_marked_client_limited(db_url: str, tmp_path: Path) -> None:
    """64 streams of 512-token responses sent whole at once (a server far faster than the client) are beyond what one
    client process parses: the row says so in the store, the
    table and the site; a light row is judged too, and the verifier re-derives the verdict from the lag and CPU."""
    with reference_server(Timing(ttft_ms=1, burst=True)) as url:
        common = ["--backend", "openai", "--endpoint", url, "--task", "random", "--warmup", "0", "--client-procs", "1",
                  "--db", db_url]
        run_cli("run", "--num-requests", "64", "--concurrency", "1", "--task-option", "output_len=16", *common,
                check=True)
        shown = run_cli("run", "--num-requests", "192", "--concurrency", "64", "--task-option", "output_len=512",
                        *common, check=True).stdout
    light, starved = sorted(stored(db_url), key=lambda r: r["workload"]["concurrency"])
    m = starved["metrics"]
    assert m["client_limited"] is True, m
    assert m["client_lag_ms_p99"] >= 10 or m["client_cpu_share"] >= 0.9
    assert "could not keep up" in m["notes"]["client_limited"]
    assert ("--client-procs" if m["client_cpu_share"] >= 0.9 else "waiting for one") in m["notes"]["client_limited"]
    assert "client-limited" in shown
    assert light["metrics"]["client_limited"] in (True, False) and light["metrics"]["client_procs"] == 1
    run_cli("leaderboard", "build", "--db", db_url, "--out", str(tmp_path / "site"), check=True)
    page = next((tmp_path / "site" / "hw").glob("*.html")).read_text()
    marked = 1 + bool(light["metrics"]["client_limited"])
    assert page.count('<abbr class="client-limited" title="the client could not keep up') == marked

    from capbench_core.contract.records import RunResult
    from capbench_core.contract.registry import PluginManager
    from capbench_core.publish import verify

    tasks = dict(PluginManager().collect().tasks.items())
    run = RunResult.model_validate(light)  # within the tiny model's context: a run the verifier accepts
    assert not verify.check(run, tasks)
    run.metrics.client_limited = not run.metrics.client_limited  # a verdict against its own figures
    assert [f for f in verify.check(run, tasks) if f.field == "metrics.client_limited"]
    run.metrics.client_limited, run.metrics.client_lag_ms_p99 = False, None  # a verdict without them
    assert [f for f in verify.check(run, tasks) if f.field == "metrics.client_limited"]


@pytest.mark.parametrize("backend", ["torch_moe"])
def test_an_in_process_engine_is_not_judged(db_url: str, backend: str) -> None:
    """The engine shares capbench's process: the figures are kept, the verdict is None with the reason, and
    --client-procs is declined in one line."""
    proc = run_cli("run", "--backend", backend, "--num-requests", "4", "--warmup", "0", "--concurrency", "2",
                   "--client-procs", "2", "--db", db_url, check=True)
    assert "one client process" in proc.stdout + proc.stderr
    [row] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert row["client_limited"] is None and row["client_procs"] == 1

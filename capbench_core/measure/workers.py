"""The measured phase over one or several client processes, each with its own event loop and connections.

One Python event loop keeps sub-millisecond timing up to some tens of streams; beyond that its own work
(reading chunks, parsing them) delays the timestamps it takes, and the row measures the client
(benchmarks/bench_client_timing.py). ``measured_phase`` then forks ``procs`` client processes and gives each
a share of the phase:

- closed loop: the streams split as evenly as they go, and the requests in proportion to each share's streams;
- Poisson arrivals and traces: every request's due time computed once, here, from the phase's common start;
  requests dealt round robin with their due times, and the in-flight cap split like the streams;
- conversations: whole conversations dealt to the processes, their concurrency split like the streams.

Every process stamps its records with ``time.perf_counter_ns`` (CLOCK_MONOTONIC, one clock for the whole
machine), so their records merge exactly. Records come back over a pipe as each request ends, so progress shows
and an interrupted phase keeps what was measured; Ctrl-C (or a failed worker) ends every worker, whose requests in
flight are recorded as cancelled. Each process probes its own event loop (measure/health.py). Workers are forked:
they inherit the session (its tokenizer, its judge) without pickling; only sessions over HTTP can be split
(an in-process engine lives in capbench's own process).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from capbench_core.contract.backend import Request, Session
from capbench_core.contract.records import RequestRecord
from capbench_core.errors import CapbenchError
from capbench_core.measure.health import LagProbe
from capbench_core.measure.loadgen import Arrivals, Phase, conversations, run_phase, schedule

#: streams one client process keeps with sub-millisecond TTFT error (bench_client_timing: 0.21 ms median at 64)
STREAMS_PER_PROC = 64
#: how long workers get to start, and to hand back what they measured once told to stop
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

T = TypeVar("T")
Judge = Callable[[str, str], "dict[str, bool] | None"]


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop where it is installed: a streamed chunk costs the client about a fifth less
    CPU on it (libuv's loop in C), which is headroom at hundreds of streams."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    if not hasattr(asyncio, "Runner"):  # Python 3.10
        return uvloop.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def die_with_parent() -> None:
    """In a child process: ask Linux to SIGTERM it if capbench itself dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def auto_procs(streams: int, cores: int | None = None) -> int:
    """One client process per STREAMS_PER_PROC streams, at most half the machine's cores (the rest stay with
    the engine and the server's own work)."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, min(math.ceil(streams / STREAMS_PER_PROC), cores // 2))


def client_procs(asked: int | None, streams: int, session: Session) -> tuple[int, str]:
    """How many client processes a phase of ``streams`` streams uses, and a note when it is not what was asked."""
    if session.base_url is None:
        return 1, "" if not asked or asked == 1 else "the engine runs in capbench's own process: one client process"
    procs = asked or auto_procs(streams)
    if procs > streams:
        return streams, f"{procs} client processes asked for {streams} stream(s): {streams} used"
    return procs, ""


@dataclass(frozen=True)
class Share:
    """What one client process runs: its requests, their due times (open loop) and its streams."""

    requests: list[Request]
    offsets: tuple[float, ...] | None
    streams: int


def split(requests: Sequence[Request], arrivals: Arrivals, procs: int) -> list[Share]:
    """The phase cut into ``procs`` shares (module docstring); a process given no request is left out."""
    streams = [arrivals.concurrency // procs + (i < arrivals.concurrency % procs) for i in range(procs)]
    due = schedule(requests, arrivals)
    if due is not None:
        shares = [Share(list(requests[i::procs]), tuple(due[i::procs]), streams[i]) for i in range(procs)]
    elif any(r.session for r in requests):
        talks = conversations(requests)
        shares = [Share([r for talk in talks[i::procs] for r in talk], None, streams[i]) for i in range(procs)]
    else:
        shares = [Share(dealt, None, streams[i]) for i, dealt in enumerate(_by_streams(requests, streams))]
    return [s for s in shares if s.requests]


def _by_streams(requests: Sequence[Request], streams: list[int]) -> list[list[Request]]:
    """Closed loop: each request to the share furthest below its part of the streams."""
    shares: list[list[Request]] = [[] for _ in streams]
    serving = [k for k, n in enumerate(streams) if n]
    for req in requests:
        shares[min(serving, key=lambda k: (len(shares[k]) / streams[k], k))].append(req)
    return shares


async def measured_phase(session: Session, requests: Sequence[Request], arrivals: Arrivals, origin_ns: int,
                         phase: Phase, judge: Judge, on_done: Callable[[RequestRecord], None] | None = None,
                         procs: int = 1) -> None:
    """The measured requests over ``procs`` client processes (1: this one); ``phase.health`` gets the health of
    each, also when the phase is interrupted."""
    if procs <= 1 or session.base_url is None:
        probe = LagProbe()
        try:
            async with probe:
                await run_phase(session, requests, arrivals, origin_ns, phase, False, judge, on_done)
        finally:
            phase.health.append(probe.health)
        return
    await _Gather(phase, on_done).run(session, split(requests, arrivals, procs), arrivals, origin_ns, judge)


class _Worker:
    """One forked client process and the parent's end of its pipe."""

    def __init__(self, context: Any, target: Callable[..., None], args: tuple[Any, ...]):
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()
        child.close()
        self.done = False

    def stop(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGTERM)


class _Gather:
    """The parent's side of a forked phase: start the workers, merge what they send into the phase as it comes,
    stop them all at the end (or on Ctrl-C, or when one fails)."""

    def __init__(self, phase: Phase, on_done: Callable[[RequestRecord], None] | None):
        self.phase, self.on_done = phase, on_done
        self.failures: list[str] = []
        self.workers: list[_Worker] = []

    async def run(self, session: Session, shares: list[Share], arrivals: Arrivals, origin_ns: int,
                  judge: Judge) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forking after the tokenizer's threads ran
        context = multiprocessing.get_context("fork")
        self.workers = [_Worker(context, _child, (session, share, arrivals, origin_ns, judge)) for share in shares]
        loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
        try:
            await asyncio.to_thread(_await_ready, self.workers)
            start_ns = time.perf_counter_ns() + 5_000_000  # each worker waits for this instant to begin
            self.phase.start_ns = self.phase.end_ns = start_ns
            for worker in self.workers:
                worker.conn.send(("go", start_ns))
                loop.add_reader(worker.conn.fileno(), self.readable, worker)
            await self.finished
        finally:
            _stop(loop, self.workers, self.take)
        if self.failures:
            raise CapbenchError(f"a client process failed: {self.failures[0]}")

    def take(self, worker: _Worker, message: tuple[str, Any]) -> None:
        kind, value = message
        if kind == "record":
            record, end_ns = value
            self.phase.records.append(record)
            self.phase.end_ns = max(self.phase.end_ns, end_ns)
            if self.on_done:
                self.on_done(record)
        elif kind == "health":
            self.phase.health.append(value)
        elif kind == "error":
            self.failures.append(value)
        elif kind == "done":
            worker.done = True

    def readable(self, worker: _Worker) -> None:
        try:
            self.take(worker, worker.conn.recv())
        except (EOFError, OSError):
            if not worker.done:
                self.failures.append(f"client process {worker.process.pid} ended without handing back its "
                                     f"records")
            worker.done = True
        if worker.done:
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        if (self.failures or all(w.done for w in self.workers)) and not self.finished.done():
            self.finished.set_result(None)


def _await_ready(workers: list[_Worker]) -> None:
    """Block until every worker says it is ready (its loop and connections set up), or fail."""
    for worker in workers:
        if not worker.conn.poll(START_TIMEOUT_S):
            raise CapbenchError(f"a client process did not start within {START_TIMEOUT_S:g} s")
        kind, value = worker.conn.recv()
        if kind != "ready":
            raise CapbenchError(f"a client process failed to start: {value}")


def _stop(loop: asyncio.AbstractEventLoop, workers: list[_Worker],
          take: Callable[[_Worker, tuple[str, Any]], None]) -> None:
    """Tell every worker still running to stop, keep what each hands back, then end them all."""
    for worker in workers:
        try:
            loop.remove_reader(worker.conn.fileno())
        except (ValueError, OSError):
            pass
        if not worker.done:
            worker.stop()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for worker in workers:
        while not worker.done and worker.conn.poll(max(0.0, deadline - time.monotonic())):
            try:
                take(worker, worker.conn.recv())
            except (EOFError, OSError):
                break
        worker.process.join(max(0.1, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5)
        worker.conn.close()


def _child(conn: Connection, session: Session, share: Share, arrivals: Arrivals, origin_ns: int,
           judge: Judge) -> None:
    """A client process: wait for the common start, run its share, send each record as it ends, then its
    health. SIGINT is the parent's to handle; SIGTERM stops the share (requests in flight are recorded as
    cancelled and sent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)  # the parent's loop's: a signal here must not wake it
    die_with_parent()
    asyncio._set_running_loop(None)  # forked inside the parent's running loop (Python < 3.12 keeps its mark)

    async def main(start_ns: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        phase = Phase()
        mine = Arrivals(max(1, share.streams), None, arrivals.duration_s, arrivals.seed, share.offsets, start_ns)
        probe = LagProbe()
        try:
            await asyncio.sleep(max(0.0, (start_ns - time.perf_counter_ns()) / 1e9))
            async with probe:
                await run_phase(session, share.requests, mine, origin_ns, phase, False, judge,
                                lambda rec: conn.send(("record", (rec, time.perf_counter_ns()))))
        except asyncio.CancelledError:
            pass
        finally:
            conn.send(("health", probe.health))

    conn.send(("ready", None))
    try:
        _, start_ns = conn.recv()
        run_loop(main(start_ns))
    except Exception as exc:  # noqa: BLE001 - a worker's failure is reported to the parent, which fails the phase
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    conn.send(("done", None))
    conn.close()

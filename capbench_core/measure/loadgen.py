"""Closed-loop load generator: N concurrent workers stream requests from a queue.

Every chunk is timestamped on arrival with ``time.perf_counter_ns``. Records are
appended to a caller-owned list as requests end, so an interrupted run keeps
everything it measured; requests still in flight are recorded as ``cancelled``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from capbench_core.contract.backend import Request, Session, Usage
from capbench_core.contract.records import RequestRecord
from capbench_core.measure.health import Health


@dataclass
class Phase:
    """What one phase (warm-up or measured) produced."""

    records: list[RequestRecord] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0
    #: each client process's event loop over the measured phase (measure/workers.py)
    health: list[Health] = field(default_factory=list)

    @property
    def window_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return type(exc).__name__


async def _one(session: Session, req: Request, rec: RequestRecord, origin_ns: int,
               judge: Callable[[str, str], dict[str, bool] | None]) -> None:
    """Stream one request into ``rec`` (which the caller keeps even if this is cancelled)."""
    sent = time.perf_counter_ns()
    rec.sent_ns = sent - origin_ns
    text: list[str] = []
    offsets: list[int] = []
    tokens: list[int] = []
    usage = finish = server_id = None
    try:  # per chunk: a timestamp and a token count, kept in locals (the record is a validated model)
        async for chunk in session.stream(req):
            now = chunk.emitted_ns or time.perf_counter_ns()
            if chunk.num_tokens or chunk.text or chunk.finish_reason:
                # A token-free chunk that ends the generation (a server's EOS chunk) keeps its time: E2E.
                offsets.append(now - sent)
                tokens.append(chunk.num_tokens)
                text.append(chunk.text)
            usage = chunk.usage or usage
            finish = chunk.finish_reason or finish
            server_id = chunk.server_request_id or server_id
    except BaseException as exc:  # failures are data; cancellation is recorded, then re-raised
        rec.error_kind, rec.error = _error_kind(exc), str(exc) or type(exc).__name__
        if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
            raise
    finally:
        rec.chunk_offsets_ns, rec.chunk_tokens = offsets, tokens
        rec.finish_reason, rec.server_request_id = finish, server_id
        rec.output_text = "".join(text)
        _count_tokens(rec, req, session, usage)
        if rec.error_kind is None:
            rec.scores = judge(req.id, rec.output_text) or {}
            rec.correct = next(iter(rec.scores.values())) if rec.scores else None


def _count_tokens(rec: RequestRecord, req: Request, session: Session, usage: Usage | None) -> None:
    """Token counts: the engine's usage block when given, else per-chunk sums (engine-side)."""
    rec.output_tokens = sum(rec.chunk_tokens)
    rec.token_count_source = "engine"
    rec.cached_tokens = usage.cached_tokens if usage is not None else None
    prompt = usage.prompt_tokens if usage else None
    if usage is not None and usage.completion_tokens is not None:
        rec.output_tokens, rec.token_count_source = usage.completion_tokens, usage.source
    elif usage is not None:
        rec.token_count_source = "chunks"
    if prompt is None:
        prompt = len(req.prompt_token_ids) if req.prompt_token_ids else session.count_tokens(req.prompt)
    rec.prompt_tokens = prompt


@dataclass(frozen=True)
class Arrivals:
    """How requests arrive: ``concurrency`` workers back to back (closed loop), or a seeded
    Poisson process of ``rate_rps`` (open loop; ``concurrency`` then caps requests in flight).
    ``duration_s`` stops issuing new requests after that many seconds. A client process running its share
    of a phase (measure/workers.py) is given the share's due times (``offsets``) and the phase's common
    ``start_ns`` instead."""

    concurrency: int
    rate_rps: float | None = None
    duration_s: float | None = None
    seed: int = 0
    offsets: tuple[float, ...] | None = None
    start_ns: int | None = None


def schedule(requests: Sequence[Request], arrivals: Arrivals) -> list[float] | None:
    """When each request is due, in seconds from the phase's start: a trace's own times, or seeded Poisson
    arrivals at ``arrivals.rate_rps`` (or the due times it was given); None for a closed loop (each request goes
    when a stream is free)."""
    if arrivals.offsets is not None:
        return list(arrivals.offsets)
    if requests and requests[0].at_s is not None:
        first = min(r.at_s or 0.0 for r in requests)
        return [(r.at_s or 0.0) - first for r in requests]
    if arrivals.rate_rps:
        rng = random.Random(arrivals.seed)
        return list(itertools.accumulate((rng.expovariate(arrivals.rate_rps) for _ in requests[1:]), initial=0.0))
    return None


async def run_phase(session: Session, requests: Sequence[Request], arrivals: Arrivals, origin_ns: int,
                    phase: Phase, warmup: bool, judge: Callable[[str, str], dict[str, bool] | None],
                    on_done: Callable[[RequestRecord], None] | None = None) -> None:
    """Run ``requests`` under ``arrivals``; fills ``phase`` as requests end. Requests with a send time
    (``at_s``: a trace) are sent at it; requests of a conversation (``session``) are sent turn after turn,
    each with the conversation so far; otherwise closed loop or Poisson as ``arrivals`` says."""
    phase.start_ns = arrivals.start_ns or time.perf_counter_ns()
    deadline = phase.start_ns + int(arrivals.duration_s * 1e9) if arrivals.duration_s else None

    async def one(req: Request, scheduled_ns: int | None = None) -> RequestRecord:
        rec = RequestRecord(id=req.id, warmup=warmup, sent_ns=time.perf_counter_ns() - origin_ns,
                            max_tokens=req.max_tokens,
                            scheduled_ns=None if scheduled_ns is None else scheduled_ns - origin_ns,
                            shared_prefix_tokens=req.shared_prefix_tokens if not warmup else None,
                            session=req.session, turn=req.turn if req.session else None)
        try:
            await _one(session, req, rec, origin_ns, judge)
        finally:
            phase.records.append(rec)
            phase.end_ns = time.perf_counter_ns()
            if on_done:
                on_done(rec)
        return rec

    def open_for_new() -> bool:
        return deadline is None or time.perf_counter_ns() < deadline

    due = schedule(requests, arrivals)
    if due is not None:
        await _open_loop(requests, due, arrivals.concurrency, one, open_for_new, phase.start_ns)
        return
    if any(r.session for r in requests):
        await _conversations(requests, arrivals.concurrency, one, open_for_new)
        return
    pending = list(reversed(requests))

    async def worker() -> None:
        while pending and open_for_new():
            await one(pending.pop())

    await asyncio.gather(*(worker() for _ in range(min(arrivals.concurrency, len(requests)) or 1)))


Send = Callable[[Request, "int | None"], Awaitable[RequestRecord]]


async def _open_loop(requests: Sequence[Request], offsets: Sequence[float], cap: int, one: Send,
                     open_for_new: Callable[[], bool], t0: int) -> None:
    """Send request i at t0 + offsets[i] s, at most ``cap`` in flight; each record keeps the time it was due,
    so a request held back (by the cap or a client that fell behind) shows the lag."""
    limit = asyncio.Semaphore(max(1, cap))
    tasks = []

    async def gated(req: Request, scheduled_ns: int) -> None:
        async with limit:
            await one(req, scheduled_ns)

    try:
        for req, offset in zip(requests, offsets):
            scheduled = t0 + round(offset * 1e9)
            delay = (scheduled - time.perf_counter_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            if not open_for_new():
                break
            tasks.append(asyncio.create_task(gated(req, scheduled)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


def turn_prompt(history: str, message: str) -> str:
    """A turn as sent: the conversation so far (each earlier message and the model's reply, one per line),
    then this message on its own line."""
    return f"{history}{message}\n"


def conversations(requests: Sequence[Request]) -> list[list[Request]]:
    """The requests of each conversation (``session``), turns in order, conversations in order of first turn."""
    talks: dict[str, list[Request]] = {}
    for req in requests:
        talks.setdefault(str(req.session), []).append(req)
    return list(talks.values())


async def _conversations(requests: Sequence[Request], concurrency: int, one: Send,
                         open_for_new: Callable[[], bool]) -> None:
    """``concurrency`` conversations at once; each sends its turns in order, turn k+1 carrying turns 1..k
    with the model's real replies, so its prompt starts with the whole of turn k's prompt and reply."""
    talks = conversations(requests)
    pending = list(reversed(talks))

    async def talker() -> None:
        while pending and open_for_new():
            history, shared = "", 0
            for req in pending.pop():
                sent = dataclasses.replace(req, prompt=turn_prompt(history, req.prompt), shared_prefix_tokens=shared)
                rec = await one(sent, None)
                if rec.error_kind is not None:
                    break
                history = f"{sent.prompt}{rec.output_text or ''}\n"
                shared = (rec.prompt_tokens or 0) + (rec.output_tokens or 0)

    await asyncio.gather(*(talker() for _ in range(min(concurrency, len(talks)) or 1)))

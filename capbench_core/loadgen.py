"""Closed-loop load generator: N concurrent workers stream requests from a queue.

Every chunk is timestamped on arrival with ``time.perf_counter_ns``. Records are
appended to a caller-owned list as requests end, so an interrupted run keeps
everything it measured; requests still in flight are recorded as ``cancelled``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from capbench_core.backend import Request, Session
from capbench_core.results import RequestRecord


@dataclass
class Phase:
    """What one phase (warm-up or measured) produced."""

    records: list[RequestRecord] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0

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
               judge: Callable[[str, str], bool | None]) -> None:
    """Stream one request into ``rec`` (which the caller keeps even if this is cancelled)."""
    sent = time.perf_counter_ns()
    rec.sent_ns = sent - origin_ns
    text: list[str] = []
    try:
        async for chunk in session.stream(req):
            now = time.perf_counter_ns()
            rec.chunk_offsets_ns.append(now - sent)
            rec.chunk_tokens.append(chunk.num_tokens)
            text.append(chunk.text)
            if chunk.finish_reason:
                rec.finish_reason = chunk.finish_reason
    except BaseException as exc:  # failures are data; cancellation is recorded, then re-raised
        rec.error_kind, rec.error = _error_kind(exc), str(exc) or type(exc).__name__
        if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
            raise
    finally:
        rec.output_text = "".join(text)
        rec.output_tokens = sum(rec.chunk_tokens)
        rec.prompt_tokens = len(req.prompt_token_ids) if req.prompt_token_ids else session.count_tokens(req.prompt)
        rec.token_count_source = "engine"
        if rec.error_kind is None:
            rec.correct = judge(req.id, rec.output_text)


async def run_phase(session: Session, requests: Sequence[Request], concurrency: int, origin_ns: int,
                    phase: Phase, warmup: bool, judge: Callable[[str, str], bool | None],
                    on_done: Callable[[RequestRecord], None] | None = None) -> None:
    """Run ``requests`` with ``concurrency`` workers; fills ``phase`` as requests end."""
    pending: asyncio.Queue[Request] = asyncio.Queue()
    for r in requests:
        pending.put_nowait(r)
    phase.start_ns = time.perf_counter_ns()

    async def worker() -> None:
        while not pending.empty():
            req = pending.get_nowait()
            rec = RequestRecord(id=req.id, warmup=warmup, sent_ns=time.perf_counter_ns() - origin_ns)
            try:
                await _one(session, req, rec, origin_ns, judge)
            finally:
                phase.records.append(rec)
                phase.end_ns = time.perf_counter_ns()
                if on_done:
                    on_done(rec)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)) or 1)))

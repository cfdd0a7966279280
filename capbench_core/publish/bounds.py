"""Consistency of a run with itself, before any figure is recomputed: its dates, status, requests in flight,
token counts, decode steps and memory against the labels it carries and the model it names.

A forger who edits records and recomputes every aggregate keeps the figures consistent with the records; these
rules catch records that contradict the run's own labels (its concurrency, its model's context, its decode
steps, its clock). Each yields ``Finding``s; margins are named constants, documented in docs/leaderboard.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from capbench_core.analytics.model_spec import ModelSpec
from capbench_core.contract.records import RunResult
from capbench_core.publish.findings import Finding

#: How far a run's clock may be ahead of the verifier's.
CLOCK_SKEW = timedelta(minutes=10)
#: The measured window sits inside the run; its clock (perf_counter) and the dates' (wall) differ a little.
WINDOW_SLACK_S = 0.05
#: Measured decode steps may miss tokens at the window's edges; per request one, and this share beyond.
STEP_TOKEN_MARGIN = 0.05
#: Memory peaks (PSS, device) above the memory the hardware declares.
MEMORY_MARGIN = 0.05


#: client-seen steps place each gap by the requests decoding at its midpoint: a little slack
STEP_MARGIN = 0.1


def consistency(r: RunResult, spec: ModelSpec | None, now: datetime | None = None) -> Iterator[Finding]:
    """Every rule of this module, in order."""
    yield from _dates(r, now or datetime.now(timezone.utc))
    yield from _status(r)
    yield from _in_flight(r)
    yield from _tokens(r, _context(r.model.config))
    yield from _decode_steps(r, spec)
    yield from _decoded_tokens(r)
    yield from _memory(r)


def utc(moment: datetime) -> datetime:
    """A date as UTC (one without a zone is taken as UTC)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _dates(r: RunResult, now: datetime) -> Iterator[Finding]:
    """No date in the future; the run ends after it starts; the measured window fits inside it."""
    started = utc(r.started_at)
    for name, moment in (("started_at", started), ("finished_at", r.finished_at)):
        if moment is not None and utc(moment) > now + CLOCK_SKEW:
            yield Finding(name, utc(moment).isoformat(), f"<= {now.isoformat()}", "a date in the future")
    if r.finished_at is None:
        return
    span = (utc(r.finished_at) - started).total_seconds()
    if span < 0:
        yield Finding("finished_at", r.finished_at.isoformat(), f">= {started.isoformat()}",
                      "the run ends before it starts")
    elif r.metrics.duration_s is not None and r.metrics.duration_s > span + WINDOW_SLACK_S:
        yield Finding("metrics.duration_s", r.metrics.duration_s, f"<= {span:.6g}",
                      "the measured window is longer than the run (started_at to finished_at)")


def _status(r: RunResult) -> Iterator[Finding]:
    """A complete run sent every request of its workload (unless a duration cut it short), none failed."""
    if r.status != "complete":
        return
    measured = sum(1 for q in r.requests if not q.warmup)
    warm = len(r.requests) - measured
    if r.metrics.num_failed:
        yield Finding("status", r.status, "partial", f"{r.metrics.num_failed} request(s) failed")
    if warm != r.workload.warmup_requests:
        yield Finding("workload.warmup_requests", r.workload.warmup_requests, warm,
                      "a complete run's warm-up records")
    if r.workload.duration_s is None and measured != r.workload.num_requests:
        yield Finding("workload.num_requests", r.workload.num_requests, measured,
                      "a complete run without a duration limit sent every request of its workload")


def in_flight(r: RunResult) -> int:
    """The most requests in flight at once in the records: each from its send to its last chunk (a lower
    bound: a request is in flight a little longer)."""
    events = []
    for q in r.requests:
        events.append((q.sent_ns, 1))
        events.append((q.sent_ns + (q.chunk_offsets_ns[-1] if q.chunk_offsets_ns else 0), -1))
    peak = current = 0
    for _, delta in sorted(events):
        current += delta
        peak = max(peak, current)
    return peak


def _in_flight(r: RunResult) -> Iterator[Finding]:
    peak = in_flight(r)
    if peak > r.workload.concurrency:
        yield Finding("workload.concurrency", r.workload.concurrency, f">= {peak}",
                      f"{peak} requests were in flight at once in the run's own records")


def _context(config: dict[str, Any] | None) -> int | None:
    """The model's context limit from its config, where it states one."""
    if not config:
        return None
    for source in (config, config.get("text_config") or {}):
        value = source.get("max_position_embeddings") if isinstance(source, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _tokens(r: RunResult, context: int | None) -> Iterator[Finding]:
    """Per request: output within its max_tokens, prompt + output within the model's context. (A server may
    pack several tokens into one streamed chunk, so chunks do not bound the engine's own count.)"""
    for i, q in enumerate(r.requests):
        out, prompt = q.output_tokens or 0, q.prompt_tokens or 0
        if q.max_tokens is not None and out > q.max_tokens:
            yield Finding(f"requests.{i}.output_tokens", out, f"<= {q.max_tokens}", "more tokens than max_tokens")
        if context is not None and prompt + out > context:
            yield Finding(f"requests.{i}.prompt_tokens", prompt, f"<= {context - out}",
                          f"prompt and output tokens beyond the model's context ({context})")


def _step_lists(steps: Any) -> dict[str, int]:
    return {name: len(getattr(steps, name)) for name in ("batch_size", "step_ns", "context_tokens",
                                                         "distinct_experts")}


def _decode_steps(r: RunResult, spec: ModelSpec | None) -> Iterator[Finding]:
    """One entry per step in each list; every step batches at least one and at most the run's concurrency of
    sequences, takes time, and activates no more experts per layer than the model has or its batch can."""
    steps = r.decode_steps
    if steps is None:
        return
    lengths = _step_lists(steps)
    if len(set(lengths.values())) > 1:
        yield Finding("decode_steps", lengths, "equal lengths", "one entry per decode step in each list")
        return
    if steps.batch_size and (min(steps.batch_size) < 1 or max(steps.batch_size) > r.workload.concurrency):
        yield Finding("decode_steps.batch_size", [min(steps.batch_size), max(steps.batch_size)],
                      f"1..{r.workload.concurrency}", "a step batches at least one sequence and at most the "
                                                      "run's concurrency")
    if steps.step_ns and min(steps.step_ns) <= 0:
        yield Finding("decode_steps.step_ns", min(steps.step_ns), "> 0", "a decode step takes time")
    window = r.metrics.duration_s
    # each step's time shared by the sequences it decoded: engine-timed steps (one per batch) sum to at most the
    # window; steps seen from the client (a gap per request, B decoding at once) overlap B-fold
    batches = steps.batch_size or [1] * len(steps.step_ns)
    busy = sum(t / max(1, b) for t, b in zip(steps.step_ns, batches)) / 1e9
    if steps.source == "measured" and window and busy > window * (1 + STEP_MARGIN):
        yield Finding("decode_steps.step_ns", busy, f"<= {window * (1 + STEP_MARGIN):.6g}",
                      "measured decode steps (each over its batch) longer in total than the window they were "
                      "measured in")
    if spec is not None and spec.is_moe:
        yield from _experts(steps, spec)


def _experts(steps: Any, spec: ModelSpec) -> Iterator[Finding]:
    """Per step and layer at most E experts; over the steps, no more than top_k per sequence decoded on average
    (a recorder's mean A is spread over steps whose batch the client estimated, so a single step may say more
    than its own batch allows)."""
    for i, row in enumerate(steps.distinct_experts):
        if len(row) != spec.moe_layers or any(a < 0 or a > spec.num_experts + 1e-9 for a in row):
            yield Finding(f"decode_steps.distinct_experts.{i}", row[:8], f"{spec.moe_layers} values in "
                          f"0..{spec.num_experts}", "per MoE layer, no more experts than the model has")
            return
    if steps.distinct_experts and steps.batch_size:
        ceiling = spec.top_k * sum(steps.batch_size) / len(steps.batch_size)
        for layer in range(spec.moe_layers):
            mean = sum(row[layer] for row in steps.distinct_experts) / len(steps.distinct_experts)
            if mean > ceiling + 1e-9:
                yield Finding(f"decode_steps.distinct_experts[*].{layer}", mean, f"<= {ceiling:.6g}",
                              "on average no more experts per step than its sequences can route to (top_k each)")
                return


def _decoded_tokens(r: RunResult) -> Iterator[Finding]:
    """Measured decode steps decode one token per sequence each: the output tokens after the first (which
    prefill makes) cannot outnumber them."""
    steps = r.decode_steps
    if steps is None or steps.source != "measured":
        return
    done = [q for q in r.requests if not q.warmup and q.error_kind is None]
    decoded = sum(max((q.output_tokens or 0) - 1, 0) for q in done)
    ceiling = sum(steps.batch_size) * (1 + STEP_TOKEN_MARGIN) + len(done)
    if decoded > ceiling:
        yield Finding("metrics.output_tokens_total", r.metrics.output_tokens_total, f"<= {ceiling:.0f} + first tokens",
                      f"the measured decode steps decoded {sum(steps.batch_size)} tokens")


def _memory(r: RunResult) -> Iterator[Finding]:
    """Memory peaks within the memory the hardware declares."""
    m, hw = r.metrics, r.hardware
    host_gb = hw.host_memory_bytes / 1e9
    if m.mem_peak_gb is not None and m.mem_peak_gb > host_gb * (1 + MEMORY_MARGIN):
        yield Finding("metrics.mem_peak_gb", m.mem_peak_gb, f"<= {host_gb:.6g}", "more than the host's memory")
    device = [d.memory_bytes * d.count for d in hw.devices if d.kind != "cpu" and d.memory_bytes]
    if m.device_mem_peak_gb is not None and device and m.device_mem_peak_gb > sum(device) / 1e9 * (1 + MEMORY_MARGIN):
        yield Finding("metrics.device_mem_peak_gb", m.device_mem_peak_gb, f"<= {sum(device) / 1e9:.6g}",
                      "more than the accelerators' memory")

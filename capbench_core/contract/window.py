"""What an engine says about the measured window: its own counters (a typed record) and, where it can,
the experts it routed to. Sessions return a :class:`WindowReport` from ``end_window``."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict


class EngineMetrics(BaseModel):
    """The engine's own /metrics over the window: counter deltas, gauges at the end, histogram means.
    A field the engine's table does not give stays unset (and is not stored)."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    preemptions: float | None = None
    requests_finished: float | None = None
    decode_calls: float | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage: float | None = None
    server_ttft_ms_mean: float | None = None
    server_tpot_ms_mean: float | None = None
    server_e2e_ms_mean: float | None = None
    server_prompt_ms_per_token: float | None = None
    decode_batch_mean: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None

    def __getitem__(self, key: str) -> float | None:
        """``metrics["prompt_tokens"]``: the mapping view older code and plugins read."""
        if key not in type(self).model_fields:
            raise KeyError(key)
        value: float | None = getattr(self, key)
        return value

    def record(self) -> dict[str, float | None]:
        """The fields the engine's table named (set, even if None), as stored with the result."""
        return self.model_dump(exclude_unset=True)


@dataclass
class WindowReport:
    """What the engine reported over the measured window."""

    engine_metrics: EngineMetrics = field(default_factory=EngineMetrics)
    notes: dict[str, str] = field(default_factory=dict)
    experts_per_layer: list[float] | None = None
    expert_method: str = ""
    #: per MoE layer, the decode tokens each expert took over the window (None: the engine cannot tell)
    expert_tokens: list[list[int]] | None = None


@dataclass(frozen=True)
class ExpertCounts:
    """Distinct experts per MoE layer, averaged over the forward passes that count, and how."""

    per_layer: list[float]
    method: str
    #: per MoE layer, the tokens each expert took over the counted passes, where the engine says
    expert_tokens: list[list[int]] | None = None

"""The contract between the runner and a serving backend.

A backend plugin subclasses :class:`Backend`; ``start`` yields a
:class:`Session` (also a subclass) that streams tokens for one request at a time (many requests
may stream concurrently) and, where the engine allows, reports the experts it
really activated.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from capbench_core.contract.options import BackendOptions, options_from_help
from capbench_core.contract.options import validate as validate_options
from capbench_core.contract.records import EngineInfo, HardwareSpec, Placement, RequestRecord
from capbench_core.contract.window import ExpertCounts, WindowReport
from capbench_core.errors import CapbenchError

__all__ = ["UNKNOWN_SHAPE", "Availability", "Backend", "BackendOptions", "DecodeSource", "DecodeStep", "DecodeWindow",
           "EngineInfo", "ExpertActivation", "LoadShape", "ModelRef", "ModelShape", "OPTIONAL_CAPABILITIES",
           "Request", "SamplingParams", "Session", "TokenChunk", "Usage", "check_options", "drain"]


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; ``reason`` is one sentence when it cannot."""

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> Availability:
        return cls(True, "")

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(False, reason)


@dataclass(frozen=True)
class ModelRef:
    """A model a backend can load: a Hugging Face directory (config.json + weights)."""

    name: str
    path: Path
    description: str = ""
    default_task: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Identical for every backend in one comparison, and stored with the result."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Request:
    """One generation request. ``ignore_eos`` forces exactly ``max_tokens`` tokens. ``chat``: ``prompt`` is a
    user message, sent through the model's chat template (a server's /v1/chat/completions, or the template
    rendered in-process: ``analytics.checkpoint.ChatTemplate``)."""

    id: str
    prompt: str
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False
    prompt_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()
    chat: bool = False
    #: trace replay: when to send it, seconds after the trace's first measured request (None: the arrival
    #: process decides)
    at_s: float | None = None
    #: prompt tokens it shares with an earlier request of the workload (the prefix cache's ceiling; None: the
    #: task does not say)
    shared_prefix_tokens: int | None = None
    #: multi-turn: the conversation it belongs to; ``prompt`` is then this turn's user message, and the load
    #: generator sends the conversation so far (earlier turns with the model's real replies) before it
    session: str | None = None
    turn: int = 0


@dataclass(frozen=True)
class LoadShape:
    """What the run will ask of an engine it starts, so a server can size its batch and KV cache.

    ``max_concurrency`` is the most requests in flight at any load level of the run;
    ``max_context_tokens`` bounds prompt + output tokens of any request (UTF-8 bytes of
    the prompt as sent + max_tokens: no tokenizer makes more tokens than bytes), None when
    unknown.
    """

    max_concurrency: int = 1
    max_context_tokens: int | None = None
    #: tokens a sequence may need beyond the bound (a BOS token, an end-of-turn marker), then rounded up
    HEADROOM = 16

    def context_for(self, model_max: int | None) -> int | None:
        """Context to size per sequence: the run's bound with a little headroom (a multiple of 16), never beyond
        the model's own limit."""
        run = None
        if self.max_context_tokens:
            run = -(-(self.max_context_tokens + self.HEADROOM) // 16) * 16
        bounds = [b for b in (run, model_max) if b]
        return min(bounds) if bounds else None


UNKNOWN_SHAPE = LoadShape()


@dataclass(frozen=True)
class Usage:
    """Token counts of a whole request: from the engine, or counted with the model's tokenizer."""

    prompt_tokens: int | None
    completion_tokens: int | None
    source: Literal["engine", "tokenizer"]
    #: prompt tokens the engine served from its prefix cache (``usage.prompt_tokens_details.cached_tokens``)
    cached_tokens: int | None = None


@dataclass(frozen=True)
class TokenChunk:
    """One streamed piece of output carrying ``num_tokens`` new tokens.

    A stream may end with a chunk that carries ``usage`` (and no text): its
    counts replace the per-chunk sums. In-process engines set ``emitted_ns``
    (``time.perf_counter_ns()`` when the engine produced the chunk): with no
    network between engine and client, that is the client's clock, free of
    the delay the GIL adds before the event loop sees the chunk.
    """

    text: str
    num_tokens: int
    finish_reason: str | None = None
    usage: Usage | None = None
    server_request_id: str | None = None
    emitted_ns: int | None = None


@dataclass
class DecodeStep:
    """One engine decode step as the engine itself timed it."""

    batch_size: int
    step_ns: int
    context_tokens: int
    distinct_experts: list[float]
    started_ns: int = 0
    #: per MoE layer, the tokens each routed expert took in this step (empty where the engine cannot tell);
    #: shared experts take every token and are not listed
    expert_tokens: list[list[int]] = field(default_factory=list)


@dataclass
class ExpertActivation:
    """Distinct activated experts per layer per decode step (the A in S-MBU).

    ``source`` says where the numbers came from: ``measured`` (router
    instrumentation or an engine recorder) or ``estimated`` (uniform routing).
    """

    source: Literal["measured", "estimated"]
    method: str
    steps: list[DecodeStep] = field(default_factory=list)


class ModelShape(Protocol):
    """What a decode-step source needs to know of the served model (``analytics.model_spec.ModelSpec`` is one)."""

    num_experts: int
    top_k: int
    moe_layers: int

    @property
    def is_moe(self) -> bool: ...


@dataclass(frozen=True)
class DecodeWindow:
    """The measured window as a session sees it after the fact: its requests' raw records, its bounds on the
    client's clock (perf_counter_ns), the engine's own report of it, and the served model's routing shape."""

    records: Sequence[RequestRecord]
    start_ns: int
    end_ns: int
    report: WindowReport | None
    model: ModelShape
    #: per MoE layer, each expert's share of tokens measured by another row of the same model and workload
    #: (the estimate of A then follows it instead of uniform routing), and which row measured it
    routing_shares: list[list[float]] | None = None
    routing_from: str | None = None


@dataclass(frozen=True)
class DecodeSource:
    """The decode steps S-MBU/S-MFU are computed from, and where they came from."""

    steps: list[DecodeStep]
    source: Literal["measured", "estimated"]
    method: str


def check_options(backend: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """One error for every backend: the options it was given but does not take, and those it does.
    (Backends with a typed ``Options`` class get this from its validation.)"""
    names = list(known)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise CapbenchError(f"{backend} does not know option(s) {', '.join(unknown)}; known: {', '.join(names)}")


async def drain(inbox: asyncio.Queue[TokenChunk | BaseException | None]) -> AsyncIterator[TokenChunk]:
    """Yield the chunks an engine thread puts into ``inbox`` until None; re-raise its exceptions.

    The bridge every in-process engine uses between its own thread and the client's event loop.
    """
    while True:
        item = await inbox.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


class Session:
    """Base class of every session: one loaded or launched engine, streaming requests.

    Subclasses must set ``engine`` and implement ``stream`` and ``count_tokens``.
    Every other member is an optional capability with a default that means "this
    engine does not offer it"; override the ones your engine has. docs/plugins.md
    lists them all (a test keeps that list and this class in step).
    """

    engine: EngineInfo
    #: The engine decodes one request at a time (the runner derives batch-1 decode steps).
    serial_decode: bool = False
    #: An OpenAI-compatible endpoint serving the model, and the model's name there (lm-eval scores it).
    base_url: str | None = None
    served_model: str | None = None
    #: Tokens the engine's KV cache holds, as the engine itself sized or reports it (None: it does not say).
    kv_capacity_tokens: int | None = None

    def engine_process(self) -> tuple[int, str] | None:
        """(pid, what it is) of the process that holds the engine, whose process tree capbench samples for the
        row's memory; None when the engine is not capbench's to measure (an attached server). The default is
        capbench's own process: an in-process engine lives in it."""
        import os

        return os.getpid(), "capbench's own process (the engine runs in it)"

    def stream(self, request: Request) -> AsyncIterator[TokenChunk]:
        """Stream the completion of ``request``; the runner timestamps every chunk."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` under the served model's tokenizer."""
        raise NotImplementedError

    def expert_activation(self, since_ns: int = 0) -> ExpertActivation | None:
        """Decode steps started at or after ``since_ns`` (perf_counter_ns), or None when the engine cannot say."""
        return None

    def decode_steps(self, window: DecodeWindow) -> DecodeSource | None:
        """The decode steps of the measured window as this engine knows them, or None to let capbench derive
        them from the client's view (and a recorder's measured A, if the window report has one).

        The default returns what ``expert_activation`` measured inside the window. An engine whose stream
        reaches the client in bursts overrides it to time steps with its own counters (llama-server, vLLM).
        """
        activation = self.expert_activation(window.start_ns)
        if activation is None:
            return None
        steps = [s for s in activation.steps if s.started_ns <= window.end_ns]
        return DecodeSource(steps, activation.source, activation.method)

    def failure_cause(self) -> str | None:
        """Why requests are failing, in the engine's own words, when it knows (a launched engine that exited:
        its exit code or signal and its last error line); None otherwise. The runner adds it to a row whose
        requests failed."""
        return None

    def begin_window(self) -> None:
        """Called (on a worker thread) just before the measured requests: e.g. scrape the engine's metrics."""

    def end_window(self) -> WindowReport | None:
        """Called just after them: the engine's own view of the window, or None."""
        return None

    async def expert_pass(self, requests: Sequence[Request], concurrency: int) -> ExpertCounts | None:
        """After the window, when the window gave no measured A: send the same requests again (not timed)
        and return the distinct experts per layer the engine reports routing them to, or None."""
        return None

    def reset_prefix_cache(self) -> tuple[bool | None, str]:
        """Empty the engine's prefix cache before a load level, so one level's prompts do not warm the next:
        (True: emptied, False: it has a cache that could not be emptied, None: it has none) and how."""
        return None, "no prefix cache"


class Backend:
    """Base class of every serving backend.

    Subclasses set ``name`` and implement ``available`` and ``start``. The other
    members are optional capabilities with defaults; docs/plugins.md lists them.
    """

    name: str = ""
    description: str = ""
    #: Whose peaks S-MBU/S-MFU divide by: the host CPU's ("cpu") or the accelerator's.
    device: Literal["cpu", "accelerator"] = "accelerator"
    #: The options it takes, typed: a subclass of :class:`~capbench_core.contract.options.BackendOptions`
    #: with one field per option (type, default, help). Anything else is an error naming these.
    Options: type[BackendOptions] = BackendOptions
    #: Older, untyped form (name -> one-line help), still read when ``Options`` is not overridden.
    options: Mapping[str, str] = {}
    #: The engine decodes one request at a time (a study gives it batch 1 only; its sessions say the same).
    serial_decode: bool = False
    #: The backend only attaches to a running server (never chosen by default, needs --endpoint).
    needs_endpoint: bool = False
    #: Name of the engine environment it launches from (`capbench engines install NAME`), if any.
    engine_env: str | None = None

    def available(self) -> Availability:
        """Cheap check: imports and devices, never a model load."""
        raise NotImplementedError

    def available_for(self, options: Mapping[str, Any]) -> Availability:
        """Availability for these options (attaching to an endpoint may need nothing installed here)."""
        return self.available()

    def option_model(self) -> type[BackendOptions]:
        """The typed options: ``Options``, or one built from the older ``options`` help dict."""
        if self.Options is BackendOptions and self.options:
            return options_from_help(self.options)
        return self.Options

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` checked and converted by the backend's Options, defaults filled in; one error naming
        every bad option. capbench calls it before any engine starts; ``start`` may call it again."""
        return validate_options(self.name, self.option_model(), options)

    def device_for(self, options: Mapping[str, Any]) -> Literal["cpu", "accelerator"]:
        """Where a run with these options computes (whose peaks S-MBU/S-MFU divide by, whose memory must fit
        the model); the class's ``device`` unless an option moves the engine."""
        return self.device

    def placement(self, options: Mapping[str, Any]) -> Placement:
        """Where a run with these (validated) options keeps its weights and how it spreads them. The default:
        everything on the device it computes on, no parallelism."""
        if self.device_for(options) == "cpu":
            return Placement.uniform("host", f"{self.name} computes on the host CPU")
        return Placement.uniform("device", f"{self.name} computes on the accelerator")

    def devices_used(self, options: Mapping[str, Any]) -> int | None:
        """How many accelerators a run with these options uses (tensor x pipeline x data parallel), so S-MBU and
        S-MFU divide by their peaks and not every visible device's; None: all of them."""
        return None

    def planned_dtype(self, model: ModelRef, options: Mapping[str, Any]) -> str | None:
        """The weight dtype the engine will hold with these (validated) options, before it starts, for the memory
        check; None: the checkpoint's own."""
        dtype = options.get("dtype")
        return str(dtype) if dtype and dtype != "auto" else None

    def dtype_options(self, dtype: str) -> dict[str, str] | None:
        """The options that make this backend hold its weights in ``dtype`` (``float32``, ``bfloat16``),
        or None when it cannot (``capbench run --dtype`` then leaves it at its default and says so)."""
        return None

    def start(self, model: ModelRef, hardware: HardwareSpec, options: Mapping[str, Any],
              shape: LoadShape = UNKNOWN_SHAPE) -> AbstractContextManager[Session]:
        """Load or launch the engine for a run of ``shape``; the context manager tears it down."""
        raise NotImplementedError


#: Optional capabilities by base class, as documented in docs/plugins.md.
OPTIONAL_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "Backend": ("description", "device", "Options", "options", "serial_decode", "needs_endpoint", "engine_env",
                "available_for", "dtype_options", "planned_dtype", "device_for", "devices_used", "placement"),
    "Session": ("serial_decode", "base_url", "served_model", "kv_capacity_tokens", "engine_process",
                "expert_activation", "decode_steps", "failure_cause",
                "begin_window", "end_window", "expert_pass", "reset_prefix_cache"),
    "Task": ("scores_externally", "supports_chat", "warmup_requests", "variant", "evaluate"),
}

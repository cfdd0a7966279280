"""The contract between the runner and a serving backend.

A backend plugin implements :class:`Backend`; ``start`` yields a
:class:`Session` that streams tokens for one request at a time (many requests
may stream concurrently) and, where the engine allows, reports the experts it
really activated.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from capbench_core.errors import CapbenchError

if TYPE_CHECKING:
    from capbench_core.results import HardwareSpec


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
    """One generation request. ``ignore_eos`` forces exactly ``max_tokens`` tokens."""

    id: str
    prompt: str
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False
    prompt_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of a whole request: from the engine, or counted with the model's tokenizer."""

    prompt_tokens: int | None
    completion_tokens: int | None
    source: Literal["engine", "tokenizer"]


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


@dataclass(frozen=True)
class EngineInfo:
    """What ran: engine name and version, and the exact arguments it got."""

    name: str
    version: str
    launch_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecodeStep:
    """One engine decode step as the engine itself timed it."""

    batch_size: int
    step_ns: int
    context_tokens: int
    distinct_experts: list[float]
    started_ns: int = 0


@dataclass
class ExpertActivation:
    """Distinct activated experts per layer per decode step (the A in S-MBU).

    ``source`` says where the numbers came from: ``measured`` (router
    instrumentation or an engine recorder) or ``estimated`` (uniform routing).
    """

    source: Literal["measured", "estimated"]
    method: str
    steps: list[DecodeStep] = field(default_factory=list)


def check_options(backend: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """One error for every backend: the options it was given but does not take, and those it does."""
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


@runtime_checkable
class Session(Protocol):
    engine: EngineInfo

    def stream(self, request: Request) -> AsyncIterator[TokenChunk]:
        """Stream the completion of ``request``; the runner timestamps every chunk."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` under the served model's tokenizer."""
        ...

    def expert_activation(self, since_ns: int = 0) -> ExpertActivation | None:
        """Decode steps started at or after ``since_ns`` (perf_counter_ns), or None."""
        ...


@runtime_checkable
class Backend(Protocol):
    name: str
    description: str

    def available(self) -> Availability:
        """Cheap check: imports and devices, never a model load."""
        ...

    def start(self, model: ModelRef, hardware: HardwareSpec,
              options: Mapping[str, Any]) -> AbstractContextManager[Session]:
        """Load or launch the engine; the context manager tears it down."""
        ...

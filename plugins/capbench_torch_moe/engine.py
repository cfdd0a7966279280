"""The torch_moe engine: continuous batching on one background thread.

New requests are prefilled one at a time and join the running batch; every
decode step advances all live sequences together, so concurrent requests share
expert reads. Live sequences always occupy KV-cache slots 0..n-1 (a finished
sequence's slot is refilled by the last one), so a step reads contiguous views.
Each step records its batch size, wall time, summed context and the number of
distinct experts each layer activated.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from capbench_core.backend import DecodeStep, ExpertActivation, Request, TokenChunk
from capbench_core.errors import CapbenchError
from capbench_torch_moe.model import ForwardStats, KVCache, MoETransformer

Emit = Callable[[TokenChunk | BaseException | None], None]


@dataclass
class _Sequence:
    request: Request
    prompt_ids: list[int]
    emit: Emit
    generated: list[int] = field(default_factory=list)
    text_sent: str = ""
    generator: torch.Generator | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


class Engine:
    """Owns the model, the KV cache and the scheduling thread."""

    def __init__(self, model: MoETransformer, tokenizer: Any, max_batch: int, max_model_len: int,
                 eos_token_id: int | None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.eos = eos_token_id
        self.cache = KVCache(model.cfg, max_batch, max_model_len, model.embed.weight.dtype)
        self.steps: list[DecodeStep] = []
        self._pending: queue.Queue[_Sequence] = queue.Queue()
        self._live: list[_Sequence] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="torch_moe-engine", daemon=True)
        self._thread.start()

    # --- public -----------------------------------------------------------------
    def submit(self, request: Request, emit: Emit) -> None:
        ids = list(request.prompt_token_ids or self.tokenizer.encode(request.prompt).ids)
        if not ids:
            raise CapbenchError(f"request {request.id} has an empty prompt")
        if len(ids) + request.max_tokens > self.max_model_len:
            raise CapbenchError(f"request {request.id}: prompt ({len(ids)}) + max_tokens ({request.max_tokens}) "
                                f"exceeds max_model_len {self.max_model_len}; raise --backend-option "
                                f"max_model_len=N")
        gen = None
        if not request.sampling.greedy:
            gen = torch.Generator().manual_seed(request.sampling.seed)
        self._pending.put(_Sequence(request, ids, emit, generator=gen))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    # --- the loop ---------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._admit(block=not self._live)
                if self._live:
                    self._decode()
        for seq in self._live:
            seq.emit(CapbenchError("engine stopped"))

    def _admit(self, block: bool) -> None:
        while len(self._live) < self.max_batch:
            try:
                seq = self._pending.get(timeout=0.05) if block else self._pending.get_nowait()
            except queue.Empty:
                return
            block = False
            try:
                self._prefill(seq)
            except Exception as exc:  # one bad request fails alone
                seq.emit(exc)

    def _prefill(self, seq: _Sequence) -> None:
        slot = len(self._live)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        logits = self.model(torch.tensor([seq.prompt_ids]), kv_out=kv)[0, -1]
        self.cache.store_prefill(slot, kv)
        self._live.append(seq)
        self._accept(seq, self._sample(seq, logits))
        if self._finished(seq):
            self._retire(slot)

    def _decode(self) -> None:
        live = self._live
        tokens = torch.tensor([s.generated[-1] for s in live])
        positions = torch.tensor([s.length - 1 for s in live])
        stats = ForwardStats()
        started = time.perf_counter_ns()
        logits = self.model.decode(tokens, positions, self.cache, stats)
        picks = [self._sample(s, logits[i]) for i, s in enumerate(live)]
        elapsed = time.perf_counter_ns() - started
        self.steps.append(DecodeStep(batch_size=len(live), step_ns=elapsed,
                                     context_tokens=int(positions.sum()) + len(live),
                                     distinct_experts=stats.distinct_experts, started_ns=started))
        for seq, token in zip(list(live), picks):
            self._accept(seq, token)
        for slot in reversed(range(len(live))):
            if self._finished(live[slot]):
                self._retire(slot)

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> int:
        sampling = seq.request.sampling
        if sampling.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _accept(self, seq: _Sequence, token: int) -> None:
        seq.generated.append(token)
        ids = seq.generated[:-1] if token == self.eos and not seq.request.ignore_eos else seq.generated
        text = self.tokenizer.decode(ids)
        delta = "" if text.endswith("\ufffd") else text[len(seq.text_sent):]
        if not text.endswith("\ufffd"):
            seq.text_sent = text
        finish = self._finish_reason(seq)
        seq.emit(TokenChunk(text=delta, num_tokens=1, finish_reason=finish))

    def _finish_reason(self, seq: _Sequence) -> str | None:
        if seq.generated[-1] == self.eos and not seq.request.ignore_eos:
            return "stop"
        if len(seq.generated) >= seq.request.max_tokens:
            return "length"
        return None

    def _finished(self, seq: _Sequence) -> bool:
        return self._finish_reason(seq) is not None

    def _retire(self, slot: int) -> None:
        seq = self._live[slot]
        last = len(self._live) - 1
        if slot != last:
            self.cache.move(last, slot, self._live[last].length)
            self._live[slot] = self._live[last]
        self._live.pop()
        seq.emit(None)


class TorchMoESession:
    """Session over an Engine: asyncio streaming, token counts, activation records."""

    def __init__(self, engine: Engine, engine_info: Any):
        self._engine = engine
        self.engine = engine_info

    async def stream(self, request: Request) -> AsyncIterator[TokenChunk]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[TokenChunk | BaseException | None] = asyncio.Queue()
        self._engine.submit(request, lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item))
        while True:
            item = await inbox.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def count_tokens(self, text: str) -> int:
        return len(self._engine.tokenizer.encode(text).ids)

    def expert_activation(self, since_ns: int = 0) -> ExpertActivation:
        steps = [s for s in list(self._engine.steps) if s.started_ns >= since_ns]
        return ExpertActivation(source="measured", method="router top-k ids counted per layer per decode step",
                                steps=steps)

"""The torch_moe engine: continuous batching on one background thread.

New requests are prefilled one at a time and join the running batch; every
decode step advances all live sequences together, so concurrent requests share
expert reads. Live sequences always occupy KV-cache slots 0..n-1 (a finished
sequence's slot is refilled by the last one), so a step reads contiguous views.
Each step records its batch size, wall time, summed context and, per MoE layer,
the tokens each expert took (hence the distinct experts activated). The model,
its KV cache and every step live on one device (``cpu`` or ``cuda[:N]``).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from capbench_core.analytics.checkpoint import chat_template
from capbench_core.contract.backend import DecodeStep, ExpertActivation, Request, Session, TokenChunk, Usage, drain
from capbench_core.errors import CapbenchError
from capbench_torch_moe.model import ForwardStats, KVCache, MoETransformer

Item = TokenChunk | BaseException | None


@dataclass(frozen=True)
class Channel:
    """Where one request's chunks go: an asyncio queue and the loop that owns it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item]


def _deliver(batch: list[tuple[asyncio.Queue[Item], Item]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


@dataclass
class _Sequence:
    request: Request
    prompt_ids: list[int]
    channel: Channel
    detok: Any
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    text: str = ""
    stopped: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


class Engine:
    """Owns the model, the KV cache and the scheduling thread."""

    def __init__(self, load: Callable[[], MoETransformer], tokenizer: Any, max_batch: int,
                 max_model_len: int | None = None, threads: int | None = None):
        """Loads the model *on the engine thread*: torch work then never runs on the caller's
        thread, whose OpenMP team would otherwise compete with the engine's on few cores."""
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.steps: list[DecodeStep] = []
        self._pending: queue.Queue[_Sequence] = queue.Queue()
        self._live: list[_Sequence] = []
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Item], Item]]] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load, max_model_len, threads),
                                        name="torch_moe-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self, load: Callable[[], MoETransformer], max_model_len: int | None, threads: int | None) -> None:
        try:
            if threads:
                torch.set_num_threads(threads)
            self.threads = torch.get_num_threads()
            self.model = load()
            self.max_model_len = max_model_len or min(self.model.cfg.max_position_embeddings, 4096)
            self.eos = self.model.cfg.eos_token_id
            model = self.model
            self.cache = KVCache(model.cfg, self.max_batch, self.max_model_len, model.dtype, model.device)
        except BaseException as exc:  # reported to the constructor's caller
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop()

    # --- public -----------------------------------------------------------------
    def submit(self, request: Request, channel: Channel) -> None:
        from tokenizers import decoders

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
        detok = decoders.DecodeStream(skip_special_tokens=not request.ignore_eos)
        self._pending.put(_Sequence(request, ids, channel, detok, generator=gen))

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
                self._flush()
        for seq in self._live:
            self._emit(seq, CapbenchError("engine stopped"))
        self._flush()

    def _emit(self, seq: _Sequence, item: Item) -> None:
        self._outbox.setdefault(seq.channel.loop, []).append((seq.channel.queue, item))

    def _flush(self) -> None:
        """One thread-safe wake-up per event loop per step, carrying every chunk of that step."""
        for loop, batch in self._outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the client's loop is gone: nobody is listening
                pass
        self._outbox = {}

    def _admit(self, block: bool) -> None:
        """Take waiting requests (up to free slots) and prefill them in one right-padded batch."""
        new: list[_Sequence] = []
        while len(self._live) + len(new) < self.max_batch:
            try:
                new.append(self._pending.get(timeout=0.05) if block and not new else self._pending.get_nowait())
            except queue.Empty:
                break
        if not new:
            return
        try:
            self._prefill(new)
        except Exception as exc:  # a failed prefill fails its requests, not the engine
            for seq in new:
                self._emit(seq, exc)

    def _prefill(self, new: list[_Sequence]) -> None:
        width = max(len(s.prompt_ids) for s in new)
        ids = torch.full((len(new), width), self.eos or 0, dtype=torch.long)
        for i, s in enumerate(new):
            ids[i, :len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
        ids = ids.to(self.model.device)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        logits = self.model(ids, kv_out=kv)
        last = torch.stack([logits[i, len(s.prompt_ids) - 1] for i, s in enumerate(new)])
        base = len(self._live)
        for i, s in enumerate(new):
            self.cache.store_prefill(base + i, [(k[i:i + 1, :len(s.prompt_ids)], v[i:i + 1, :len(s.prompt_ids)])
                                                for k, v in kv])
        self._live.extend(new)
        self._accept(new, self._sample(new, last))

    def _decode(self) -> None:
        live = self._live
        device = self.model.device
        tokens = torch.tensor([s.generated[-1] for s in live], device=device)
        lengths = [s.length - 1 for s in live]
        positions = torch.tensor(lengths, device=device)
        stats = ForwardStats()
        started = time.perf_counter_ns()
        logits = self.model.decode(tokens, positions, self.cache, stats)
        picks = self._sample(live, logits)  # reads the logits back: the step has finished on any device
        self.steps.append(DecodeStep(batch_size=len(live), step_ns=time.perf_counter_ns() - started,
                                     context_tokens=sum(lengths) + len(live),
                                     distinct_experts=stats.distinct_experts, started_ns=started,
                                     expert_tokens=stats.expert_tokens))
        self._accept(live, picks)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        picks = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            sampling = seq.request.sampling
            if not sampling.greedy:
                probs = torch.softmax(logits[i].float().cpu() / sampling.temperature, dim=-1)
                picks[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
        return [int(p) for p in picks]

    def _accept(self, seqs: list[_Sequence], tokens: list[int]) -> None:
        """Append each sequence's token, stream it, and retire finished sequences."""
        finished = []
        now = time.perf_counter_ns()
        for seq, token in zip(seqs, tokens):
            seq.generated.append(token)
            delta = "" if self._is_eos(seq) else (seq.detok.step(self.tokenizer, token) or "")
            delta = self._cut_at_stop(seq, delta)
            finish = self._finish_reason(seq)
            self._emit(seq, TokenChunk(text=delta, num_tokens=1, finish_reason=finish, emitted_ns=now))
            if finish:
                finished.append(seq)
        for seq in finished:
            self._retire(self._live.index(seq))

    def _is_eos(self, seq: _Sequence) -> bool:
        return seq.generated[-1] == self.eos and not seq.request.ignore_eos

    @staticmethod
    def _cut_at_stop(seq: _Sequence, delta: str) -> str:
        """Append delta to the text; if a stop string now appears, end the text before it."""
        if not seq.request.stop or not delta:
            return delta
        before = len(seq.text)
        seq.text += delta
        hits = [i for i in (seq.text.find(s, max(0, before - len(s))) for s in seq.request.stop) if i >= 0]
        if not hits:
            return delta
        seq.stopped = True
        cut = min(hits)
        seq.text = seq.text[:cut]
        return seq.text[before:] if cut > before else ""

    def _finish_reason(self, seq: _Sequence) -> str | None:
        if self._is_eos(seq) or seq.stopped:
            return "stop"
        if len(seq.generated) >= seq.request.max_tokens:
            return "length"
        return None

    def _retire(self, slot: int) -> None:
        seq = self._live[slot]
        last = len(self._live) - 1
        if slot != last:
            self.cache.move(last, slot, self._live[last].length)
            self._live[slot] = self._live[last]
        self._live.pop()
        self._emit(seq, TokenChunk(text="", num_tokens=0, usage=Usage(len(seq.prompt_ids), len(seq.generated),
                                                                       "engine")))
        self._emit(seq, None)


class TorchMoESession(Session):
    """Session over an Engine: asyncio streaming, token counts, activation records."""

    def __init__(self, engine: Engine, engine_info: Any, model_path: Path | None = None):
        self._engine = engine
        self.engine = engine_info
        self.model_path = model_path or Path(".")

    async def stream(self, request: Request) -> AsyncIterator[TokenChunk]:
        inbox: asyncio.Queue[Item] = asyncio.Queue()
        if request.chat:  # the model's chat template, rendered here as a server would
            request = replace(request, prompt=chat_template(self.model_path).render(request.prompt), chat=False)
        self._engine.submit(request, Channel(asyncio.get_running_loop(), inbox))
        async for chunk in drain(inbox):
            yield chunk

    def count_tokens(self, text: str) -> int:
        return len(self._engine.tokenizer.encode(text).ids)

    def expert_activation(self, since_ns: int = 0) -> ExpertActivation:
        steps = [s for s in list(self._engine.steps) if s.started_ns >= since_ns]
        return ExpertActivation(source="measured", method="router top-k ids counted per layer per decode step",
                                steps=steps)

"""The streaming client every server backend shares: OpenAI `/v1/completions`, and `/v1/chat/completions` for
chat requests (the server applies the model's chat template).

Requests are sent with ``stream: true`` and ``stream_options.include_usage``.
Each SSE chunk becomes a TokenChunk (timestamped by the load generator on
arrival). When the server sends a usage block, its token counts are used
(``source='engine'``); when it does not (llama.cpp's server), the output is
counted with the model's tokenizer (``source='tokenizer'``). HTTP errors, a
stream that ends without ``[DONE]`` and malformed chunks raise typed errors
that the load generator records per request, by kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from capbench_core.contract.backend import EngineInfo, Request, Session, TokenChunk, Usage
from capbench_core.contract.window import WindowReport
from capbench_core.errors import CapbenchError
from capbench_core.serving.http import ConnectionClosed, StreamingClient
from capbench_core.serving.launcher import Server, found_error
from capbench_core.serving.scrape import EngineProbe


class StreamError(Exception):
    """A request failed on the wire; the class name is the error kind."""


class HTTPError(StreamError):
    pass


class IncompleteStream(StreamError):
    pass


class MalformedChunk(StreamError):
    pass


def tokenizer_counter(model_dir: Path) -> Callable[[str], int] | None:
    """Token counter from the model's tokenizer.json, or None when it has none."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return lambda text: len(tok.encode(text).ids)


def check_endpoint(base_url: str, timeout_s: float = 5.0) -> list[str]:
    """GET /v1/models before a run: the served model ids, or one clear error."""
    import httpx

    url = base_url.rstrip("/") + "/v1/models"
    try:
        resp = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise CapbenchError(f"cannot reach {url}: {exc.__class__.__name__} ({exc}). Is the server running, "
                            f"and is --endpoint right?") from None
    if resp.status_code != 200:
        raise CapbenchError(f"{url} answered HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        return [m["id"] for m in resp.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CapbenchError(f"{url} did not return an OpenAI model list") from None


def attach(options: Mapping[str, Any], default_name: str) -> tuple[str, str]:
    """For ``endpoint=URL``: the server's base URL and the model name to ask it for (``served_model``, else
    the one it serves, else ``default_name``), after one reachability check."""
    url = str(options["endpoint"]).rstrip("/")
    served = check_endpoint(url)
    return url, str(options.get("served_model") or (served[0] if served else default_name))


def _choice_text(choice: Mapping[str, Any]) -> tuple[str, str]:
    """(answer text, reasoning text) of one streamed choice: a completion's ``text``, or a chat chunk's
    ``delta.content`` and ``delta.reasoning_content`` (reasoning models stream their thinking apart)."""
    if "delta" in choice:
        delta = choice.get("delta") or {}
        return str(delta.get("content") or ""), str(delta.get("reasoning_content") or delta.get("reasoning") or "")
    return str(choice.get("text") or ""), ""


class OpenAISession(Session):
    """A Session over an OpenAI-compatible server.

    ``body_hook(request, body)`` lets a backend add its engine's own sampling
    fields (llama.cpp's ``repeat_penalty``); ``serial_decode`` tells the runner
    the engine decodes one request at a time; ``probe`` reads the engine's own
    metrics (and, for SGLang, its expert recorder) around the measured window.
    ``server``, set for a server capbench launched, says how it died and whose memory to sample.
    """

    server: Server | None = None

    def engine_process(self) -> tuple[int, str] | None:
        """The server capbench launched (its process group holds every worker); None for an attached one."""
        if self.server is None:
            return None
        return self.server.process.pid, f"the {self.engine.name} process capbench launched"

    def failure_cause(self) -> str | None:
        """A launched engine that exited: how; one still up: the error its log names, if any."""
        if self.server is None:
            return None
        died = self.server.died("during the run")
        if died is not None:
            return died
        logged = found_error(self.server.log_path)
        return f"the engine's log says: {logged} (log: {self.server.log_path})" if logged else None

    def __init__(self, base_url: str, model: str, engine: EngineInfo,
                 count_tokens: Callable[[str], int] | None = None, api_key: str | None = None,
                 timeout_s: float = 600.0, body_hook: Callable[[Request, dict[str, Any]], None] | None = None,
                 probe: EngineProbe | None = None, serial_decode: bool = False):
        self.base_url: str | None = base_url.rstrip("/")
        self.served_model: str | None = model
        self._url = self.base_url
        self.engine = engine
        self._count = count_tokens
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s
        self._hook = body_hook
        self.serial_decode = serial_decode
        #: the engine's endpoint that empties its prefix cache (POST), when it has one
        self.cache_reset: str | None = None
        self._probe = probe
        self._clients: dict[int, StreamingClient] = {}

    def _client(self) -> StreamingClient:
        """One connection pool per event loop (each load level runs in its own loop)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(id(loop))
        if client is None:
            client = StreamingClient(self._url, self._headers, self._timeout_s)
            self._clients = {id(loop): client}
        return client

    def reset_prefix_cache(self) -> tuple[bool | None, str]:
        """POST the engine's cache-reset endpoint; an OpenAI-compatible server without one cannot be reset."""
        if self.cache_reset is None:
            return False, "an OpenAI-compatible server: capbench knows no way to empty its prefix cache"
        return post_ok(f"{self._url}{self.cache_reset}")

    def body(self, req: Request) -> dict[str, Any]:
        s = req.sampling
        body: dict[str, Any] = {
            "model": self.served_model, "max_tokens": req.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": s.temperature, "top_p": s.top_p,
            "seed": s.seed, "repetition_penalty": s.repetition_penalty,
        }
        if req.chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        if req.ignore_eos:
            body["ignore_eos"] = True
        if req.stop:
            body["stop"] = list(req.stop)
        if self._hook is not None:
            self._hook(req, body)
        return body

    async def stream(self, req: Request) -> AsyncIterator[TokenChunk]:
        text: list[str] = []
        usage: dict[str, Any] | None = None
        done = False
        buffer = b""
        error = b""
        status = 0
        payload = orjson.dumps(self.body(req))
        path = "/v1/chat/completions" if req.chat else "/v1/completions"
        try:
            async for status, piece in self._client().post_stream(path, payload):
                if status != 200:
                    error += piece
                    continue
                buffer += piece
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    chunk = self._parse(data)
                    usage = chunk.get("usage") or usage
                    for c in chunk.get("choices") or []:
                        piece_text, thought = _choice_text(c)
                        finish = c.get("finish_reason")
                        if piece_text or thought or finish:
                            text.append(piece_text)
                            yield TokenChunk(text=piece_text, num_tokens=1 if piece_text or thought else 0,
                                             finish_reason=finish, server_request_id=chunk.get("id"))
        except ConnectionClosed as exc:
            raise IncompleteStream(str(exc)) from None
        if status != 200:
            raise HTTPError(f"HTTP {status}: {error.decode(errors='replace')[:300]}")
        if not done:
            raise IncompleteStream("stream ended without [DONE]")
        yield TokenChunk(text="", num_tokens=0, usage=self._usage(usage, "".join(text), req))

    def _usage(self, usage: dict[str, Any] | None, text: str, req: Request) -> Usage:
        if usage and usage.get("completion_tokens") is not None:
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            return Usage(prompt_tokens=usage.get("prompt_tokens"), completion_tokens=int(usage["completion_tokens"]),
                         source="engine", cached_tokens=int(cached) if isinstance(cached, int) else None)
        if self._count is None:
            return Usage(prompt_tokens=None, completion_tokens=None, source="tokenizer")
        return Usage(prompt_tokens=self._count(req.prompt), completion_tokens=self._count(text), source="tokenizer")

    @staticmethod
    def _parse(data: bytes) -> dict[str, Any]:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedChunk(f"chunk is not JSON: {data[:80]!r}") from None
        if not isinstance(obj, dict):
            raise MalformedChunk(f"chunk is not a JSON object: {data[:80]!r}")
        return obj

    def count_tokens(self, text: str) -> int:
        if self._count is None:
            raise CapbenchError("no tokenizer is known for this endpoint's model")
        return self._count(text)

    def begin_window(self) -> None:
        """Called by the runner just before the measured requests."""
        if self._probe is not None:
            self._probe.begin()

    def end_window(self) -> WindowReport | None:
        """Called just after them: the engine's own view of the window."""
        return self._probe.end() if self._probe is not None else None


def post_ok(url: str) -> tuple[bool, str]:
    """POST ``url`` with no body: (True, what was done) on HTTP 200, else (False, what the server said)."""
    import httpx

    path = url.split("/", 3)[-1]
    try:
        resp = httpx.post(url, timeout=30)
    except httpx.HTTPError as exc:
        return False, f"POST /{path} failed: {exc}"
    if resp.status_code != 200:
        return False, f"POST /{path} answered HTTP {resp.status_code}: {resp.text[:200]}"
    return True, f"POST /{path}"

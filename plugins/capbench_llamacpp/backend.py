"""llama.cpp in-process through llama-cpp-python (`llamacpp`); the GGUF and option helpers the
`llamacpp_server` backend (llama.cpp's own llama-server, server.py) shares.

Both serve the model's GGUF file (built from the checkpoint on first use, see
gguf_export.py) with the same sampling as every other backend: greedy for
temperature 0, repeat penalty 1.0 unless set (llama.cpp's server defaults to
1.1, so it is always sent), EOS banned through a logit bias for ignore_eos.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import field_validator

from capbench_core.analytics.checkpoint import chat_template
from capbench_core.analytics.weights import GGML_KV, from_gguf
from capbench_core.contract.backend import (
    UNKNOWN_SHAPE,
    Availability,
    Backend,
    EngineInfo,
    LoadShape,
    ModelRef,
    Request,
    Session,
    TokenChunk,
    Usage,
    drain,
)
from capbench_core.contract.options import BackendOptions, option
from capbench_core.contract.records import HardwareSpec
from capbench_core.errors import CapbenchError
from capbench_core.serving.launcher import found_error
from capbench_llamacpp.convert import auto_type, ensure_gguf
from capbench_llamacpp.gguf_export import GGUF_TYPES, llama_log_to

AMX_CRASH = ("off: llama.cpp's AMX matrix kernels crash on this AMX CPU with quantized weights "
             "(ggml-org/llama.cpp#20824); repack=on turns it back on")
GGML_TYPES = {"f32": 0, "f16": 1}
WEIGHT_DTYPE = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "q8_0": "q8_0", "q4_k_m": "q4_k"}
BAN = -1e9
GGUF_FOR_DTYPE = {"float32": "f32", "bfloat16": "bf16"}


def ggml_commit(llama_cpp: Any) -> str:
    """The llama.cpp revision llama-cpp-python's libraries were built from (ggml's own ``ggml_commit()``), so
    the in-process row names the revision beside llama-server's; "revision unknown" where a build lacks it."""
    import ctypes

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml.so"):
        try:
            fn = ctypes.CDLL(str(lib_dir / name)).ggml_commit
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_char_p
        commit = fn()
        return commit.decode() if commit else "revision unknown"
    return "revision unknown"


#: llama.cpp's ``general.file_type`` (enum llama_ftype) -> the dtype capbench counts bytes in.
FILE_TYPES = {0: "float32", 1: "float16", 7: "q8_0", 14: "q4_k", 15: "q4_k", 32: "bfloat16"}


def gguf_file_dtype(path: Path) -> str | None:
    """The weight dtype a GGUF file declares (``general.file_type``), None when unreadable or not one capbench
    knows the bytes of."""
    import gguf as gguf_lib

    try:
        field = gguf_lib.GGUFReader(str(path)).fields["general.file_type"]
        return FILE_TYPES.get(int(field.contents()))
    except (KeyError, ValueError, OSError):
        return None


def gguf_weight_dtype(gguf: Path) -> str | None:
    """The weight dtype the served GGUF holds, as its metadata says (a user's file, or one capbench made)."""
    return gguf_file_dtype(gguf)


def planned_gguf_dtype(model: ModelRef, options: Mapping[str, Any]) -> str | None:
    """The weight dtype the GGUF will hold, before it is made (a user's GGUF: as its metadata says)."""
    if options.get("gguf"):
        return gguf_file_dtype(Path(str(options["gguf"])))
    if model.path.suffix == ".gguf":
        return gguf_file_dtype(model.path)
    gguf_type = auto_type(model.path) if options.get("gguf_type", "auto") == "auto" else options["gguf_type"]
    return WEIGHT_DTYPE.get(str(gguf_type))


def gguf_dtype_options(dtype: str) -> dict[str, str] | None:
    """`--dtype` for llama.cpp: the GGUF export in that type."""
    return {"gguf_type": GGUF_FOR_DTYPE[dtype]} if dtype in GGUF_FOR_DTYPE else None


class LlamaCppOptions(BackendOptions):
    """The GGUF and llama.cpp options both llama.cpp backends take."""

    gguf_type: str = option("auto | f32 | bf16 | f16 | q8_0 | q4_k_m: the GGUF the checkpoint is converted to (auto: "
                            "its own precision, f32 for float32 weights, bf16 for bfloat16)", "auto")
    gguf: str | None = option("path of a GGUF file to serve instead of exporting the model")
    threads: int | None = option("llama.cpp threads (default: all cores)", ge=1)
    n_ctx: int | None = option("context size (default: the run's longest prompt + output, at most the model's "
                               "training context)", ge=1)
    n_batch: int = option("prompt batch size", 512, ge=1)
    kv_type: str = option("f32 | f16 KV cache (f32 by default, so logits match the F32 reference)", "f32")
    repack: str = option("auto | on | off: llama.cpp's weight repacking into CPU-specific layouts (auto: off on "
                         "CPUs with AMX, where llama.cpp's AMX kernels crash on quantized GGUFs, "
                         "ggml-org/llama.cpp#20824)", "auto")

    @field_validator("gguf_type")
    @classmethod
    def _gguf_type(cls, value: str) -> str:
        if value != "auto" and value not in GGUF_TYPES:
            raise ValueError(f"unsupported GGUF type {value!r}; supported: {', '.join(GGUF_TYPES)}")
        return value

    @field_validator("kv_type")
    @classmethod
    def _kv_type(cls, value: str) -> str:
        if value not in GGML_TYPES:
            raise ValueError("use f32 or f16")
        return value

    @field_validator("repack")
    @classmethod
    def _repack(cls, value: str) -> str:
        if value not in ("auto", "on", "off"):
            raise ValueError("use auto, on or off")
        return value


#: Option names -> help, for code that lists them.
OPTIONS = {name: info.description or "" for name, info in LlamaCppOptions.model_fields.items()}


def cpu_has_amx() -> bool:
    """Whether this CPU advertises AMX (Intel Sapphire Rapids and later), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:
        return False


def repack_setting(option: str) -> tuple[bool, str]:
    """(repack?, why) for the ``repack`` option: ``auto`` repacks except on an AMX CPU."""
    if option == "auto":
        return (False, AMX_CRASH) if cpu_has_amx() else (True, "on (llama.cpp's default)")
    return option == "on", f"{option} (option repack={option})"


@contextmanager
def no_repack_when(off: bool) -> Iterator[None]:
    """Load a llama-cpp-python model with weight repacking off (``use_extra_bufts = false``, what
    llama-server's ``--no-repack`` sets): llama-cpp-python has no argument for it, so its default model
    parameters are wrapped while the model loads."""
    if not off:
        yield
        return
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def gguf_context_length(gguf: Path) -> int | None:
    """The context the model was trained for, from the GGUF's metadata (``<arch>.context_length``)."""
    import gguf as gguf_lib

    try:
        reader = gguf_lib.GGUFReader(str(gguf))
        arch = reader.fields["general.architecture"].contents()
        return int(reader.fields[f"{arch}.context_length"].contents())
    except (KeyError, ValueError, OSError):
        return None


def gguf_cache() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("capbench")) / "gguf"


def resolve_gguf(model: ModelRef, opts: Mapping[str, Any]) -> Path:
    """The GGUF to serve: ``gguf=PATH``, the model when it is a GGUF file, else the checkpoint converted (once)."""
    if opts["gguf"]:
        path = Path(opts["gguf"])
        if not path.is_file():
            raise CapbenchError(f"GGUF file {path} does not exist (option gguf=...)")
        return path
    if model.path.suffix == ".gguf":
        return model.path
    gguf_type = auto_type(model.path) if opts["gguf_type"] == "auto" else opts["gguf_type"]
    return ensure_gguf(model.path, gguf_type, gguf_cache())


def _available() -> Availability:
    if importlib.util.find_spec("llama_cpp") is None:
        return Availability.no("llama-cpp-python is not installed (pip install 'capbench[llamacpp]')")
    return Availability.yes()


class LlamaCppSession(Session):
    """In-process llama.cpp: requests served one at a time by one long-lived worker thread.

    One thread for the session's life, not one per request: llama.cpp called from a new
    thread each time paid ~8 ms per request here, against 0.5 ms from a steady thread.
    """

    serial_decode = True  # one sequence at a time: the runner derives batch-1 decode steps

    def __init__(self, llm: Any, engine: EngineInfo, model_path: Path):
        self.llm = llm
        self.engine = engine
        self.model_path = model_path
        self._eos = int(llm.token_eos())
        self._jobs: queue.Queue[tuple[Request | None, Any] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="llamacpp-worker", daemon=True)
        self._worker.start()

    def reset_prefix_cache(self) -> tuple[bool | None, str]:
        """llama-cpp-python reuses the previous prompt's KV prefix; forget it (the next request reads from 0)."""
        done = threading.Event()
        self._jobs.put((None, done))
        done.wait()
        return True, "the previous prompt's KV prefix forgotten (Llama.reset(), on the engine's thread)"

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job[0] is None:  # a reset, between load levels
                self.llm.reset()
                job[1].set()
                continue
            self._generate(*job)

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=30)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=False))

    def _generate(self, req: Request, put: Any) -> None:
        """Drive llama.cpp token by token, counting every token against max_tokens.

        Not `create_completion(stream=True)`: it holds back tokens that end inside a UTF-8
        sequence and checks max_tokens only for tokens it emits, so a model that emits many
        partial bytes ran on until the KV cache was full ("llama_decode returned 1").
        """
        import codecs

        s = req.sampling
        try:
            prompt = self.llm.tokenize(req.prompt.encode("utf-8"), special=True)
            self.llm.set_seed(s.seed)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            text, done = "", []
            for token in self.llm.generate(prompt, top_k=0, top_p=s.top_p, min_p=0.0, temp=s.temperature,
                                           repeat_penalty=s.repetition_penalty,
                                           logits_processor=[self._ban_eos] if req.ignore_eos else None):
                done.append(token)
                chunk, finished = self._chunk(req, token, text, decoder, prompt, done)
                put(chunk)
                if finished:
                    break
                text += chunk.text
            put(TokenChunk(text="", num_tokens=0, usage=Usage(len(prompt), len(done), "engine")))
            put(None)
        except Exception as exc:  # delivered to the request, not raised on the worker thread
            put(exc)

    def _chunk(self, req: Request, token: int, text: str, decoder: Any, prompt: list[int],
               done: list[int]) -> tuple[TokenChunk, bool]:
        """The chunk one generated token makes (its text, cut at a stop string), and whether it ends the request:
        EOS (unless ignored), a stop string, or max_tokens."""
        now = time.perf_counter_ns()
        if token == self._eos and not req.ignore_eos:
            return TokenChunk(text=decoder.decode(b"", final=True), num_tokens=1, finish_reason="stop",
                              emitted_ns=now), True
        piece = decoder.decode(self.llm.detokenize([token], prev_tokens=prompt + done[:-1]))
        cut = _stop_at(text + piece, req.stop)
        if cut is not None:
            return TokenChunk(text=cut[len(text):], num_tokens=1, finish_reason="stop", emitted_ns=now), True
        last = len(done) >= req.max_tokens
        return TokenChunk(text=piece + (decoder.decode(b"", final=True) if last else ""), num_tokens=1,
                          finish_reason="length" if last else None, emitted_ns=now), last

    def _ban_eos(self, input_ids: Any, scores: Any) -> Any:
        scores[self._eos] = BAN
        return scores

    async def stream(self, request: Request) -> AsyncIterator[TokenChunk]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[TokenChunk | BaseException | None] = asyncio.Queue()
        if request.chat:  # the model's chat template, rendered here as a server would
            request = replace(request, prompt=chat_template(self.model_path).render(request.prompt), chat=False)
        self._jobs.put((request, lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item)))
        async for chunk in drain(inbox):
            yield chunk



def _stop_at(text: str, stops: Any) -> str | None:
    """``text`` cut before the earliest stop string in it, or None when none occurs."""
    hits = [text.index(stop) for stop in stops if stop and stop in text]
    return text[:min(hits)] if hits else None


class LlamaCppBackend(Backend):
    name = "llamacpp"
    device = "cpu"
    description = "llama.cpp in-process (llama-cpp-python), one request at a time"
    Options = LlamaCppOptions
    serial_decode = True

    def dtype_options(self, dtype: str) -> dict[str, str] | None:
        return gguf_dtype_options(dtype)

    def planned_dtype(self, model: ModelRef, options: Mapping[str, Any]) -> str | None:
        return planned_gguf_dtype(model, options)

    def available(self) -> Availability:
        return _available()

    @contextmanager
    def start(self, model: ModelRef, hardware: HardwareSpec, options: Mapping[str, Any],
              shape: LoadShape = UNKNOWN_SHAPE) -> Iterator[Session]:
        import llama_cpp

        from capbench_core.serving.launcher import run_log_dir

        opts = self.validate_options(options)
        gguf = resolve_gguf(model, opts)
        kv = GGML_TYPES[opts["kv_type"]]
        n_ctx = opts["n_ctx"] or shape.context_for(gguf_context_length(gguf)) or 512
        log = run_log_dir() / f"llamacpp-{os.getpid()}-{time.time_ns()}.log"
        repack, repack_why = repack_setting(opts["repack"])
        with llama_log_to(log):
            try:
                with no_repack_when(not repack):
                    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=opts["n_batch"],
                                          n_threads=opts["threads"], type_k=kv, type_v=kv, verbose=False)
            except ValueError as exc:
                raise CapbenchError(f"llama.cpp could not load {gguf}: {found_error(log) or exc} (its log: {log})") \
                    from None
            info = EngineInfo("llama.cpp", f"llama-cpp-python {llama_cpp.__version__}",
                              {**opts, "n_ctx": n_ctx, "gguf": str(gguf), "threads": llm.context_params.n_threads,
                               "log": str(log), "repack": repack_why},
                              package="llama-cpp-python", package_version=llama_cpp.__version__,
                              variant=f"in-process (llama.cpp {ggml_commit(llama_cpp)}, vendored in its sdist)",
                              weight_dtype=gguf_weight_dtype(gguf), kv_dtype=GGML_KV[opts["kv_type"]],
                              weight_bytes=from_gguf(gguf).record())
            session = LlamaCppSession(llm, info, model.path)
            session.kv_capacity_tokens = llm.n_ctx()
            try:
                yield session
            finally:
                session.close()
                llm.close()

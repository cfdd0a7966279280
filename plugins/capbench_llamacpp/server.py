"""`llamacpp_server`: llama.cpp's own C++ `llama-server` (parallel slots, continuous batching), launched or attached.

`capbench engines install llama.cpp` builds `llama-server` and `llama-bench`
(CPU, native ISA) from the llama.cpp source vendored in llama-cpp-python's
sdist on PyPI — the same revision the in-process `llamacpp` backend runs — so
nothing is downloaded but a PyPI package. The build stays in the engine
environment for later runs. llama.cpp's libraries are built shared and kept
beside the tools with the sdist, so capbench's own llama-cpp-python can use
them instead of compiling llama.cpp a second time (``scripts/setup.sh`` does).

The run's concurrency becomes `--parallel` slots, each with the context the
workload needs (at most the model's training context), threads as the other
CPU backends, greedy sampling without repetition penalty, `--metrics`
scraped around the measured window (llama.cpp's own counter names, flavor
`llamacpp`). MoE placement knobs (`--n-cpu-moe`, `--override-tensor`,
`--n-gpu-layers`, KV cache types, flash attention, batch sizes) are passed
through, validated and recorded.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capbench_core.analytics.figures import engine_decode_steps
from capbench_core.analytics.weights import GGML_KV, from_gguf
from capbench_core.contract.backend import (
    Availability,
    DecodeSource,
    DecodeWindow,
    EngineInfo,
    LoadShape,
    ModelRef,
    Request,
    Session,
)
from capbench_core.contract.engine_env import Context, EngineDevice, Recipe, Step, home, installed
from capbench_core.contract.options import flag, option
from capbench_core.contract.records import Placement, TierUse
from capbench_core.serving.environments import EngineUnavailable, Resolved
from capbench_core.serving.openai_client import OpenAISession
from capbench_core.serving.scrape import EngineProbe, MetricTable
from capbench_core.serving.server_backend import ServerBackend, ServerOptions, get_json
from capbench_llamacpp.backend import (
    LlamaCppOptions,
    gguf_context_length,
    gguf_dtype_options,
    gguf_file_dtype,
    gguf_weight_dtype,
    planned_gguf_dtype,
    repack_setting,
    resolve_gguf,
)

SOURCE_PACKAGE = "llama-cpp-python"
SOURCE_VERSION = "0.3.36"   # its sdist vendors llama.cpp; keep equal to the in-process backend's version
TOOLS = ("llama-server", "llama-bench", "llama-quantize")
#: The shared libraries llama-cpp-python loads (llama_cpp/lib), built with the tools.
LIBRARIES = ("llama", "ggml", "ggml-base", "ggml-cpu", "mtmd")
#: llama.cpp's LLAMA_MAX_SEQ: a server with more slots refuses to start; requests beyond them wait in its queue
MAX_SLOTS = 256
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")



def _busy_slots(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float | None]:
    """Mean busy slots per llama_decode() call over the window, from llama.cpp's running average
    (average x calls = busy-slot total, so the window's is the difference of the products)."""
    avg, calls = "llamacpp:n_busy_slots_per_decode", "llamacpp:n_decode_total"
    try:
        d_calls = after[calls] - before[calls]
        d_busy = after[avg] * after[calls] - before[avg] * before[calls]
    except KeyError:
        return {"decode_batch_mean": None}
    return {"decode_batch_mean": d_busy / d_calls if d_calls > 0 else None}


#: llama-server --metrics (tools/server/server-task.cpp, to_metrics): counters of tokens and of the seconds
#: spent on them, llama_decode() calls, and a running average of busy slots per decode call.
METRICS = MetricTable(
    engine="llama.cpp",
    counters={"prompt_tokens": ("llamacpp:prompt_tokens_total",),
              "generation_tokens": ("llamacpp:tokens_predicted_total",),
              "decode_calls": ("llamacpp:n_decode_total",)},
    gauges={"requests_running": ("llamacpp:requests_processing",),
            "requests_waiting": ("llamacpp:requests_deferred",)},
    ratios={"server_prompt_ms_per_token": ("llamacpp:prompt_seconds_total", "llamacpp:prompt_tokens_total"),
            "server_tpot_ms_mean": ("llamacpp:tokens_predicted_seconds_total", "llamacpp:tokens_predicted_total")},
    derived=_busy_slots,
)
#: MoE placement and KV options, passed through as llama-server's own flags (and recorded).
PLACEMENT = ("n_cpu_moe", "override_tensor", "n_gpu_layers", "cache_type_k", "cache_type_v", "flash_attn",
             "ubatch_size")
KV_PATTERN = "|".join(KV_TYPES)


class LlamaServerOptions(LlamaCppOptions, ServerOptions):
    n_cpu_moe: int | None = flag("--n-cpu-moe", "keep the MoE expert weights of the first N layers in host memory",
                                 ge=0)
    override_tensor: str | None = flag("--override-tensor", "tensor name pattern=buffer type,... (e.g. "
                                       "'exps=CPU')", pattern=r"^.+=.+$")
    n_gpu_layers: str | None = flag("--n-gpu-layers", "layers stored in GPU memory (number, 'auto' or 'all')",
                                    pattern=r"^(\d+|auto|all)$")
    cache_type_k: str | None = flag("--cache-type-k", f"K cache type ({', '.join(KV_TYPES)})",
                                    pattern=f"^({KV_PATTERN})$")
    cache_type_v: str | None = flag("--cache-type-v", f"V cache type ({', '.join(KV_TYPES)})",
                                    pattern=f"^({KV_PATTERN})$")
    flash_attn: str | None = flag("--flash-attn", "flash attention: on, off or auto", pattern=r"^(on|off|auto)$")
    ubatch_size: int | None = flag("--ubatch-size", "physical batch size", ge=1)
    server_binary: str | None = option("launch this llama-server instead of the llama.cpp engine environment's")
    parallel: int | None = option(f"slots decoded together (default: the run's highest concurrency, at most "
                                  f"{MAX_SLOTS})", ge=1, le=MAX_SLOTS)
    ctx_per_slot: int | None = option("context per slot (default: the longest request, at most the model's "
                                      "training context)", ge=1)
    cache_ram: int | None = option("MiB of host memory for llama-server's prompt cache (--cache-ram; its default "
                                   "8192; 0: off, so the cache reset between load levels is complete)", ge=-1)


class LlamaCppRecipe(Recipe):
    name = "llama.cpp"
    description = "llama.cpp's llama-server, llama-bench and llama-quantize, built from source"
    override_env = "CAPBENCH_LLAMA_SERVER"
    override_option = "server_binary"
    packages: dict[EngineDevice, str] = {"cpu": f"llama.cpp from {SOURCE_PACKAGE}=={SOURCE_VERSION} (sdist)",
                                         "cuda": f"llama.cpp from {SOURCE_PACKAGE}=={SOURCE_VERSION} (sdist, CUDA)"}

    def steps(self, device: EngineDevice) -> list[Step]:
        return [
            Step(f"fetch llama.cpp's source ({SOURCE_PACKAGE} {SOURCE_VERSION} sdist from PyPI)", 60, _fetch),
            Step("configure (CMake, native CPU ISA" + (", CUDA)" if device == "cuda" else ")"), 20, _configure),
            Step(f"compile {', '.join(TOOLS)} and llama.cpp's shared libraries on {os.cpu_count()} cores", 360,
                 _compile),
            Step("keep the binaries, libraries and sdist, drop the build tree", 2, _keep_binaries),
        ]

    def check(self, ctx: Context) -> tuple[str, str, str]:
        out = ctx.run([str(ctx.home / "bin" / "llama-server"), "--version"], with_stderr=True)
        ctx.details["llama_server_version"] = _version_line(out)
        return f"llama.cpp ({SOURCE_PACKAGE} {SOURCE_VERSION} sdist)", _version_line(out), ctx.device

    def executable(self, home: Path) -> Path:
        return home / "bin" / "llama-server"


def _version_line(out: str) -> str:
    """`version: 0.5.0-dev (build 1, commit 0c1e570)` -> `0.5.0-dev (build 1, commit 0c1e570)`."""
    lines = [line for line in out.splitlines() if line.startswith("version")]
    return lines[0].removeprefix("version:").strip() if lines else out.strip()[-200:]


def _fetch(ctx: Context) -> None:
    src = ctx.home / "src"
    src.mkdir(parents=True, exist_ok=True)
    ctx.pip("download", "--no-binary", ":all:", "--no-deps", "-d", str(src), f"{SOURCE_PACKAGE}=={SOURCE_VERSION}",
            python=sys.executable)
    [sdist] = sorted(src.glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(src, filter="data")
    sdist.rename(ctx.home / sdist.name)


def _source(ctx: Context) -> Path:
    [tree] = sorted((ctx.home / "src").glob("*/vendor/llama.cpp"))
    return tree


def _configure(ctx: Context) -> None:
    # Shared libraries with $ORIGIN run paths: the tools find them beside themselves once copied out of the
    # build tree, and llama-cpp-python can load the same files.
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON",
             "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
             "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
    if ctx.device == "cuda":
        flags.append("-DGGML_CUDA=ON")
    ctx.run(["cmake", "-S", str(_source(ctx)), "-B", str(ctx.home / "build"), *flags])


def _compile(ctx: Context) -> None:
    ctx.run(["cmake", "--build", str(ctx.home / "build"), "--target", *TOOLS, *LIBRARIES, "-j",
             str(os.cpu_count() or 2)])


def _keep_binaries(ctx: Context) -> None:
    built, bin_dir = ctx.home / "build" / "bin", ctx.home / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        shutil.copy2(built / tool, bin_dir / tool)
    for lib in sorted(built.glob("lib*.so*")):
        shutil.copy2(lib, bin_dir / lib.name, follow_symlinks=False)
    shutil.rmtree(ctx.home / "build")
    shutil.rmtree(ctx.home / "src")


def server_binary(options: Mapping[str, Any]) -> Resolved:
    """The llama-server to launch and where it came from; EngineUnavailable says why there is none."""
    from capbench_core.serving.environments import resolve

    recipe = LlamaCppRecipe()
    try:
        return resolve(recipe, options, lambda path: Resolved(path, "llama.cpp (user binary)", "user binary", "cpu",
                                                              "cpu", ""))
    except EngineUnavailable as exc:
        if installed(recipe.name) is None and not options.get("server_binary") and \
                not os.environ.get(recipe.override_env):
            raise EngineUnavailable("llama.cpp's llama-server is not built here: run `capbench engines install "
                                    f"llama.cpp` (or point {recipe.override_env} at your own llama-server)") from None
        raise exc


def bench_binary() -> Path | None:
    """llama-bench from the engine environment, when built."""
    path = home(LlamaCppRecipe.name) / "bin" / "llama-bench"
    return path if installed(LlamaCppRecipe.name) and path.is_file() else None


class LlamaCppServerBackend(ServerBackend):
    name = "llamacpp_server"
    device = "cpu"  # type: ignore[assignment]
    description = "llama.cpp's C++ llama-server (parallel slots, continuous batching), launched or attached"
    recipe = LlamaCppRecipe()
    metrics = METRICS
    Options = LlamaServerOptions
    engine_name = "llama.cpp server"
    startup_timeout_s = 300
    reads_checkpoint = False

    def resolve(self, options: Mapping[str, Any]) -> Resolved:
        return server_binary(options)

    def available_for(self, options: Mapping[str, Any]) -> Availability:
        if options.get("endpoint"):
            return Availability.yes()
        try:
            self.resolve(options)
        except EngineUnavailable as exc:
            return Availability.no(str(exc))
        return Availability.yes()

    def dtype_options(self, dtype: str) -> dict[str, str] | None:
        return gguf_dtype_options(dtype)

    def planned_dtype(self, model: ModelRef, options: Mapping[str, Any]) -> str | None:
        return planned_gguf_dtype(model, options)

    def settings(self, model: ModelRef, opts: Mapping[str, Any], shape: LoadShape,
                 found: Resolved) -> dict[str, Any]:
        """The GGUF to serve (exported from the checkpoint on first use)."""
        return {"gguf": str(resolve_gguf(model, opts))}

    def command(self, found: Resolved, model: ModelRef, port: int, opts: Mapping[str, Any],
                shape: LoadShape) -> list[str]:
        return self.argv(Path(found.executable), Path(str(opts["gguf"])), port, opts, model.name, shape)

    def argv(self, binary: Path, gguf: Path, port: int, opts: Mapping[str, Any], alias: str,  # type: ignore[override]
             shape: LoadShape) -> list[str]:
        """llama-server's command line: one slot per request in flight, each with the context the run needs."""
        parallel = min(int(opts.get("parallel") or shape.max_concurrency), MAX_SLOTS)
        per_slot = int(opts.get("ctx_per_slot") or opts.get("n_ctx") or shape.context_for(gguf_context_length(gguf))
                       or 512)
        threads = int(opts.get("threads") or len(os.sched_getaffinity(0)))
        kv = opts["kv_type"]
        slots = Path(tempfile.gettempdir()) / "capbench-slots"
        slots.mkdir(exist_ok=True)
        argv = [str(binary), "--model", str(gguf), "--alias", alias, "--host", "127.0.0.1", "--port", str(port),
                "--parallel", str(parallel), "--ctx-size", str(parallel * per_slot), "--threads", str(threads),
                "--threads-batch", str(threads), "--batch-size", str(opts["n_batch"]),
                "--cache-type-k", str(opts.get("cache_type_k") or kv), "--cache-type-v",
                str(opts.get("cache_type_v") or kv), "--metrics", "--no-webui",
                # slot actions on: capbench erases the slots' cached prompts between load levels (nothing is saved)
                "--slot-save-path", str(slots)]
        if opts.get("cache_ram") is not None:
            argv += ["--cache-ram", str(opts["cache_ram"])]
        if not repack_setting(opts["repack"])[0]:
            argv.append("--no-repack")
        flags = self.option_model().flags()
        for key in PLACEMENT:
            if key not in ("cache_type_k", "cache_type_v") and opts.get(key) is not None:
                argv += [flags[key], str(opts[key])]
        return argv + shlex.split(str(opts.get("extra_args") or ""))

    def served_dtype(self, model: ModelRef, opts: Mapping[str, Any]) -> str | None:
        return gguf_weight_dtype(Path(str(opts["gguf"])))

    def served_kv_dtype(self, opts: Mapping[str, Any]) -> str | None:
        return GGML_KV.get(str(opts.get("cache_type_k") or opts["kv_type"]))

    def served_weight_bytes(self, model: ModelRef, opts: Mapping[str, Any]) -> dict[str, Any] | None:
        return from_gguf(Path(str(opts["gguf"]))).record()

    def attached_dtype(self, opts: Mapping[str, Any], base_url: str) -> str | None:
        """The GGUF named by ``gguf=`` when given, else the one the server reports."""
        return gguf_file_dtype(Path(str(opts["gguf"]))) if opts.get("gguf") else self.reported_dtype(base_url)

    def placement(self, options: Mapping[str, Any]) -> Placement:
        """llama.cpp's placement knobs: --n-gpu-layers (0: all in host memory), --n-cpu-moe N (the first N
        layers' experts in host memory, computed by the CPU at decode), --override-tensor '...exps...=CPU' (every
        routed expert there). A CPU build keeps everything in host memory whatever they say."""
        named = [f"{k}={options[k]}" for k in ("n_gpu_layers", "n_cpu_moe", "override_tensor")
                 if options.get(k) is not None]
        source = f"llama-server options: {', '.join(named) if named else 'defaults'}"
        try:
            cuda = self.resolve(options).device == "cuda"
        except EngineUnavailable:
            cuda = False
        if not cuda:
            return Placement.uniform("host", f"{source}; a CPU build: every weight in host memory"
                                             f"{' (the placement options have no GPU to act on)' if named else ''}")
        if str(options.get("n_gpu_layers")) == "0":
            return Placement.uniform("host", source)
        placement = Placement.uniform("device", source)
        on_cpu = TierUse(tier="host", execution="host_compute", detail="computed by the CPU at decode (llama.cpp "
                                                                       "streams them to the GPU for big prefills)")
        if re.search(r"exps[^=]*=\s*CPU", str(options.get("override_tensor") or ""), re.IGNORECASE):
            placement.weights["routed_experts"] = on_cpu
        elif options.get("n_cpu_moe"):
            n = int(options["n_cpu_moe"])
            placement.weights["routed_experts"] = TierUse(tier="split", execution="host_compute",
                                                          detail=f"the first {n} layers' experts in host memory")
            placement.host_expert_layers = n
        return placement

    def kv_capacity(self, base_url: str, opts: Mapping[str, Any]) -> int | None:
        """llama-server's context: per-slot n_ctx (``/props`` default_generation_settings) x its slots."""
        props = get_json(base_url + "/props") or {}
        per_slot = (props.get("default_generation_settings") or {}).get("n_ctx")
        slots = props.get("total_slots")
        return int(per_slot) * int(slots) if per_slot and slots else None

    def reported_dtype(self, base_url: str) -> str | None:
        """An attached llama-server names its GGUF (``/props`` model_path); when that file is readable here, its
        metadata says the weight type."""
        props = get_json(base_url + "/props")
        path = Path(str(props.get("model_path") or "")) if props else None
        return gguf_file_dtype(path) if path is not None and path.is_file() else None

    def launch_record(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        return {"gguf": str(opts["gguf"]), "repack": repack_setting(opts["repack"])[1],
                "placement": {k: opts[k] for k in PLACEMENT if opts.get(k) is not None}}

    def version(self, base_url: str) -> str:
        record = installed(LlamaCppRecipe.name)
        return f"llama-server {record.version}" if record else "llama-server (user binary)"

    def session(self, url: str, name: str, info: EngineInfo, counter: Any, probe: EngineProbe,
                opts: Mapping[str, Any]) -> Session:
        session = LlamaServerSession(url, name, info, counter, body_hook=_llama_sampling, probe=probe)
        session.host_cache_off = opts.get("cache_ram") == 0
        return session


ENGINE_STEPS = ("the engine's own counters: step time = its generation seconds per generated token, batch = its "
                "busy slots per decode call (its stream reaches the client in bursts); A = uniform routing at that "
                "batch")


class LlamaServerSession(OpenAISession):
    """llama-server's stream reaches the client in bursts: its decode steps are timed by its own counters."""

    host_cache_off = False

    def decode_steps(self, window: DecodeWindow) -> DecodeSource | None:
        return engine_decode_steps(window, ENGINE_STEPS)

    def reset_prefix_cache(self) -> tuple[bool | None, str]:
        """Erase every slot's cached prompt (POST /slots/N?action=erase). llama-server's host prompt cache
        (--cache-ram) has no HTTP reset: the reset is complete only with it off."""
        from capbench_core.serving.openai_client import post_ok

        slots = get_json_list(f"{self._url}/slots")
        if slots is None:
            return False, "GET /slots failed, so the slots could not be erased"
        for slot in slots:
            ok, said = post_ok(f"{self._url}/slots/{slot['id']}?action=erase")
            if not ok:
                return False, said
        if not self.host_cache_off:
            return False, (f"{len(slots)} slots erased, but llama-server's host prompt cache (--cache-ram) keeps "
                           f"prompts and has no reset: llamacpp_server:cache_ram=0 turns it off")
        return True, f"{len(slots)} slots erased (POST /slots/N?action=erase); host prompt cache off"


def _llama_sampling(req: Request, body: dict[str, Any]) -> None:
    """llama.cpp's own sampling fields, so its defaults (top_k 40, min_p 0.05) are off as for every backend;
    ignore_eos is llama-server's own field too."""
    body["repeat_penalty"] = req.sampling.repetition_penalty
    body["top_k"] = 0
    body["min_p"] = 0.0


def get_json_list(url: str) -> list[dict[str, Any]] | None:
    """A JSON list from ``url`` (llama-server's /slots), None when it cannot be read."""
    import httpx

    try:
        resp = httpx.get(url, timeout=10)
        doc = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return doc if isinstance(doc, list) else None

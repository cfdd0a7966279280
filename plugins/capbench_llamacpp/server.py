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
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from capbench_core.backend import (
    UNKNOWN_SHAPE,
    Availability,
    Backend,
    EngineInfo,
    LoadShape,
    ModelRef,
    Request,
    Session,
    check_options,
)
from capbench_core.engines import Context, Device, Recipe, Step, home, installed
from capbench_core.errors import CapbenchError
from capbench_core.results import HardwareSpec
from capbench_llamacpp.backend import (
    OPTIONS,
    WEIGHT_DTYPE,
    gguf_context_length,
    gguf_dtype_options,
    gguf_options,
    repack_setting,
    resolve_gguf,
)

SOURCE_PACKAGE = "llama-cpp-python"
SOURCE_VERSION = "0.3.36"   # its sdist vendors llama.cpp; keep equal to the in-process backend's version
TOOLS = ("llama-server", "llama-bench")
#: The shared libraries llama-cpp-python loads (llama_cpp/lib), built with the tools.
LIBRARIES = ("llama", "ggml", "ggml-base", "ggml-cpu", "mtmd")
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# option -> (llama-server flag, help, check); check is a regex the value must match
PLACEMENT: dict[str, tuple[str, str, str]] = {
    "n_cpu_moe": ("--n-cpu-moe", "keep the MoE expert weights of the first N layers in host memory", r"\d+"),
    "override_tensor": ("--override-tensor", "tensor name pattern=buffer type,... (e.g. 'exps=CPU')", r".+=.+"),
    "n_gpu_layers": ("--n-gpu-layers", "layers stored in GPU memory (number, 'auto' or 'all')", r"\d+|auto|all"),
    "cache_type_k": ("--cache-type-k", f"K cache type ({', '.join(KV_TYPES)})", "|".join(KV_TYPES)),
    "cache_type_v": ("--cache-type-v", f"V cache type ({', '.join(KV_TYPES)})", "|".join(KV_TYPES)),
    "flash_attn": ("--flash-attn", "flash attention: on, off or auto", r"on|off|auto"),
    "ubatch_size": ("--ubatch-size", "physical batch size", r"\d+"),
}
SERVER_OPTIONS = {
    **OPTIONS,
    **{k: help_ for k, (_, help_, _) in PLACEMENT.items()},
    "endpoint": "attach to this running llama-server instead of launching one",
    "served_model": "model name on an attached server",
    "server_binary": "launch this llama-server instead of the llama.cpp engine environment's",
    "parallel": "slots decoded together (default: the run's highest concurrency)",
    "ctx_per_slot": "context per slot (default: the longest request, at most the model's training context)",
    "extra_args": "more llama-server flags, passed through verbatim (shell-quoted string)",
}


class LlamaCppRecipe(Recipe):
    name = "llama.cpp"
    description = "llama.cpp's llama-server and llama-bench, built from source"
    override_env = "CAPBENCH_LLAMA_SERVER"
    packages: dict[Device, str] = {"cpu": f"llama.cpp from {SOURCE_PACKAGE}=={SOURCE_VERSION} (sdist)",
                                   "cuda": f"llama.cpp from {SOURCE_PACKAGE}=={SOURCE_VERSION} (sdist, CUDA)"}

    def steps(self, device: Device) -> list[Step]:
        return [
            Step(f"fetch llama.cpp's source ({SOURCE_PACKAGE} {SOURCE_VERSION} sdist from PyPI)", 60, _fetch),
            Step("configure (CMake, native CPU ISA" + (", CUDA)" if device == "cuda" else ")"), 20, _configure),
            Step(f"compile {' and '.join(TOOLS)} and llama.cpp's shared libraries on {os.cpu_count()} cores", 360,
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


def server_binary(options: Mapping[str, Any]) -> tuple[Path, str] | str:
    """(llama-server to launch, where it came from), or why there is none."""
    explicit = str(options.get("server_binary") or os.environ.get(LlamaCppRecipe.override_env) or "")
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"{explicit} is not an executable llama-server"
        return path, f"user binary {explicit}"
    if installed(LlamaCppRecipe.name) is None:
        return ("llama.cpp's llama-server is not built here: run `capbench engines install llama.cpp` "
                f"(or point {LlamaCppRecipe.override_env} at your own llama-server)")
    return home(LlamaCppRecipe.name) / "bin" / "llama-server", f"environment {home(LlamaCppRecipe.name)}"


def bench_binary() -> Path | None:
    """llama-bench from the engine environment, when built."""
    path = home(LlamaCppRecipe.name) / "bin" / "llama-bench"
    return path if installed(LlamaCppRecipe.name) and path.is_file() else None


class LlamaCppServerBackend(Backend):
    name = "llamacpp_server"
    device = "cpu"
    engine_env = LlamaCppRecipe.name
    description = "llama.cpp's C++ llama-server (parallel slots, continuous batching), launched or attached"
    options = SERVER_OPTIONS

    def available(self) -> Availability:
        return self.available_for({})

    def dtype_options(self, dtype: str) -> dict[str, str] | None:
        return gguf_dtype_options(dtype)

    def available_for(self, options: Mapping[str, Any]) -> Availability:
        if options.get("endpoint"):
            return Availability.yes()
        found = server_binary(options)
        return Availability.no(found) if isinstance(found, str) else Availability.yes()

    def parse(self, options: Mapping[str, Any]) -> dict[str, Any]:
        check_options(self.name, options, self.options)
        for key, (_, _, pattern) in PLACEMENT.items():
            value = options.get(key)
            if value is not None and not re.fullmatch(pattern, str(value)):
                raise CapbenchError(f"llamacpp_server option {key}={value!r} is not valid: {PLACEMENT[key][1]}")
        return gguf_options({k: v for k, v in options.items() if k in OPTIONS}) | {
            k: v for k, v in options.items() if k not in OPTIONS}

    def argv(self, binary: Path, gguf: Path, port: int, opts: Mapping[str, Any], alias: str,
             shape: LoadShape) -> list[str]:
        import shlex

        parallel = int(opts.get("parallel") or shape.max_concurrency)
        per_slot = int(opts.get("ctx_per_slot") or opts.get("n_ctx") or shape.context_for(gguf_context_length(gguf))
                       or 512)
        threads = int(opts.get("threads") or len(os.sched_getaffinity(0)))
        kv = opts["kv_type"]
        argv = [str(binary), "--model", str(gguf), "--alias", alias, "--host", "127.0.0.1", "--port", str(port),
                "--parallel", str(parallel), "--ctx-size", str(parallel * per_slot), "--threads", str(threads),
                "--threads-batch", str(threads), "--batch-size", str(opts["n_batch"]),
                "--cache-type-k", str(opts.get("cache_type_k") or kv), "--cache-type-v",
                str(opts.get("cache_type_v") or kv), "--metrics", "--no-webui"]
        if not repack_setting(opts["repack"])[0]:
            argv.append("--no-repack")
        for key, (flag, _, _) in PLACEMENT.items():
            if key not in ("cache_type_k", "cache_type_v") and opts.get(key) is not None:
                argv += [flag, str(opts[key])]
        return argv + shlex.split(str(opts.get("extra_args") or ""))

    @contextmanager
    def start(self, model: ModelRef, hardware: HardwareSpec, options: Mapping[str, Any],
              shape: LoadShape = UNKNOWN_SHAPE) -> Iterator[Session]:
        from capbench_core.engine_metrics import EngineProbe
        from capbench_core.launcher import free_port, launch, run_log_dir
        from capbench_core.openai_client import attach, tokenizer_counter

        opts = self.parse(options)
        counter = tokenizer_counter(model.path)
        if opts.get("endpoint"):
            url, name = attach(opts, model.name)
            info = EngineInfo("llama.cpp server", "attached", {"endpoint": url, "served_model": name})
            yield _server_session(url, name, info, counter, EngineProbe(url, "llamacpp"))
            return
        found = server_binary(opts)
        if isinstance(found, str):
            raise CapbenchError(found)
        binary, origin = found
        gguf = resolve_gguf(model, opts)
        port = free_port()
        argv = self.argv(binary, gguf, port, opts, model.name, shape)
        record = installed(LlamaCppRecipe.name)
        with launch(argv, f"http://127.0.0.1:{port}", run_log_dir() / f"llamacpp_server-{port}.log", ("/health",),
                    timeout_s=float(opts.get("startup_timeout_s") or 300), label=self.name) as server:
            info = EngineInfo(
                "llama.cpp server", f"llama-server {record.version}" if record else "llama-server (user binary)",
                {"argv": argv, "log": str(server.log_path), "gguf": str(gguf),
                 "weight_dtype": WEIGHT_DTYPE[opts["gguf_type"]], "repack": repack_setting(opts["repack"])[1],
                 "placement": {k: opts[k] for k in PLACEMENT if opts.get(k) is not None}},
                package=record.package if record else None, package_version=record.version if record else None,
                variant="cpu", executable=str(binary),
                installed_from=origin)
            yield _server_session(server.base_url, model.name, info, counter,
                                  EngineProbe(server.base_url, "llamacpp"))


def _server_session(url: str, name: str, info: EngineInfo, counter: Callable[[str], int] | None,
                    probe: Any) -> Session:
    from capbench_core.openai_client import OpenAISession

    def adapt(req: Request, body: dict[str, Any]) -> None:
        # llama.cpp's own sampling fields, so its defaults (top_k 40, min_p 0.05) are off as for every
        # backend; ignore_eos is llama-server's own field too
        body["repeat_penalty"] = req.sampling.repetition_penalty
        body["top_k"] = 0
        body["min_p"] = 0.0

    return OpenAISession(url, name, info, counter, body_hook=adapt, probe=probe)

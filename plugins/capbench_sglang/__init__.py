"""Built-in `sglang` backend: `python -m sglang.launch_server ...` from its engine environment, or attached.

`capbench engines install sglang` puts SGLang in its own virtualenv. On a CUDA
machine that is `pip install sglang`. On CPU, a plain install would replace
torch with a CUDA build and ~30 CUDA packages, so the recipe installs SGLang
without its dependencies, then the set its CPU path really imports
(``CPU_REQUIREMENTS``), held to capbench's CPU torch pin, plus two small
files of its own (``cpu_shim/``): the sgl-kernel helpers SGLang's torch-native
CPU route calls, and start-up patches for a CPU-only torch.

Metrics are enabled (`--enable-metrics`) and the expert-distribution recorder
runs in `per_token` mode: capbench starts it before the measured window,
stops and dumps it after, and counts the distinct experts each MoE layer
activated in every **decode** pass (prefill passes are told apart by their
forward mode and left out). When attaching, pass `recorder_dir` (the
server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR) to get measured A.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from capbench_core import hookimpl
from capbench_core.contract.backend import LoadShape, ModelRef
from capbench_core.contract.engine_env import TORCH_CPU_PIN, Context, EngineDevice, Recipe, Step, venv_steps
from capbench_core.contract.options import flag, option
from capbench_core.contract.records import Placement
from capbench_core.contract.registry import BackendRegistry, EngineRegistry
from capbench_core.errors import CapbenchError
from capbench_core.serving.environments import Resolved
from capbench_core.serving.scrape import EngineProbe, ExpertRecorder, MetricTable
from capbench_core.serving.server_backend import (
    ServerBackend,
    ServerOptions,
    checkpoint_dtype,
    get_json,
    model_max_len,
    server_placement,
)

VERSION = "0.5.23"
SHIM = Path(__file__).resolve().parent / "cpu_shim"

# What SGLang 0.5.23's CPU path imports when it serves a Qwen3-MoE model through its OpenAI server,
# found by recording every module each of its processes imported (server, scheduler, detokenizer)
# while serving, streaming, scraping /metrics and recording experts, and keeping the distributions
# SGLang asks for that are among them. Versions are SGLang's own pins where it has one. Three are imported
# but not SGLang requirements (a full install brings them through other packages): triton (CUDA torch
# brings it; SGLang's KV-cache helpers import it at module level), dill and jsonschema.
# Everything else SGLang lists (flashinfer, sgl-kernel, deep-gemm, timm, datasets, modelscope,
# outlines, torchaudio, ...) is CUDA-only or unused here.
CPU_REQUIREMENTS = (
    "aiohttp", "apache-tvm-ffi==0.1.11", "compressed-tensors==0.18.0", "dill", "distro", "einops", "fastapi",
    "gguf", "IPython", "jsonschema", "msgspec", "numpy", "openai==2.8.0", "openai-harmony==0.0.4", "orjson",
    "packaging", "partial_json_parser", "pillow", "prometheus-client>=0.20.0", "psutil", "pybase64", "pydantic",
    "python-multipart", "pyzmq>=25.1.2", "regex", "requests", "sentencepiece==0.2.1", "setproctitle",
    "soundfile==0.13.1", "tokenizers==0.23.2", "tqdm", "transformers==5.19.0", "triton", "uvicorn>=0.51",
    "uvloop", "xgrammar==0.2.7",
)
# SGLang's model configs import torchvision (for vision models); PyPI's build is CUDA-only, so it goes in
# without dependencies and the shim's start-up patch lets it import beside the CPU torch.
NO_DEPS = ("torchvision==0.28.0",)
#: SGLang's own metric names (docs/engines.md gives the sources).
METRICS = MetricTable(
    engine="sglang",
    counters={"prompt_tokens": ("sglang:prompt_tokens_total",),
              "generation_tokens": ("sglang:generation_tokens_total",),
              "preemptions": ("sglang:num_retracted_requests_total",),
              "requests_finished": ("sglang:num_requests_total",),
              "prefix_cache_queries": ("sglang:prompt_tokens_total",),
              "prefix_cache_hits": ("sglang:cached_tokens_total",)},
    gauges={"requests_running": ("sglang:num_running_reqs",), "requests_waiting": ("sglang:num_queue_reqs",),
            "kv_cache_usage": ("sglang:token_usage",)},
    histograms={"server_ttft_ms_mean": ("sglang:time_to_first_token_seconds",),
                "server_tpot_ms_mean": ("sglang:inter_token_latency_seconds",
                                        "sglang:time_per_output_token_seconds"),
                "server_e2e_ms_mean": ("sglang:e2e_request_latency_seconds",)},
)
TORCH_NATIVE = "torch-native kernels (no sgl-kernel CPU ops; capbench stand-in for its helpers)"


class SGLangRecipe(Recipe):
    name = "sglang"
    description = "SGLang's server"
    override_env = "CAPBENCH_SGLANG_PYTHON"
    packages: dict[EngineDevice, str] = {"cpu": f"sglang=={VERSION}", "cuda": f"sglang=={VERSION}"}

    def steps(self, device: EngineDevice) -> list[Step]:
        package = self.packages[device]
        if device == "cuda":
            return [*venv_steps(device), Step(f"install {package}", 600, lambda c: c.pip("install", package))]
        return [
            *venv_steps(device),
            Step(f"install {package} without its CUDA dependencies", 10,
                 lambda c: c.pip("install", "--no-deps", package)),
            Step(f"install the {len(CPU_REQUIREMENTS)} packages its CPU path imports", 120, _cpu_requirements),
            Step("install torchvision without its CUDA torch", 10, lambda c: c.pip("install", "--no-deps", *NO_DEPS)),
            Step("add the CPU helpers and start-up patches (cpu_shim)", 1, _install_shim),
        ]

    def check(self, ctx: Context) -> tuple[str, str, str]:
        out = ctx.run([str(ctx.python), "-c", "import sglang.srt.entrypoints.http_server, sglang; "
                                              "print(sglang.__version__)"], env=cpu_env(ctx.device))
        variant = ctx.details.get("variant", "cuda" if ctx.device == "cuda" else TORCH_NATIVE)
        return "sglang", out.strip().splitlines()[-1], variant


def _cpu_requirements(ctx: Context) -> None:
    constraints = ctx.home / "constraints.txt"
    constraints.write_text(f"{TORCH_CPU_PIN}\n")
    ctx.pip("install", "-c", str(constraints), *CPU_REQUIREMENTS)


def refresh_shim(python: Path) -> None:
    """The start-up patches of this capbench into an SGLang environment it installed earlier (an environment
    kept from an older capbench would otherwise run older patches)."""
    site = sorted(python.absolute().parent.parent.glob("lib/python3*/site-packages"))
    if not site:
        return
    target = site[-1] / "sitecustomize.py"
    packaged = (SHIM / "sitecustomize.py").read_bytes()
    if not target.is_file() or target.read_bytes() != packaged:
        target.write_bytes(packaged)


def _install_shim(ctx: Context) -> None:
    """sitecustomize always; the sgl_kernel stand-in only where no real sgl-kernel is importable."""
    site = Path(ctx.run([str(ctx.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .strip())
    shutil.copy(SHIM / "sitecustomize.py", site / "sitecustomize.py")
    real = ctx.run([str(ctx.python), "-c", "import importlib.util as u; print(u.find_spec('sgl_kernel') is not None)"])
    if real.strip() == "True":
        ctx.details["variant"] = "sgl-kernel CPU ops"
        return
    shutil.copytree(SHIM / "sgl_kernel", site / "sgl_kernel", dirs_exist_ok=True)
    ctx.details["variant"] = TORCH_NATIVE


def recorder_unsupported(found: Resolved, model: ModelRef) -> str | None:
    """Why SGLang's expert-distribution recorder cannot run for this model, None when it can (or when the
    installation cannot be read to tell). The recorder needs ExpertLocationMetadata, which only model classes
    defining ``get_model_config_for_expert_location`` provide (SGLang asserts at start-up otherwise)."""
    from capbench_core.analytics.checkpoint import read_config

    try:
        archs = [str(a) for a in read_config(model.path).get("architectures") or []]
    except CapbenchError:
        return None
    site = sorted(Path(found.executable).absolute().parent.parent.glob("lib/python3*/site-packages/sglang/srt/models"))
    if not archs or not site:
        return None
    for file in site[-1].glob("*.py"):
        text = file.read_text(errors="replace")
        entry = text[text.rfind("EntryClass"):]
        if any(re.search(rf"\b{re.escape(a)}\b", entry) for a in archs):
            return None if "get_model_config_for_expert_location" in text else (
                f"SGLang's {file.stem} model provides no ExpertLocationMetadata, which its recorder needs; A is the "
                f"uniform-routing estimate")
    return None


def cpu_env(device: str) -> dict[str, str]:
    return {"SGLANG_USE_CPU_ENGINE": "1", "CAPBENCH_SGLANG_CPU_SHIM": "1"} if device == "cpu" else {}


class SGLangOptions(ServerOptions):
    """SGLang's own flags (docs/engines.md gives the sources); anything else goes through ``extra_args``."""

    dtype: str | None = flag("--dtype", "weights/activations dtype (default: the checkpoint's, e.g. bfloat16)")
    context_length: int | None = flag("--context-length", "context length (default: the run's longest prompt + "
                                                          "output, at most the model's)", ge=1)
    max_running_requests: int | None = flag("--max-running-requests", "max requests decoded together (default: "
                                            "the run's highest concurrency)", ge=1)
    max_total_tokens: int | None = flag("--max-total-tokens", "KV pool size in tokens (default: running requests "
                                        "x context, doubled)", ge=1)
    mem_fraction_static: float | None = flag("--mem-fraction-static", "share of GPU memory for weights and KV "
                                             "cache", gt=0, le=1)
    tp: int | None = flag("--tp-size", "tensor parallel size", ge=1)
    pp: int | None = flag("--pp-size", "pipeline parallel size", ge=1)
    dp: int | None = flag("--dp-size", "data parallel size", ge=1)
    ep: int | None = flag("--ep-size", "expert parallel size", ge=1)
    moe_a2a_backend: str | None = flag("--moe-a2a-backend", "EP dispatch/combine backend (none, deepep, mooncake, "
                                                           "...)")
    cpu_offload_gb: float | None = flag("--cpu-offload-gb", "GB of weights kept in host memory", ge=0)
    quantization: str | None = flag("--quantization", "quantisation method (fp8, awq, gptq, ...)")
    seed: int = flag("--random-seed", "engine seed", 0)
    recorder: str = flag("--expert-distribution-recorder-mode", "expert recorder mode (per_token: decode passes "
                         "told apart; stat; '' to disable)", "per_token")
    recorder_dir: str | None = option("attach only: the server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR")
    simulate_routing: Literal["uniform", "round-robin"] | None = option(
        "override the router with SGLang's balanced simulation (SGLANG_SIMULATE_UNIFORM_EXPERTS or "
        "_ROUND_ROBIN_EXPERTS; benchmark only, wrong tokens): real vs balanced routing on the same engine")


class SGLangBackend(ServerBackend):
    name = "sglang"
    description = "SGLang's server, launched from its engine environment (CPU or CUDA) or attached"
    module = "sglang"
    distributions = ("sglang",)
    cache_reset = "/flush_cache"
    recipe = SGLangRecipe()
    metrics = METRICS
    Options = SGLangOptions

    def argv(self, python: str, model: ModelRef, port: int, opts: Mapping[str, Any]) -> list[str]:
        head = [python, "-m", "sglang.launch_server", "--model-path", str(model.path), "--host",
                "127.0.0.1", "--port", str(port), "--served-model-name", str(opts.get("served_model") or model.name),
                "--enable-metrics", "--enable-cache-report"]  # cached_tokens in each response's usage
        if opts.get("device") == "cpu":
            # CPU: no CUDA graphs, and the scheduler runs without overlap (no second stream to overlap with)
            head += ["--device", "cpu", "--disable-cuda-graph", "--disable-overlap-schedule"]
        return head + self.flag_argv(opts)

    def settings(self, model: ModelRef, opts: Mapping[str, Any], shape: LoadShape,
                 found: Resolved) -> dict[str, Any]:
        """dtype from the checkpoint; context (the run's longest prompt + output, at most the model's) and batch
        from the run, and a KV pool sized for them (without it SGLang sizes the pool from free memory: ~15 GB and
        155 s of start-up here)."""
        if found.device == "cpu" and opts.get("simulate_routing"):
            raise CapbenchError("sglang:simulate_routing needs a CUDA device: SGLang's balanced-routing simulation is "
                                "a Triton kernel, which its CPU path cannot run ('0 active drivers'); "
                                "torch_moe:simulate_routing runs here")
        running = int(opts.get("max_running_requests") or shape.max_concurrency)
        context = int(opts.get("context_length") or shape.context_for(model_max_len(model)) or 0) or None
        out: dict[str, Any] = {"dtype": checkpoint_dtype(model), "max_running_requests": running,
                               "device": found.device}
        if context:
            out["context_length"] = context
            out["max_total_tokens"] = 2 * running * context
        missing = recorder_unsupported(found, model)
        if missing and opts.get("recorder"):
            out["recorder"], out["recorder_off"] = "", f"off: {missing}"
        return out

    def env(self, opts: Mapping[str, Any], run_dir: Path, found: Resolved) -> dict[str, str]:
        if found.device == "cpu" and found.origin.startswith("environment"):
            refresh_shim(Path(found.executable))
        simulate = {"uniform": {"SGLANG_SIMULATE_UNIFORM_EXPERTS": "1"},
                    "round-robin": {"SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS": "1"}}.get(opts.get("simulate_routing") or "")
        return {"SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": str(run_dir / "experts"), **cpu_env(found.device),
                **(simulate or {})}

    def launch_record(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        return {"expert_recorder": opts.get("recorder") or opts.get("recorder_off", "off")}

    def probe(self, base_url: str, opts: Mapping[str, Any], run_dir: Path | None) -> EngineProbe:
        directory = run_dir / "experts" if run_dir else (Path(opts["recorder_dir"]) if opts.get("recorder_dir")
                                                         else None)
        recorder = ExpertRecorder(base_url, directory) if directory and opts.get("recorder") else None
        return EngineProbe(base_url, self.metrics, recorder)

    def variant(self, found: Resolved, log: Path) -> str:
        """The installed variant, confirmed by SGLang's own start-up line where it says which backend it took."""
        text = log.read_text(errors="replace") if log.is_file() else ""
        if found.device == "cpu" and "using torch native backend" in text:
            return TORCH_NATIVE if found.variant in ("cpu", TORCH_NATIVE) else f"{found.variant}; torch native backend"
        return found.variant

    def placement(self, options: Mapping[str, Any]) -> Placement:
        """From tp/pp/dp, --ep-size, --moe-a2a-backend and --cpu-offload-gb."""
        return server_placement(self, options, ep=int(options.get("ep") or 1),
                                a2a=options.get("moe_a2a_backend") or "none")

    def kv_capacity(self, base_url: str, opts: Mapping[str, Any]) -> int | None:
        """SGLang's own KV pool size in tokens (its server info, or the sglang:max_total_num_tokens gauge)."""
        from capbench_core.serving.scrape import ScrapeError, scrape

        doc = get_json(base_url + "/server_info") or get_json(base_url + "/get_server_info") or {}
        tokens = doc.get("max_total_num_tokens")
        if tokens is None:
            try:
                tokens = scrape(base_url).get("sglang:max_total_num_tokens")
            except ScrapeError:
                return None
        return int(tokens) if tokens else None

    def reported_dtype(self, base_url: str) -> str | None:
        """An attached SGLang says its --dtype in its server info (``auto``: not said)."""
        doc = get_json(base_url + "/server_info") or get_json(base_url + "/get_server_info")
        dtype = doc.get("dtype") if doc else None
        return str(dtype) if dtype and dtype != "auto" else None

    def version(self, base_url: str) -> str:
        doc = get_json(base_url + "/server_info") or get_json(base_url + "/get_server_info")
        return f"sglang {doc['version']}" if doc and "version" in doc else "sglang (server_info unavailable)"


@hookimpl
def register_backends(register: BackendRegistry) -> None:
    register.add_backend(SGLangBackend())


@hookimpl
def register_engines(register: EngineRegistry) -> None:
    register.add_engine(SGLangRecipe())

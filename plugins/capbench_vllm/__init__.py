"""Built-in `vllm` backend: `vllm serve MODEL ...` launched through the shared launcher, or attached.

Flags are vLLM's own (see docs/engines.md for the sources); anything else goes
through `extra_args` verbatim and is recorded with the run. Expert activation:
vLLM reports routed experts only on non-streaming responses
(`--enable-return-routed-experts`), so for streamed load A is the
uniform-routing estimate and is labelled `estimated`.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capbench_core import hookimpl
from capbench_core.backend import ModelRef
from capbench_core.plugins import BackendRegistry
from capbench_core.server_backend import ServerBackend, get_json


class VLLMBackend(ServerBackend):
    name = "vllm"
    description = "vLLM's OpenAI server (vllm serve), launched or attached; needs a CUDA GPU"
    module = "vllm"
    install_hint = "pip install 'capbench[vllm]' on a machine with an NVIDIA GPU"
    flavor = "vllm"
    flags = {
        "dtype": ("--dtype", "weights/activations dtype (auto, bfloat16, float16)"),
        "max_model_len": ("--max-model-len", "context length"),
        "max_num_seqs": ("--max-num-seqs", "max sequences per batch"),
        "gpu_memory_utilization": ("--gpu-memory-utilization", "share of GPU memory vLLM may use (0.9)"),
        "tp": ("--tensor-parallel-size", "tensor parallel size"),
        "pp": ("--pipeline-parallel-size", "pipeline parallel size"),
        "dp": ("--data-parallel-size", "data parallel size"),
        "enable_expert_parallel": ("--enable-expert-parallel!", "expert parallelism for MoE layers (true/false)"),
        "quantization": ("--quantization", "quantisation method (fp8, awq, gptq, ...)"),
        "kv_cache_dtype": ("--kv-cache-dtype", "KV cache dtype"),
        "enforce_eager": ("--enforce-eager!", "disable CUDA graphs (true/false)"),
        "seed": ("--seed", "engine seed (default 0)"),
    }
    defaults = {"seed": 0}

    def argv(self, model: ModelRef, port: int, opts: Mapping[str, Any]) -> list[str]:
        exe = shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm"
        head = [exe, "serve", str(model.path), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", str(opts.get("served_model") or model.name)]
        return head + super().argv(model, port, opts)

    def version(self, base_url: str) -> str:
        doc = get_json(base_url + "/version")
        return f"vllm {doc['version']}" if doc and "version" in doc else "vllm (version endpoint unavailable)"


@hookimpl
def register_backends(register: BackendRegistry) -> None:
    register.add_backend(VLLMBackend())

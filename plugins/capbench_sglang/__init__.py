"""Built-in `sglang` backend: `python -m sglang.launch_server ...`, launched or attached.

Metrics are enabled (`--enable-metrics`) and the expert-distribution recorder
runs in `stat` mode: capbench starts it before the measured window, stops and
dumps it after, and reads the dump (a torch file in
SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR) for the **measured** number of
distinct experts per layer per forward pass. When attaching, pass
`recorder_dir` (the server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR) to get
measured A; without it A is the uniform-routing estimate.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capbench_core import hookimpl
from capbench_core.backend import ModelRef
from capbench_core.engine_metrics import EngineProbe, ExpertRecorder
from capbench_core.plugins import BackendRegistry
from capbench_core.server_backend import ServerBackend, get_json


class SGLangBackend(ServerBackend):
    name = "sglang"
    description = "SGLang's server (python -m sglang.launch_server), launched or attached; needs a CUDA GPU"
    module = "sglang"
    install_hint = "pip install 'capbench[sglang]' on a machine with an NVIDIA GPU"
    flavor = "sglang"
    flags = {
        "dtype": ("--dtype", "weights/activations dtype (auto, bfloat16, float16)"),
        "context_length": ("--context-length", "context length"),
        "max_running_requests": ("--max-running-requests", "max requests decoded together"),
        "mem_fraction_static": ("--mem-fraction-static", "share of GPU memory for weights and KV cache"),
        "tp": ("--tp-size", "tensor parallel size"),
        "pp": ("--pp-size", "pipeline parallel size"),
        "dp": ("--dp-size", "data parallel size"),
        "ep": ("--ep-size", "expert parallel size"),
        "quantization": ("--quantization", "quantisation method (fp8, awq, gptq, ...)"),
        "seed": ("--random-seed", "engine seed (default 0)"),
        "recorder": ("--expert-distribution-recorder-mode", "expert recorder mode (default stat; '' to disable)"),
        "recorder_dir": ("", "attach only: the server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"),
    }
    defaults = {"seed": 0, "recorder": "stat"}

    def argv(self, model: ModelRef, port: int, opts: Mapping[str, Any]) -> list[str]:
        head = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model.path), "--host",
                "127.0.0.1", "--port", str(port), "--served-model-name", str(opts.get("served_model") or model.name),
                "--enable-metrics"]
        rest = {k: v for k, v in opts.items() if k != "recorder_dir"}
        return head + super().argv(model, port, rest)

    def env(self, opts: Mapping[str, Any], run_dir: Path) -> dict[str, str]:
        return {"SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": str(run_dir / "experts")}

    def probe(self, base_url: str, opts: Mapping[str, Any], run_dir: Path | None) -> EngineProbe:
        directory = run_dir / "experts" if run_dir else (Path(opts["recorder_dir"]) if opts.get("recorder_dir")
                                                         else None)
        recorder = ExpertRecorder(base_url, directory) if directory and opts.get("recorder") else None
        return EngineProbe(base_url, self.flavor, recorder)

    def version(self, base_url: str) -> str:
        doc = get_json(base_url + "/server_info") or get_json(base_url + "/get_server_info")
        return f"sglang {doc['version']}" if doc and "version" in doc else "sglang (server_info unavailable)"


@hookimpl
def register_backends(register: BackendRegistry) -> None:
    register.add_backend(SGLangBackend())

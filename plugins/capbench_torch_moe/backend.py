"""The torch_moe Backend: loads a Hub-layout checkpoint into the plain-PyTorch engine."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from capbench_core.analytics.checkpoint import max_context, stored_dtype
from capbench_core.contract.backend import (
    UNKNOWN_SHAPE,
    Availability,
    Backend,
    EngineInfo,
    LoadShape,
    ModelRef,
    Session,
)
from capbench_core.contract.options import BackendOptions, option
from capbench_core.contract.records import HardwareSpec
from capbench_core.errors import CapbenchError

DTYPES = ("float32", "bfloat16")


class TorchMoEOptions(BackendOptions):
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "weight and activation dtype (auto: the checkpoint's own, as its weights are stored)", "auto")
    max_batch: int | None = option("sequences decoded together (default: the run's highest concurrency)", ge=1)
    max_model_len: int | None = option("KV cache length per sequence (default: the run's longest prompt + "
                                       "output, at most the model's)", ge=1)
    threads: int | None = option("torch threads (default: all cores)", ge=1)
    device: str = option("where the model, KV cache and batching run: cpu, cuda or cuda:N", "cpu",
                         pattern=r"^(cpu|cuda(:\d+)?)$")
    simulate_routing: Literal["uniform", "round-robin"] | None = option(
        "replace the router's picks by a balanced assignment, as SGLang's SGLANG_SIMULATE_UNIFORM_EXPERTS / "
        "_ROUND_ROBIN_EXPERTS (benchmark only, wrong tokens): real vs balanced routing on the same engine")


def served_dtype(model: ModelRef, asked: str) -> str:
    """``auto``: the dtype the checkpoint stores its weights in (float32 stays float32, bfloat16 stays bfloat16;
    anything else, e.g. float16 or quantized, runs in bfloat16)."""
    if asked != "auto":
        return asked
    stored = stored_dtype(model.path)
    return stored if stored in DTYPES else "bfloat16"


class TorchMoEBackend(Backend):
    name = "torch_moe"
    device = "cpu"  # S-MBU/S-MFU use the host CPU's peaks
    description = "raw PyTorch MoE execution (continuous batching, router instrumentation)"
    Options = TorchMoEOptions

    def device_for(self, options: Mapping[str, Any]) -> Literal["cpu", "accelerator"]:
        return "cpu" if str(options.get("device") or "cpu") == "cpu" else "accelerator"

    def dtype_options(self, dtype: str) -> dict[str, str] | None:
        return {"dtype": dtype} if dtype in DTYPES else None

    def planned_dtype(self, model: ModelRef, options: Mapping[str, Any]) -> str | None:
        return served_dtype(model, str(options.get("dtype") or "auto")) if model.path.is_dir() else None

    def available(self) -> Availability:
        if importlib.util.find_spec("torch") is None:
            return Availability.no("torch is not installed (pip install torch, then capbench[torch])")
        return Availability.yes()

    @contextmanager
    def start(self, model: ModelRef, hardware: HardwareSpec, options: Mapping[str, Any],
              shape: LoadShape = UNKNOWN_SHAPE) -> Iterator[Session]:
        import torch
        from tokenizers import Tokenizer

        from capbench_torch_moe.engine import Engine, TorchMoESession
        from capbench_torch_moe.loading import load_hf
        from capbench_torch_moe.model import simulate_routing

        opts = self.validate_options(options)
        if model.path.suffix == ".gguf":
            raise CapbenchError("torch_moe loads safetensors checkpoints, and this model is a GGUF file (llamacpp and "
                                "llamacpp_server serve it)")
        if opts["device"] != "cpu" and not torch.cuda.is_available():
            raise CapbenchError(f"torch_moe device={opts['device']}: torch {torch.__version__} sees no CUDA device "
                                f"(run on a machine with an NVIDIA GPU and a CUDA build of torch, or use device=cpu)")
        opts["dtype"] = served_dtype(model, opts["dtype"])
        opts["max_batch"] = opts["max_batch"] or shape.max_concurrency
        opts["max_model_len"] = opts["max_model_len"] or shape.context_for(max_context(model))
        tok_file = model.path / "tokenizer.json"
        if not tok_file.is_file():
            raise CapbenchError(f"{tok_file} is missing: torch_moe needs the model's tokenizer.json")
        dtype = getattr(torch, opts["dtype"])
        engine = Engine(lambda: simulate_routing(load_hf(model.path, dtype=dtype, device=opts["device"]),
                                                 opts["simulate_routing"]),
                        Tokenizer.from_file(str(tok_file)),
                        opts["max_batch"], opts["max_model_len"], opts["threads"])
        info = EngineInfo("torch_moe", f"torch {torch.__version__}",
                          {**opts, "max_model_len": engine.max_model_len, "threads": engine.threads},
                          weight_dtype=opts["dtype"])
        try:
            session = TorchMoESession(engine, info, model.path)
            session.kv_capacity_tokens = engine.cache.slots * engine.cache.max_len
            yield session
        finally:
            engine.close()

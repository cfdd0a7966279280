"""The torch_moe Backend: loads a Hub-layout checkpoint into the plain-PyTorch engine."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from capbench_core.backend import (
    UNKNOWN_SHAPE,
    Availability,
    Backend,
    EngineInfo,
    LoadShape,
    ModelRef,
    Session,
    check_options,
)
from capbench_core.errors import CapbenchError
from capbench_core.results import HardwareSpec

DTYPES = ("float32", "bfloat16")
DEFAULTS: dict[str, Any] = {"dtype": "float32", "max_batch": 64, "max_model_len": None, "threads": None}


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    check_options("torch_moe", options, DEFAULTS)
    merged = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if merged["dtype"] not in DTYPES:
        raise CapbenchError(f"torch_moe dtype={merged['dtype']!r} is not supported; use one of {', '.join(DTYPES)}")
    for key in ("max_batch", "max_model_len", "threads"):
        if merged[key] is not None:
            merged[key] = int(merged[key])
    return merged


class TorchMoEBackend(Backend):
    name = "torch_moe"
    device = "cpu"  # S-MBU/S-MFU use the host CPU's peaks
    description = "raw PyTorch MoE execution (continuous batching, router instrumentation)"
    options = {"dtype": "float32 | bfloat16 (default float32)", "max_batch": "sequences decoded together (64)",
               "max_model_len": "KV cache length per sequence (default: the model's, at most 4096)",
               "threads": "torch threads (default: all cores)"}

    def dtype_options(self, dtype: str) -> dict[str, str] | None:
        return {"dtype": dtype} if dtype in DTYPES else None

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
        from capbench_torch_moe.model import load_hf

        opts = _options(options)
        tok_file = model.path / "tokenizer.json"
        if not tok_file.is_file():
            raise CapbenchError(f"{tok_file} is missing: torch_moe needs the model's tokenizer.json")
        dtype = getattr(torch, opts["dtype"])
        engine = Engine(lambda: load_hf(model.path, dtype=dtype), Tokenizer.from_file(str(tok_file)),
                        opts["max_batch"], opts["max_model_len"], opts["threads"])
        info = EngineInfo("torch_moe", f"torch {torch.__version__}",
                          {**opts, "max_model_len": engine.max_model_len, "threads": engine.threads,
                           "weight_dtype": opts["dtype"]})
        try:
            yield TorchMoESession(engine, info)
        finally:
            engine.close()

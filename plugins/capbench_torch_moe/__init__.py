"""Built-in `torch_moe` backend: raw PyTorch MoE execution, plus the embedded tiny MoE.

Registers the backend, the `tiny-moe` model and the `capbench model build-tiny`
command. torch is imported only when the backend starts or a model is built.
"""

from __future__ import annotations

from typing import Any

from capbench_core import hookimpl
from capbench_core.backend import ModelRef
from capbench_core.plugins import BackendRegistry, ModelRegistry
from capbench_torch_moe.backend import TorchMoEBackend
from capbench_torch_moe.commands import build_tiny_command, tiny_model_dir


@hookimpl
def register_backends(register: BackendRegistry) -> None:
    register.add_backend(TorchMoEBackend())


@hookimpl
def register_models(register: ModelRegistry) -> None:
    register.add_model(ModelRef(
        name="tiny-moe", path=tiny_model_dir(),
        description="embedded Qwen3-MoE layout, 8 experts top-2, trained on 3-digit addition",
        default_task="arith"))


@hookimpl
def register_commands(cli: Any) -> None:
    cli.commands["model"].add_command(build_tiny_command)

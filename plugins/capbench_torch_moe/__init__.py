"""Built-in `torch_moe` backend: raw PyTorch MoE execution, plus the embedded tiny MoE.

Registers the backend, the `tiny-moe` model, a random-init model builder (the
sparsity study's members) and the `capbench model build-tiny` command. torch is
imported only when the backend starts or a model is built.
"""

from __future__ import annotations

from typing import Any

from capbench_core import hookimpl
from capbench_core.contract.backend import ModelRef
from capbench_core.contract.registry import BackendRegistry, ModelRegistry
from capbench_torch_moe.backend import TorchMoEBackend
from capbench_torch_moe.commands import build_tiny_command, tiny_model_dir
from capbench_torch_moe.random_init import make_checkpoint


@hookimpl
def register_backends(register: BackendRegistry) -> None:
    register.add_backend(TorchMoEBackend())


@hookimpl
def register_models(register: ModelRegistry) -> None:
    register.add_model(ModelRef(
        name="tiny-moe", path=tiny_model_dir(),
        description="embedded Qwen3-MoE layout, 8 experts top-2, trained on 3-digit addition",
        default_task="arith"))
    register.add_builder(make_checkpoint)


@hookimpl
def register_commands(cli: Any) -> None:
    cli.add_command(build_tiny_command, group="model")

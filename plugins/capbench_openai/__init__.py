"""Built-in `openai` backend: measure any running OpenAI-compatible endpoint.

    capbench run --backend openai --endpoint http://127.0.0.1:8000 --served-model NAME --model DIR

``--model`` names the checkpoint the server serves (for analytics and, when it
has tokenizer.json, token counting where the server sends no usage block).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from capbench_core import hookimpl
from capbench_core.contract.backend import (
    UNKNOWN_SHAPE,
    Availability,
    Backend,
    EngineInfo,
    LoadShape,
    ModelRef,
    Session,
)
from capbench_core.contract.options import option
from capbench_core.contract.records import HardwareSpec
from capbench_core.contract.registry import BackendRegistry
from capbench_core.errors import CapbenchError
from capbench_core.serving.server_backend import EndpointOptions


class OpenAIOptions(EndpointOptions):
    api_key: str | None = option("bearer token, if the server needs one")
    dtype: str | None = option("the weight dtype the server holds (bfloat16, q8_0, ...), for S-MBU/S-MFU; unknown "
                               "(and they null) when not given")


class OpenAIBackend(Backend):
    name = "openai"
    description = "any running OpenAI-compatible server (attach with --endpoint)"
    needs_endpoint = True
    Options = OpenAIOptions

    def available(self) -> Availability:
        return Availability.yes()

    @contextmanager
    def start(self, model: ModelRef, hardware: HardwareSpec, options: Mapping[str, Any],
              shape: LoadShape = UNKNOWN_SHAPE) -> Iterator[Session]:
        from capbench_core.serving.openai_client import OpenAISession, check_endpoint, tokenizer_counter

        options = self.validate_options(options)
        endpoint = options.get("endpoint")
        if not endpoint:
            raise CapbenchError("the openai backend needs --endpoint URL (a running OpenAI-compatible server)")
        served = check_endpoint(str(endpoint))
        name = str(options.get("served_model") or (served[0] if served else model.name))
        if served and name not in served:
            raise CapbenchError(f"{endpoint} does not serve '{name}'; it serves: {', '.join(served)}")
        info = EngineInfo("openai-compatible", "attached", {"endpoint": endpoint, "served_model": name},
                          weight_dtype=options.get("dtype"))
        yield OpenAISession(str(endpoint), name, info, tokenizer_counter(model.path), options.get("api_key"))


@hookimpl
def register_backends(register: BackendRegistry) -> None:
    register.add_backend(OpenAIBackend())

"""What every GPU server backend (vLLM, SGLang) shares: options, availability, launch or attach.

A subclass names its engine module, its options (each mapped to the engine's
own flag), how to build argv and where to read the version; this class
checks the engine is installed and a CUDA GPU with room for the weights is
there, launches it through the shared launcher (or attaches with
``endpoint``), and wires the OpenAI client and the engine probe.
"""

from __future__ import annotations

import importlib.util
import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from capbench_core.backend import Availability, EngineInfo, ModelRef, Session, check_options
from capbench_core.engine_metrics import EngineProbe
from capbench_core.errors import CapbenchError
from capbench_core.results import HardwareSpec

COMMON_OPTIONS = {
    "endpoint": "attach to this running server instead of launching one",
    "served_model": "model name on the server (default: the model's name)",
    "extra_args": "more engine flags, passed through verbatim (shell-quoted string)",
    "startup_timeout_s": "seconds to wait for the engine to become ready (default 900)",
}


def cuda_gpus() -> list[tuple[str, int]]:
    """(name, memory bytes) of visible NVIDIA GPUs, through NVML; [] when none or no NVML."""
    from capbench_hw.nvidia import probe_nvidia

    return [(d.model, d.memory_bytes or 0) for d in probe_nvidia() for _ in range(d.count)]


class ServerBackend:
    name = ""
    description = ""
    module = ""            # the engine's Python package
    install_hint = ""
    flavor = ""            # engine_metrics flavor
    flags: dict[str, tuple[str, str]] = {}  # option -> (engine flag, help); "store_true" flags end in "!"
    defaults: dict[str, Any] = {}
    health_paths: tuple[str, ...] = ("/health",)

    @property
    def options(self) -> dict[str, str]:
        return {**COMMON_OPTIONS, **{k: help_ for k, (_, help_) in self.flags.items()}}

    def available(self) -> Availability:
        if importlib.util.find_spec(self.module) is None:
            return Availability.no(f"the {self.module} package is not installed ({self.install_hint})")
        if not cuda_gpus():
            return Availability.no(f"{self.name} needs a CUDA GPU and none is visible on this machine")
        return Availability.yes()

    def available_for(self, options: Mapping[str, Any]) -> Availability:
        """Attaching needs neither the engine nor a GPU here."""
        return Availability.yes() if options.get("endpoint") else self.available()

    def parse(self, options: Mapping[str, Any]) -> dict[str, Any]:
        check_options(self.name, options, self.options)
        return {**self.defaults, **options}

    def argv(self, model: ModelRef, port: int, opts: Mapping[str, Any]) -> list[str]:
        """The engine's real command line; subclasses add their head (`vllm serve M` ...)."""
        out: list[str] = []
        for key, (flag, _) in self.flags.items():
            value = opts.get(key)
            if not flag or value is None or value == "":
                continue
            if flag.endswith("!"):
                if str(value).lower() in ("1", "true", "yes", "on"):
                    out.append(flag[:-1])
                continue
            out += [flag, str(value)]
        return out + shlex.split(str(opts.get("extra_args") or ""))

    def check_memory(self, model: ModelRef, opts: Mapping[str, Any]) -> None:
        """Refuse early when the weights cannot fit the GPUs the run would use."""
        from capbench_core.model_spec import spec_from_path

        gpus = cuda_gpus()
        if not gpus:
            return
        try:
            spec = spec_from_path(model.path, model.name)
        except CapbenchError:
            return
        used = int(opts.get("tp") or 1) * int(opts.get("pp") or 1)
        capacity = sum(mem for _, mem in gpus[:used])
        need = spec.weight_bytes("bfloat16")
        if need > capacity:
            raise CapbenchError(
                f"{self.name}: {model.name} needs {need / 1e9:.1f} GB for bf16 weights alone, more than the "
                f"{capacity / 1e9:.1f} GB of {used} x {gpus[0][0]}; raise tp or use a quantised checkpoint")

    def version(self, base_url: str) -> str:
        return "unknown"

    def env(self, opts: Mapping[str, Any], run_dir: Path) -> dict[str, str]:
        return {}

    def probe(self, base_url: str, opts: Mapping[str, Any], run_dir: Path | None) -> EngineProbe:
        return EngineProbe(base_url, self.flavor)

    @contextmanager
    def start(self, model: ModelRef, hardware: HardwareSpec, options: Mapping[str, Any]) -> Iterator[Session]:
        from capbench_core.launcher import free_port, launch, run_log_dir
        from capbench_core.openai_client import OpenAISession, check_endpoint, tokenizer_counter

        opts = self.parse(options)
        counter = tokenizer_counter(model.path)
        if opts.get("endpoint"):
            url = str(opts["endpoint"]).rstrip("/")
            served = check_endpoint(url)
            name = str(opts.get("served_model") or (served[0] if served else model.name))
            info = EngineInfo(self.name, self.version(url), {"endpoint": url, "served_model": name,
                                                               "weight_dtype": "bfloat16"})
            yield OpenAISession(url, name, info, counter, probe=self.probe(url, opts, None))
            return
        self.check_memory(model, opts)
        port = free_port()
        argv = self.argv(model, port, opts)
        run_dir = run_log_dir() / f"{self.name}-{port}"
        run_dir.mkdir(parents=True, exist_ok=True)
        url = f"http://127.0.0.1:{port}"
        with launch(argv, url, run_dir / "engine.log", self.health_paths,
                    timeout_s=float(opts.get("startup_timeout_s") or 900), env=self.env(opts, run_dir)) as server:
            info = EngineInfo(self.name, self.version(url), {"argv": argv, "log": str(server.log_path),
                                                               "weight_dtype": "bfloat16"})
            name = str(opts.get("served_model") or model.name)
            yield OpenAISession(url, name, info, counter, probe=self.probe(url, opts, run_dir))


def get_json(url: str) -> dict[str, Any] | None:
    import httpx

    try:
        resp = httpx.get(url, timeout=10)
        return resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None

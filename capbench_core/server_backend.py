"""What every Python server engine (vLLM, SGLang) shares: options, availability, launch or attach.

A subclass names its engine recipe (the environment it launches from), its
options (each mapped to the engine's own flag), how to build argv and the
environment variables, and where to read the version. This class resolves
the engine's interpreter (``python=`` option, an environment variable, or the
installed engine environment), says in one sentence why it cannot run when it
cannot, launches the server through the shared launcher (or attaches with
``endpoint``), and wires the OpenAI client and the engine probe.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from capbench_core import engines
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
from capbench_core.engine_metrics import EngineProbe
from capbench_core.errors import CapbenchError
from capbench_core.results import HardwareSpec

COMMON_OPTIONS = {
    "endpoint": "attach to this running server instead of launching one",
    "served_model": "model name on the server (default: the model's name)",
    "python": "launch the engine with this interpreter (your own installation) instead of its environment",
    "extra_args": "more engine flags, passed through verbatim (shell-quoted string)",
    "startup_timeout_s": "seconds to wait for the engine to become ready (default 900)",
}


def cuda_gpus() -> list[tuple[str, int]]:
    """(name, memory bytes) of visible NVIDIA GPUs, through NVML; [] when none or no NVML."""
    from capbench_hw.nvidia import probe_nvidia

    return [(d.model, d.memory_bytes or 0) for d in probe_nvidia() for _ in range(d.count)]


def model_max_len(model: ModelRef) -> int | None:
    """The checkpoint's own context limit (``max_position_embeddings``), if it states one."""
    from capbench_core.model_spec import load_config

    try:
        value = load_config(model.path).get("max_position_embeddings")
    except CapbenchError:
        return None
    return int(value) if value else None


def checkpoint_dtype(model: ModelRef) -> str:
    """The dtype the checkpoint stores (``torch_dtype``/``dtype`` in config.json), bfloat16 when unsaid."""
    from capbench_core.model_spec import load_config

    try:
        config = load_config(model.path)
    except CapbenchError:
        return "bfloat16"
    return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")


class ServerBackend(Backend):
    module = ""            # the engine's Python package
    distributions: tuple[str, ...] = ()  # its distribution names, CPU build first
    recipe: engines.Recipe
    flavor = ""            # engine_metrics flavor
    flags: dict[str, tuple[str, str]] = {}  # option -> (engine flag, help); "store_true" flags end in "!"
    defaults: dict[str, Any] = {}
    health_paths: tuple[str, ...] = ("/health",)

    @property
    def engine_env(self) -> str | None:  # type: ignore[override]
        return self.recipe.name

    @property
    def options(self) -> dict[str, str]:  # type: ignore[override]
        return {**COMMON_OPTIONS, **{k: help_ for k, (_, help_) in self.flags.items()}}

    @property
    def device(self) -> Literal["cpu", "accelerator"]:  # type: ignore[override]
        """cpu when the engine that would run is a CPU build (its S-MBU/S-MFU use the host's peaks)."""
        found = self.resolve({})
        return "cpu" if isinstance(found, engines.Resolved) and found.device == "cpu" else "accelerator"

    def probe_python(self, python: str) -> engines.Resolved | str:
        """What a user-given interpreter would run: its package, version and device."""
        found = engines.python_package(python, self.distributions)
        if found is None:
            return f"{python} has none of {', '.join(self.distributions)} installed"
        package, version = found
        device: engines.Device = "cpu" if package == self.distributions[0] else "cuda"
        return engines.Resolved(python, package, version, device, device, "")

    def resolve(self, options: Mapping[str, Any]) -> engines.Resolved | str:
        return engines.resolve(self.recipe, options, self.probe_python)

    def available(self) -> Availability:
        return self.available_for({})

    def available_for(self, options: Mapping[str, Any]) -> Availability:
        """Attaching needs nothing here; launching needs the engine, and a GPU for its CUDA build."""
        if options.get("endpoint"):
            return Availability.yes()
        found = self.resolve(options)
        if isinstance(found, str):
            return Availability.no(found)
        if found.device == "cuda" and not cuda_gpus():
            return Availability.no(
                f"{found.package} {found.version} is the CUDA build and no CUDA GPU is visible on this machine "
                f"(for this CPU: capbench engines install {self.recipe.name} --device cpu)")
        return Availability.yes()

    def dtype_options(self, dtype: str) -> dict[str, str] | None:
        return {"dtype": dtype}

    def parse(self, options: Mapping[str, Any]) -> dict[str, Any]:
        check_options(self.name, options, self.options)
        return {**self.defaults, **options}

    def flag_argv(self, opts: Mapping[str, Any]) -> list[str]:
        """The engine flags of the options that map to one, then ``extra_args`` verbatim."""
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

    def argv(self, python: str, model: ModelRef, port: int, opts: Mapping[str, Any]) -> list[str]:
        """The engine's real command line; subclasses put their head before ``flag_argv``."""
        raise NotImplementedError

    def settings(self, model: ModelRef, opts: Mapping[str, Any], shape: LoadShape,
                 found: engines.Resolved) -> dict[str, Any]:
        """Options the run decides (dtype, context, batch, KV space) where the user did not."""
        return {}

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

    def env(self, opts: Mapping[str, Any], run_dir: Path, found: engines.Resolved) -> dict[str, str]:
        return {}

    def probe(self, base_url: str, opts: Mapping[str, Any], run_dir: Path | None) -> EngineProbe:
        return EngineProbe(base_url, self.flavor)

    def session(self, url: str, name: str, info: EngineInfo, counter: Any, probe: EngineProbe,
                opts: Mapping[str, Any]) -> Session:
        """The session over the launched or attached server (an engine may add what only it offers)."""
        from capbench_core.openai_client import OpenAISession

        return OpenAISession(url, name, info, counter, probe=probe)

    def variant(self, found: engines.Resolved, log: Path) -> str:
        """How the engine ran (kernels, build), from its installation and its start-up log."""
        return found.variant

    @contextmanager
    def start(self, model: ModelRef, hardware: HardwareSpec, options: Mapping[str, Any],
              shape: LoadShape = UNKNOWN_SHAPE) -> Iterator[Session]:
        from capbench_core.launcher import free_port, launch, run_log_dir
        from capbench_core.openai_client import attach, tokenizer_counter

        opts = self.parse(options)
        counter = tokenizer_counter(model.path)
        if opts.get("endpoint"):
            url, name = attach(opts, model.name)
            dtype = str(opts.get("dtype") or checkpoint_dtype(model))  # engines serve the checkpoint's by default
            info = EngineInfo(self.name, self.version(url), {"endpoint": url, "served_model": name,
                                                               "weight_dtype": dtype})
            yield self.session(url, name, info, counter, self.probe(url, opts, None), opts)
            return
        found = self.resolve(opts)
        if isinstance(found, str):
            raise CapbenchError(found)
        opts = {**self.settings(model, opts, shape, found), **opts}
        self.check_memory(model, opts)
        port = free_port()
        argv = self.argv(found.executable, model, port, opts)
        run_dir = run_log_dir() / f"{self.name}-{port}"
        run_dir.mkdir(parents=True, exist_ok=True)
        env = self.env(opts, run_dir, found)
        with launch(argv, f"http://127.0.0.1:{port}", run_dir / "engine.log", self.health_paths,
                    timeout_s=float(opts.get("startup_timeout_s") or 900), env=env, label=self.name) as server:
            info = EngineInfo(self.name, self.version(server.base_url),
                              {"argv": argv, "env": env, "log": str(server.log_path),
                               "weight_dtype": str(opts.get("dtype") or checkpoint_dtype(model))},
                              package=found.package, package_version=found.version,
                              variant=self.variant(found, server.log_path), executable=found.executable,
                              installed_from=found.origin)
            name = str(opts.get("served_model") or model.name)
            yield self.session(server.base_url, name, info, counter, self.probe(server.base_url, opts, run_dir),
                               opts)


def get_json(url: str) -> dict[str, Any] | None:
    import httpx

    try:
        resp = httpx.get(url, timeout=10)
        return resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None

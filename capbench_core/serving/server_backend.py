"""What every server engine (vLLM, SGLang, llama-server) shares: options, availability, launch or attach.

A subclass names its engine recipe (the environment it launches from), its
typed options (each engine flag declared with ``flag(...)``), how to build
argv and the environment variables, and where to read the version. This class
resolves the engine's executable (``python=`` option, an environment
variable, or the installed engine environment), says in one sentence why it
cannot run when it cannot, launches the server through the shared launcher
(or attaches with ``endpoint``), and wires the OpenAI client and the engine
probe.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from capbench_core.analytics.checkpoint import engine_view, max_context, read_config
from capbench_core.contract.backend import (
    UNKNOWN_SHAPE,
    Availability,
    Backend,
    EngineInfo,
    LoadShape,
    ModelRef,
    Session,
)
from capbench_core.contract.engine_env import EngineDevice, Recipe
from capbench_core.contract.options import BackendOptions, option
from capbench_core.contract.records import HardwareSpec, Placement, TierUse
from capbench_core.errors import CapbenchError
from capbench_core.measure.nvml import cuda_gpus
from capbench_core.serving import environments
from capbench_core.serving.environments import EngineUnavailable, Resolved
from capbench_core.serving.scrape import EngineProbe, MetricTable


class EndpointOptions(BackendOptions):
    """Options of every backend that can attach to a running OpenAI-compatible server."""

    endpoint: str | None = option("attach to this running server instead of launching one")
    served_model: str | None = option("model name on the server (default: the model's name)")


class ServerOptions(EndpointOptions):
    """Options every server backend takes."""

    python: str | None = option("launch the engine with this interpreter (your own installation) instead of its "
                                "environment")
    extra_args: str | None = option("more engine flags, passed through verbatim (shell-quoted string)")
    startup_timeout_s: float | None = option("seconds to wait for the engine to become ready (default 900)", gt=0)


model_max_len = max_context  # the name engine plugins use


def checkpoint_dtype(model: ModelRef) -> str:
    """The dtype the checkpoint stores (``torch_dtype``/``dtype`` in config.json), bfloat16 when unsaid."""
    try:
        config = read_config(model.path)
    except CapbenchError:
        return "bfloat16"
    return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")


class ServerBackend(Backend):
    module = ""            # the engine's Python package
    distributions: tuple[str, ...] = ()  # its distribution names, CPU build first
    recipe: Recipe
    #: The engine's /metrics names (each engine plugin gives its own).
    metrics = MetricTable(engine="")
    Options: type[BackendOptions] = ServerOptions
    health_paths: tuple[str, ...] = ("/health",)
    #: the engine's endpoint that empties its prefix cache (POST), None when it has none
    cache_reset: str | None = None
    #: What EngineInfo calls the engine (default: the backend's name).
    engine_name: str = ""
    #: The engine reads the checkpoint directory itself (a llama.cpp server serves a GGUF made from it instead).
    reads_checkpoint: bool = True
    startup_timeout_s: float = 900

    @property
    def engine_env(self) -> str | None:  # type: ignore[override]
        return self.recipe.name

    @property
    def device(self) -> Literal["cpu", "accelerator"]:  # type: ignore[override]
        """cpu when the engine that would run is a CPU build (its S-MBU/S-MFU use the host's peaks)."""
        try:
            return "cpu" if self.resolve({}).device == "cpu" else "accelerator"
        except EngineUnavailable:
            return "accelerator"

    def probe_python(self, python: str) -> Resolved:
        """What a user-given interpreter would run: its package, version and device."""
        found = environments.python_package(python, self.distributions)
        if found is None:
            raise EngineUnavailable(f"{python} has none of {', '.join(self.distributions)} installed")
        package, version = found
        device: EngineDevice = "cpu" if package == self.distributions[0] else "cuda"
        return Resolved(python, package, version, device, device, "")

    def resolve(self, options: Mapping[str, Any]) -> Resolved:
        """The engine to launch; EngineUnavailable says in one sentence why there is none."""
        return environments.resolve(self.recipe, options, self.probe_python)

    def available(self) -> Availability:
        return self.available_for({})

    def available_for(self, options: Mapping[str, Any]) -> Availability:
        """Attaching needs nothing here; launching needs the engine, and a GPU for its CUDA build."""
        if options.get("endpoint"):
            return Availability.yes()
        try:
            found = self.resolve(options)
        except EngineUnavailable as exc:
            return Availability.no(str(exc))
        if found.device == "cuda" and not cuda_gpus():
            return Availability.no(
                f"{found.package} {found.version} is the CUDA build and no CUDA GPU is visible on this machine "
                f"(for this CPU: capbench engines install {self.recipe.name} --device cpu)")
        return Availability.yes()

    def dtype_options(self, dtype: str) -> dict[str, str] | None:
        return {"dtype": dtype}

    def devices_used(self, options: Mapping[str, Any]) -> int | None:
        """tp x pp x dp of the options (1 each when unset)."""
        return int(options.get("tp") or 1) * int(options.get("pp") or 1) * int(options.get("dp") or 1)

    def parse(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options validated and typed, defaults filled in."""
        return self.validate_options(options)

    def flag_argv(self, opts: Mapping[str, Any]) -> list[str]:
        """The engine flags of the options that declare one (a true boolean: the bare flag), then
        ``extra_args`` verbatim."""
        out: list[str] = []
        for key, flag in self.option_model().flags().items():
            value = opts.get(key)
            if value is None or value == "":
                continue
            if isinstance(value, bool):
                out += [flag] if value else []
                continue
            out += [flag, str(value)]
        return out + shlex.split(str(opts.get("extra_args") or ""))

    def argv(self, python: str, model: ModelRef, port: int, opts: Mapping[str, Any]) -> list[str]:
        """The engine's real command line; subclasses put their head before ``flag_argv``."""
        raise NotImplementedError

    def command(self, found: Resolved, model: ModelRef, port: int, opts: Mapping[str, Any],
                shape: LoadShape) -> list[str]:
        """The command that launches the engine (default: ``argv`` with the resolved interpreter)."""
        return self.argv(found.executable, model, port, opts)

    def settings(self, model: ModelRef, opts: Mapping[str, Any], shape: LoadShape,
                 found: Resolved) -> dict[str, Any]:
        """Options the run decides (dtype, context, batch, KV space) where the user did not."""
        return {}

    def decide(self, opts: Mapping[str, Any], decided: Mapping[str, Any]) -> dict[str, Any]:
        """The options with what ``settings`` decided, wherever the user left an option unset or at its default."""
        fields = self.option_model().model_fields
        untouched = {k for k in decided if opts.get(k) is None or (k in fields and opts[k] == fields[k].default)}
        return {**opts, **{k: decided[k] for k in untouched}}

    def served_dtype(self, model: ModelRef, opts: Mapping[str, Any]) -> str | None:
        """The weight dtype the launched engine holds: the dtype option, which ``settings`` sets to the
        checkpoint's when the user did not."""
        return str(opts.get("dtype") or checkpoint_dtype(model))

    def kv_capacity(self, base_url: str, opts: Mapping[str, Any]) -> int | None:
        """Tokens the running engine's KV cache holds, as it reports them; None where it does not."""
        return None

    def served_kv_dtype(self, opts: Mapping[str, Any]) -> str | None:
        """The KV-cache dtype the engine runs with these options (its ``kv_cache_dtype``; None: the weights')."""
        kv = str(opts.get("kv_cache_dtype") or "auto")
        return None if kv == "auto" else "fp8" if kv.startswith("fp8") else kv

    def served_weight_bytes(self, model: ModelRef, opts: Mapping[str, Any]) -> dict[str, Any] | None:
        """Bytes per weight by class where one dtype does not say them: a checkpoint's quantization_config."""
        from capbench_core.analytics.weights import from_quantization

        try:
            found = from_quantization(read_config(model.path), str(self.served_dtype(model, opts) or "bfloat16"))
        except CapbenchError:
            return None
        return found.record() if found else None

    def reported_dtype(self, base_url: str) -> str | None:
        """The weight dtype an attached server says it serves, None when it does not say."""
        return None

    def attached_dtype(self, opts: Mapping[str, Any], base_url: str) -> str | None:
        """An attached server's weight dtype: the dtype option the user gave, else what the server reports;
        None (S-MBU/S-MFU null with the reason) rather than a guess."""
        dtype = opts.get("dtype") or self.reported_dtype(base_url)
        return str(dtype) if dtype else None

    def launch_record(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        """What the engine's launch adds to ``launch_args`` beside argv, env and log (e.g. placement)."""
        return {}

    def check_memory(self, model: ModelRef, opts: Mapping[str, Any]) -> None:
        """Refuse early when the weights cannot fit the GPUs the run would use."""
        from capbench_core.analytics.model_spec import spec_from_path

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

    def env(self, opts: Mapping[str, Any], run_dir: Path, found: Resolved) -> dict[str, str]:
        return {}

    def probe(self, base_url: str, opts: Mapping[str, Any], run_dir: Path | None) -> EngineProbe:
        return EngineProbe(base_url, self.metrics)

    def session(self, url: str, name: str, info: EngineInfo, counter: Any, probe: EngineProbe,
                opts: Mapping[str, Any]) -> Session:
        """The session over the launched or attached server (an engine may add what only it offers)."""
        from capbench_core.serving.openai_client import OpenAISession

        session = OpenAISession(url, name, info, counter, probe=probe)
        session.cache_reset = self.cache_reset
        return session

    def variant(self, found: Resolved, log: Path) -> str:
        """How the engine ran (kernels, build), from its installation and its start-up log."""
        return found.variant

    @contextmanager
    def start(self, model: ModelRef, hardware: HardwareSpec, options: Mapping[str, Any],
              shape: LoadShape = UNKNOWN_SHAPE) -> Iterator[Session]:
        from capbench_core.serving.openai_client import tokenizer_counter

        opts = self.parse(options)
        counter = tokenizer_counter(model.path)
        if opts.get("endpoint"):
            yield self._attached(model, opts, counter)
            return
        found = self.resolve(opts)
        if model.path.is_dir() and self.reads_checkpoint:  # class names as engines know them (engine_view)
            model = replace(model, path=engine_view(model.path))
        opts = self.decide(opts, self.settings(model, opts, shape, found))
        self.check_memory(model, opts)
        with self._launched(model, opts, shape, found, counter) as session:
            yield session

    def _attached(self, model: ModelRef, opts: Mapping[str, Any], counter: Any) -> Session:
        from capbench_core.serving.openai_client import attach

        url, name = attach(opts, model.name)
        info = EngineInfo(self.engine_name or self.name, self.version(url), {"endpoint": url, "served_model": name},
                          weight_dtype=self.attached_dtype(opts, url))
        session = self.session(url, name, info, counter, self.probe(url, opts, None), opts)
        session.kv_capacity_tokens = self.kv_capacity(url, opts)
        return session

    @contextmanager
    def _launched(self, model: ModelRef, opts: Mapping[str, Any], shape: LoadShape, found: Resolved,
                  counter: Any) -> Iterator[Session]:
        from capbench_core.serving.launcher import free_port, launch, run_log_dir
        from capbench_core.serving.openai_client import OpenAISession

        port = free_port()
        argv = self.command(found, model, port, opts, shape)
        run_dir = run_log_dir() / f"{self.name}-{port}"
        run_dir.mkdir(parents=True, exist_ok=True)
        env = self.env(opts, run_dir, found)
        timeout = float(opts.get("startup_timeout_s") or self.startup_timeout_s)
        with launch(argv, f"http://127.0.0.1:{port}", run_dir / "engine.log", self.health_paths,
                    timeout_s=timeout, env=env, label=self.name) as server:
            info = EngineInfo(self.engine_name or self.name, self.version(server.base_url),
                              {"argv": argv, "env": env, "log": str(server.log_path), **self.launch_record(opts)},
                              package=found.package, package_version=found.version,
                              variant=self.variant(found, server.log_path), executable=found.executable,
                              installed_from=found.origin, weight_dtype=self.served_dtype(model, opts),
                              kv_dtype=self.served_kv_dtype(opts), weight_bytes=self.served_weight_bytes(model, opts))
            name = str(opts.get("served_model") or model.name)
            session = self.session(server.base_url, name, info, counter, self.probe(server.base_url, opts, run_dir),
                                   opts)
            if isinstance(session, OpenAISession):
                session.server = server
            session.kv_capacity_tokens = self.kv_capacity(server.base_url, opts)
            yield session


def server_placement(backend: Backend, options: Mapping[str, Any], ep: int, a2a: str) -> Placement:
    """A GPU server's placement from its parallel sizes and host offload (on a CPU build: all in host memory)."""
    layout = {"tp": int(options.get("tp") or 1), "pp": int(options.get("pp") or 1), "dp": int(options.get("dp") or 1),
              "ep": ep, "all_to_all": a2a if ep > 1 else None}
    named = ", ".join(f"{k}={options[k]}" for k in sorted(options) if k in PLACEMENT_KEYS and options[k] is not None)
    source = f"{backend.name} options{': ' + named if named else ' (defaults)'}"
    if backend.device_for(options) == "cpu":
        return Placement.uniform("host", f"{source}; a CPU build: every weight in host memory", **layout)
    placement = Placement.uniform("device", source, **layout)
    offload = float(options.get("cpu_offload_gb") or 0)
    if offload:
        fetched = TierUse(tier="split", execution="host_fetch", detail=f"{offload:g} GB per GPU in host memory, "
                                                                       f"streamed to the GPU as layers run")
        placement.weights.update({"attention_dense": fetched, "routed_experts": fetched, "shared_experts": fetched})
        placement.host_offload_gb = offload
    return placement


PLACEMENT_KEYS = ("tp", "pp", "dp", "ep", "enable_expert_parallel", "all2all_backend", "moe_a2a_backend",
                  "cpu_offload_gb")


def get_json(url: str) -> dict[str, Any] | None:
    import httpx

    try:
        resp = httpx.get(url, timeout=10)
        return resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None

"""RunConfig: the one settings object of `capbench run`, a sweep cell and a stored result.

The same names everywhere: a ``capbench run`` flag (``--num-requests``), a sweep
file key (``num_requests``) and a field of the ``config`` stored with every
result are one field of :class:`RunConfig`. The defaults are ``capbench run``'s
(128 measured and 8 warm-up requests per level, concurrency 1 and 8), for a
sweep cell too. ``resolve(pm)`` turns names into what the runner needs
(model, task, backends, typed backend options, load levels) once; each stored
result keeps the RunConfig narrowed to its own backend and load level, so
``capbench run --from RUN_ID`` repeats it exactly (seed included).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from capbench_core.analytics import cost
from capbench_core.analytics.checkpoint import chat_template, model_ref
from capbench_core.analytics.cost import CostModel
from capbench_core.analytics.grouping import load_label
from capbench_core.contract.backend import Backend, ModelRef
from capbench_core.contract.records import HardwareSpec
from capbench_core.contract.registry import PluginManager
from capbench_core.contract.task import Task
from capbench_core.errors import CapbenchError

Scalar = str | int | float | bool


def _one_or_many(item: dict[str, Any]) -> WithJsonSchema:
    """A setting a sweep file may give as one value, a list, or (like the CLI) comma-separated text."""
    return WithJsonSchema({"anyOf": [item, {"type": "array", "items": item, "minItems": 1}, {"type": "string"}]})


Names = Annotated[tuple[str, ...], _one_or_many({"type": "string"})]
Counts = Annotated[tuple[int, ...] | None, _one_or_many({"type": "integer", "minimum": 1})]
Rates = Annotated[tuple[float, ...], _one_or_many({"type": "number", "exclusiveMinimum": 0})]
#: capbench run's closed-loop levels when neither --concurrency nor --rate is given.
DEFAULT_CONCURRENCY = (1, 8)
#: most requests in flight at a Poisson rate when --concurrency does not cap it.
RATE_CAP = 1024
#: most requests of a replayed trace in flight when --concurrency does not cap it
TRACE_CAP = 32
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
COST_FLAGS = ("price_usd_per_hour", "price_from", "hardware_price_usd", "cost_preset")


@dataclass(frozen=True)
class Level:
    """One load point: a fixed number of concurrent requests, or a Poisson arrival rate capped at it."""

    concurrency: int
    rate_rps: float | None = None
    #: requests sent at their trace's times (``concurrency`` caps those in flight)
    trace: bool = False

    @property
    def label(self) -> str:
        return load_label(self.concurrency, self.rate_rps, "trace" if self.trace else "closed")

    @property
    def arrival(self) -> Literal["closed", "poisson", "trace"]:
        return "trace" if self.trace else "poisson" if self.rate_rps else "closed"


def _listed(value: Any) -> Any:
    """`1,4` / `[1, 4]` / `4` -> a list (CLI text, a sweep list, a scalar sweep value)."""
    if value is None:
        return value
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class RunConfig(BaseModel):
    """Everything that decides what a run measures. Field names are the run flags' (``--num-requests`` is
    ``num_requests``) and the sweep file keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Names = Field(default=(), description="backends to compare; empty: every available one")
    model: str = Field(default="tiny-moe", description="registered model, checkpoint directory, config.json, .gguf "
                                                        "file or Hugging Face id in the local cache")
    revision: str | None = Field(default=None, description="Hugging Face cache revision (ref or commit; "
                                                             "default main)")
    task: str | None = Field(default=None, description="task; None: the model's own, else 'random'")
    task_options: dict[str, Scalar] = Field(default_factory=dict)
    data: str | None = Field(default=None, description="data file for file-based tasks")
    chat: bool = Field(default=False, description="send prompts as user messages through the model's chat "
                                                  "template (task option chat=true does the same)")
    num_requests: int = Field(default=128, ge=1, description="measured requests per load level")
    warmup: int = Field(default=8, ge=0, description="warm-up requests per level (recorded, not measured)")
    concurrency: Counts = Field(default=None, description="closed-loop levels (default 1,8); "
                                                                           "with rate: the most in flight")
    rate: Rates = Field(default=(), description="Poisson arrival rates, requests/s")
    duration_s: float | None = Field(default=None, gt=0, description="stop sending new requests after this long")
    seed: int = Field(default=0, description="seed of the Poisson arrivals")
    slo: dict[str, float] = Field(default_factory=dict, description="latency budgets (ms) for goodput")
    search: Literal["max-rate", "max-concurrency"] | None = Field(
        default=None, description="find each backend's highest rate or concurrency that meets the SLO")
    search_percentile: Literal["50", "90", "99"] = Field(default="99", description="the percentile the SLO binds")
    search_precision: float = Field(default=0.1, ge=0.01, le=1, description="max-rate: relative bracket width")
    search_steps: int = Field(default=8, ge=2, le=32, description="most probes per backend")
    client_procs: int | None = Field(default=None, ge=1, le=256, description="client processes sending the "
                                                                            "measured requests (None: one per 64 "
                                                                            "streams, at most half the cores)")
    dtype: Literal["float32", "bfloat16"] | None = None
    endpoint: str | None = None
    served_model: str | None = None
    backend_options: dict[str, Scalar] = Field(
        default_factory=dict, description="KEY or BACKEND:KEY -> value; unscoped keys go to every backend "
                                          "that takes them")
    price_usd_per_hour: float | None = Field(default=None, ge=0)
    price_from: str | None = None
    hardware_price_usd: float | None = Field(default=None, ge=0)
    cost_preset: Literal["moe-cap", "parts"] | None = None
    life_years: float = Field(default=3.0, gt=0)
    usd_per_kwh: float = Field(default=0.10, ge=0)
    power_w: float | None = Field(default=None, ge=0)

    @field_validator("backend", mode="before")
    @classmethod
    def _backends(cls, value: Any) -> Any:
        return _listed(value) or ()

    @field_validator("concurrency", mode="before")
    @classmethod
    def _levels(cls, value: Any) -> Any:
        listed = _listed(value)
        if listed is not None and (not listed or min(int(v) for v in listed) < 1):
            raise ValueError("needs integers >= 1, e.g. 1,4,16")
        return listed

    @field_validator("rate", mode="before")
    @classmethod
    def _rates(cls, value: Any) -> Any:
        listed = _listed(value) or []
        rates = [float(v) for v in listed]
        if any(not math.isfinite(r) or r <= 0 for r in rates):
            raise ValueError("needs finite rates > 0 (requests/second)")
        return rates

    @field_validator("slo", mode="before")
    @classmethod
    def _slo(cls, value: Any) -> Any:
        from capbench_core.analytics.metrics import SLO_PRESETS

        if isinstance(value, str):
            if value in SLO_PRESETS:
                return dict(SLO_PRESETS[value])
            pairs = dict(p.partition("=")[::2] for p in _listed(value))
            value = pairs
        unknown = set(value or {}) - set(SLO_KEYS)
        if unknown:
            raise ValueError(f"unknown budget {sorted(unknown)[0]!r}; use {', '.join(SLO_KEYS)} or a preset "
                             f"({', '.join(SLO_PRESETS)})")
        return value

    @model_validator(mode="after")
    def _search_needs_slo(self) -> RunConfig:
        if self.search and not {"ttft_ms", "tpot_ms", "e2e_ms"} & set(self.slo):
            raise ValueError("--search needs the SLO it searches for: --slo ttft_ms=N,tpot_ms=N (or a preset)")
        return self

    @model_validator(mode="after")
    def _one_cost_model(self) -> RunConfig:
        given = [f"--{k.replace('_', '-')}" for k in COST_FLAGS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one cost model, not {' and '.join(given)}")
        return self

    # --- building ------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, settings: Mapping[str, Any]) -> RunConfig:
        """A RunConfig from settings (CLI, sweep, stored), with one-line errors naming the setting."""
        try:
            return cls.model_validate(dict(settings))
        except ValidationError as exc:
            raise CapbenchError(describe_errors(exc)) from None

    def with_settings(self, **changes: Any) -> RunConfig:
        """This config with some settings replaced, validated again."""
        return self.build({**self.model_dump(exclude_defaults=True), **changes})

    def levels(self) -> list[Level]:
        """Closed-loop levels, or Poisson rates capped by --concurrency (else by RATE_CAP)."""
        if not self.rate:
            return [Level(c) for c in (self.concurrency or DEFAULT_CONCURRENCY)]
        cap = max(self.concurrency) if self.concurrency else RATE_CAP
        return [Level(cap, r) for r in self.rate]

    def narrow(self, backend: str, level: Level, known: set[str] | None = None) -> RunConfig:
        """The config of one point: this backend and this level. With ``known`` (the options the backend
        takes), only the backend options it took, unscoped, so ``capbench run --from`` repeats that row."""
        options = dict(self.backend_options)
        if known is not None:
            options = {}
            for key, value in self.backend_options.items():
                scope, sep, name = key.partition(":")
                if (sep and scope == backend) or (not sep and key in known):
                    options[name if sep else key] = value
        changes: dict[str, Any] = {"backend": (backend,), "backend_options": options}
        if self.search:  # one point of a search repeats as that point
            changes["search"] = None
        if level.rate_rps:
            changes["rate"] = (level.rate_rps,)
        else:
            changes["concurrency"] = (level.concurrency,)
        return self.model_copy(update=changes)

    def record(self) -> dict[str, Any]:
        """What a result stores: every setting, defaults included, as JSON."""
        return self.model_dump(mode="json")


def describe_errors(exc: ValidationError) -> str:
    """`--concurrency '0': needs integers >= 1` — a run setting named as its flag."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if not name:
            parts.append(message)
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown setting {name!r}")
        else:
            parts.append(f"--{name.split('.')[0].replace('_', '-')} {err.get('input')!r}: {message}")
    return "; ".join(parts)


@dataclass
class ResolvedRun:
    """A RunConfig with its names looked up: what the runner executes."""

    config: RunConfig
    model: ModelRef
    task: Task
    backends: list[Backend]
    backend_options: dict[str, dict[str, Any]]
    task_options: dict[str, Any]
    levels: list[Level]
    skipped: list[str] = field(default_factory=list)
    chat: bool = False

    def cells(self) -> Iterator[tuple[Backend, Level]]:
        for backend in self.backends:
            for level in self.levels:
                yield backend, level


def resolve(config: RunConfig, pm: PluginManager) -> ResolvedRun:
    """Look up the model, the task and the backends, and validate every backend's options, before any
    engine starts. With no backend named, every available one (and why the others are not)."""
    model = model_ref(pm, config.model, config.revision)
    task = pm.tasks.get(config.task or model.default_task or "random")
    backends, skipped = _choose(pm, config)
    options = route_options(config, backends)
    task_options: dict[str, Any] = dict(config.task_options)
    chat = config.chat or str(task_options.pop("chat", "false")).lower() in ("1", "true", "yes", "on")
    if chat and not task.supports_chat:
        raise CapbenchError(f"task '{task.name}' has no chat form (its prompts are not user messages): run it "
                            f"without --chat / chat=true")
    if chat:
        chat_template(model.path)  # one clear error now when the model has none
    if config.data:
        task_options["data"] = config.data
    resolved = ResolvedRun(config, model, task, backends, options, task_options, config.levels(), skipped, chat)
    _refuse_if_none_can_run(resolved)
    return resolved


def _choose(pm: PluginManager, config: RunConfig) -> tuple[list[Backend], list[str]]:
    if config.backend:
        return [pm.backends.get(name) for name in config.backend], []
    if config.endpoint:
        raise CapbenchError("--endpoint needs --backend to say what serves it (openai for any "
                            "OpenAI-compatible server, or the engine's own backend, e.g. llamacpp_server)")
    runnable = [b for _, b in pm.backends.items() if not b.needs_endpoint]
    chosen = [b for b in runnable if b.available().ok]
    skipped = [f"{b.name} ({b.available().reason})" for b in runnable if not b.available().ok]
    if not chosen:
        raise CapbenchError("no backend can run here; `capbench plugins` says why for each")
    return chosen, skipped


def route_options(config: RunConfig, backends: list[Backend]) -> dict[str, dict[str, Any]]:
    """``KEY=VALUE`` to every chosen backend that declares KEY, ``BACKEND:KEY=VALUE`` to that one; --endpoint,
    --served-model and --dtype become each backend's own options; then each set is validated by its backend.
    An option no chosen backend knows is an error listing what each accepts."""
    by_name = {b.name: b for b in backends}
    known = {b.name: set(b.option_model().model_fields) for b in backends}
    routed: dict[str, dict[str, Any]] = {b.name: {} for b in backends}
    pairs = dict(config.backend_options)
    pairs.update({k: v for k, v in (("endpoint", config.endpoint), ("served_model", config.served_model))
                  if v is not None})
    for key, value in pairs.items():
        scope, sep, name = key.partition(":")
        target = scope if sep else None
        if target is not None and target not in by_name:
            raise CapbenchError(f"option {key}={value} names backend '{target}', which is not in this run "
                                f"({', '.join(by_name)})")
        option = name if target else key
        names = [target] if target else [n for n in by_name if option in known[n]]
        if not names or (target and option not in known[target]):
            listing = "; ".join(f"{n}: {', '.join(sorted(k)) or '(none)'}" for n, k in known.items())
            raise CapbenchError(f"no backend in this run takes option '{option}'. Options by backend — {listing}")
        for n in names:
            routed[n][option] = value
    if config.dtype:
        for backend in backends:
            for key, value in (backend.dtype_options(config.dtype) or {}).items():
                routed[backend.name].setdefault(key, value)
    return {name: by_name[name].validate_options(opts) for name, opts in routed.items()}


def _refuse_if_none_can_run(run: ResolvedRun) -> None:
    """When no requested backend can run here, say why in one sentence each (nothing is stored)."""
    reasons = []
    for backend in run.backends:
        availability = backend.available_for(run.backend_options[backend.name])
        if availability.ok:
            return
        reasons.append(f"{backend.name} cannot run here: {availability.reason}")
    raise CapbenchError("; ".join(reasons))


def dtype_refusals(run: ResolvedRun) -> list[str]:
    """Backends that cannot hold weights in the asked dtype (they run at their default; the CLI says so)."""
    dtype = run.config.dtype
    if not dtype:
        return []
    return [f"{b.name} cannot hold its weights in {dtype}: it runs at its default" for b in run.backends
            if b.dtype_options(dtype) is None]


def cost_model(config: RunConfig, hardware: HardwareSpec) -> CostModel | None:
    """The one cost model the settings chose; none chosen: a labelled estimate (None when even that is unknown,
    and the results say so)."""
    if config.price_usd_per_hour is not None:
        return cost.Hourly(config.price_usd_per_hour, "hourly price (--price-usd-per-hour)")
    if config.price_from is not None:
        return cost.hourly_from_table(config.price_from, hardware)
    if config.hardware_price_usd is not None:
        return cost.Capex(config.hardware_price_usd, config.life_years, config.usd_per_kwh, config.power_w)
    if config.cost_preset == "moe-cap":
        return cost.moe_cap_preset(hardware, config.life_years)
    if config.cost_preset == "parts":
        return cost.parts_preset(hardware, config.life_years, config.usd_per_kwh)
    return cost.default_estimate(hardware)

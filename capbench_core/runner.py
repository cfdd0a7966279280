"""Run a comparison: every backend x concurrency level on one model and workload.

Each (backend, concurrency) point becomes one RunResult, stored as soon as it
ends. A backend that cannot start gets a `failed` result with the reason and
the others still run. Ctrl-C stores the point in progress as `partial` and
re-raises KeyboardInterrupt for the CLI to exit with 130.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from capbench_core import __version__, metrics
from capbench_core.backend import Backend, ModelRef, Session
from capbench_core.energy import RaplMeter
from capbench_core.errors import CapbenchError
from capbench_core.loadgen import Phase, run_phase
from capbench_core.model_spec import ModelSpec, spec_from_path
from capbench_core.plugins import PluginManager
from capbench_core.results import (
    EngineRecord,
    HardwareSpec,
    Metrics,
    ModelRecord,
    RunResult,
    WorkloadRecord,
)
from capbench_core.store import Store
from capbench_core.workload import Task, Workload


@dataclass
class RunPlan:
    backends: list[str]
    model: ModelRef
    task: Task
    num_requests: int
    warmup: int
    concurrency: list[int]
    backend_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    price_usd_per_hour: float | None = None


class Reporter:
    """What the runner tells the user while it works (the CLI gives a rich one)."""

    def phase(self, label: str, total: int) -> Callable[[], None]:
        return lambda: None

    def end_phase(self) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def detect_hardware(pm: PluginManager) -> HardwareSpec:
    from capbench_core.hardware import build_spec

    devices = [d for _, probe in pm.hardware_probes.items() for d in probe()]
    return build_spec(devices)


def _model_record(ref: ModelRef, spec: ModelSpec, dtype: str) -> ModelRecord:
    return ModelRecord(name=ref.name, path=str(ref.path), architecture=spec.architecture,
                       total_params=spec.total_params, active_params=spec.active_params,
                       active_params_no_embed=spec.active_params_no_embed, num_experts=spec.num_experts,
                       top_k=spec.top_k, sparsity=spec.sparsity, dtype=dtype)


class Runner:
    def __init__(self, pm: PluginManager, store: Store, hardware: HardwareSpec, reporter: Reporter):
        self.pm, self.store, self.hardware, self.reporter = pm, store, hardware, reporter
        self.sha = git_sha()

    def run(self, plan: RunPlan) -> list[RunResult]:
        spec = spec_from_path(plan.model.path, plan.model.name)
        workload = plan.task.build(plan.model, plan.num_requests + plan.warmup, plan.task_options)
        results: list[RunResult] = []
        for name in plan.backends:
            results.extend(self._run_backend(self.pm.backends.get(name), plan, spec, workload))
        return results

    def _base_result(self, backend: str, plan: RunPlan, spec: ModelSpec, workload: Workload,
                     concurrency: int, dtype: str) -> RunResult:
        sampling = asdict(workload.requests[0].sampling) if workload.requests else {}
        return RunResult(
            run_id=str(uuid.uuid4()), started_at=datetime.now(timezone.utc), status="partial",
            capbench_version=__version__, git_sha=self.sha, backend=backend,
            model=_model_record(plan.model, spec, dtype), hardware=self.hardware,
            workload=WorkloadRecord(task=workload.task, params=workload.params, hash=workload.hash(),
                                    num_requests=plan.num_requests, warmup_requests=plan.warmup,
                                    concurrency=concurrency, sampling=sampling))

    def _finish(self, result: RunResult, status: str, reason: str = "") -> RunResult:
        result.status = status  # type: ignore[assignment]
        result.status_reason = reason
        result.finished_at = datetime.now(timezone.utc)
        self.store.save(result)
        for warning in self.pm.notify_finished(result):
            self.reporter.note(warning)
        return result

    def _run_backend(self, backend: Backend, plan: RunPlan, spec: ModelSpec,
                     workload: Workload) -> list[RunResult]:
        dtype = str(plan.backend_options.get("dtype", "float32"))
        availability = backend.available()
        if not availability.ok:
            failed = self._base_result(backend.name, plan, spec, workload, plan.concurrency[0], dtype)
            return [self._finish(failed, "failed", availability.reason)]
        done: list[RunResult] = []
        try:
            with backend.start(plan.model, self.hardware, plan.backend_options) as session:
                for level in plan.concurrency:
                    result = self._base_result(backend.name, plan, spec, workload, level, dtype)
                    result.engine = EngineRecord(**asdict(session.engine))
                    done.append(self._measure(session, result, plan, spec, workload, level, dtype))
        except (CapbenchError, OSError, RuntimeError, ValueError) as exc:
            pending = self._base_result(backend.name, plan, spec, workload, plan.concurrency[len(done)]
                                        if len(done) < len(plan.concurrency) else plan.concurrency[-1], dtype)
            done.append(self._finish(pending, "failed", f"{backend.name} failed: {exc}"))
        return done

    def _measure(self, session: Session, result: RunResult, plan: RunPlan, spec: ModelSpec,
                 workload: Workload, level: int, dtype: str) -> RunResult:
        self.pm.notify_started({"run_id": result.run_id, "backend": result.backend, "model": plan.model.name,
                                "task": workload.task, "concurrency": level})
        warm, measured = workload.requests[:plan.warmup], workload.requests[plan.warmup:]
        warm_phase, main_phase = Phase(), Phase()
        meter = RaplMeter()
        origin = time.perf_counter_ns()
        label = f"{result.backend} c={level}"

        async def drive() -> None:
            if warm:
                tick = self.reporter.phase(f"{label} warm-up", len(warm))
                await run_phase(session, warm, level, origin, warm_phase, True, workload.score, lambda _: tick())
                self.reporter.end_phase()
            tick = self.reporter.phase(label, len(measured))
            meter.start()
            await run_phase(session, measured, level, origin, main_phase, False, workload.score, lambda _: tick())
            self.reporter.end_phase()

        try:
            asyncio.run(drive())
        except KeyboardInterrupt:
            self.reporter.end_phase()
            self._compute(result, warm_phase, main_phase, meter, session, spec, workload, plan, dtype)
            self._finish(result, "partial", "interrupted by the user (Ctrl-C or SIGTERM)")
            raise
        self._compute(result, warm_phase, main_phase, meter, session, spec, workload, plan, dtype)
        failed = result.metrics.num_failed
        if failed and failed == result.metrics.num_requests:
            return self._finish(result, "failed", f"all {failed} requests failed")
        reason = f"{failed} of {result.metrics.num_requests} requests failed" if failed else ""
        return self._finish(result, "partial" if failed else "complete", reason)

    def _compute(self, result: RunResult, warm: Phase, main: Phase, meter: RaplMeter, session: Session,
                 spec: ModelSpec, workload: Workload, plan: RunPlan, dtype: str) -> None:
        joules = meter.stop()
        records = warm.records + main.records
        m: Metrics = metrics.latency_and_throughput(records, main.window_ns)
        metrics.accuracy(m, records, workload.scoring.metric if workload.scoring else None)
        activation = session.expert_activation(main.start_ns)
        steps = [s for s in activation.steps if s.started_ns <= main.end_ns] if activation else []
        bw = self.hardware.peak_mem_bw_gbps.value
        flops_peak = self.hardware.peak_flops_tflops.get(dtype)
        if activation is None:
            m.notes["s_mbu"] = m.notes["s_mfu"] = f"{result.backend} reports no decode steps"
        else:
            metrics.sparse_efficiency(m, spec, steps, activation.source, activation.method, dtype, bw,
                                      flops_peak.value if flops_peak else None)
        missing_price = ("no price for this hardware: pass --price-usd-per-hour "
                         f"(no price-table entry matches {self.hardware.label()!r})")
        metrics.hourly_cost(m, plan.price_usd_per_hour,
                            "hourly price (--price-usd-per-hour)", missing_price)
        metrics.energy(m, joules, "RAPL package counters" if joules is not None else None, meter.reason)
        result.requests = records
        result.metrics = m


def options_from_pairs(pairs: Mapping[str, str] | list[str]) -> dict[str, str]:
    """`k=v` strings -> dict, with an error naming a malformed pair."""
    out: dict[str, str] = {}
    items = pairs.items() if isinstance(pairs, Mapping) else [p.partition("=")[::2] for p in pairs]
    for key, value in items:
        if not key or value == "":
            raise CapbenchError(f"option {key or '?'}={value!r} is malformed: write KEY=VALUE")
        out[key.strip()] = value.strip()
    return out

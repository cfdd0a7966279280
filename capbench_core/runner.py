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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from capbench_core import __version__, cost, metrics, progress
from capbench_core.backend import Backend, LoadShape, ModelRef, Session
from capbench_core.cost import CostModel
from capbench_core.energy import NvmlMeter, RaplMeter
from capbench_core.engine_metrics import WindowReport
from capbench_core.errors import CapbenchError
from capbench_core.loadgen import Arrivals, Phase, run_phase
from capbench_core.model_spec import ModelSpec, spec_from_path
from capbench_core.plugins import PluginManager
from capbench_core.progress import Reporter
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


@dataclass(frozen=True)
class Level:
    """One load point: a fixed number of concurrent requests, or a Poisson arrival rate."""

    concurrency: int
    rate_rps: float | None = None

    @property
    def label(self) -> str:
        return f"rate={self.rate_rps:g}/s" if self.rate_rps else f"c={self.concurrency}"


@dataclass
class RunPlan:
    backends: list[str]
    model: ModelRef
    task: Task
    num_requests: int
    warmup: int
    levels: list[Level]
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    cost: CostModel | None = None
    duration_s: float | None = None
    seed: int = 0
    slo: dict[str, float] = field(default_factory=dict)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def detect_hardware(pm: PluginManager, refresh_peaks: bool = False) -> HardwareSpec:
    from capbench_core.hardware import build_spec

    devices = [d for _, probe in pm.hardware_probes.items() for d in probe()]
    return build_spec(devices, refresh_peaks)


def _model_record(ref: ModelRef, spec: ModelSpec, dtype: str) -> ModelRecord:
    from capbench_core.model_spec import config_of

    return ModelRecord(name=ref.name, path=str(ref.path), architecture=spec.architecture,
                       total_params=spec.total_params, active_params=spec.active_params,
                       active_params_no_embed=spec.active_params_no_embed, num_experts=spec.num_experts,
                       top_k=spec.top_k, sparsity=spec.sparsity, dtype=dtype, config=config_of(ref.path))


class Runner:
    def __init__(self, pm: PluginManager, store: Store, hardware: HardwareSpec, reporter: Reporter):
        self.pm, self.store, self.hardware, self.reporter = pm, store, hardware, reporter
        self.sha = git_sha()
        self._external: metrics.ExternalScore | None = None

    def run(self, plan: RunPlan) -> list[RunResult]:
        spec = spec_from_path(plan.model.path, plan.model.name)
        workload = plan.task.build(plan.model, plan.num_requests + plan.warmup, plan.task_options)
        results: list[RunResult] = []
        with progress.using(self.reporter):
            for name in plan.backends:
                results.extend(self._run_backend(self.pm.backends.get(name), plan, spec, workload))
        return results

    def _tdp_w(self) -> float | None:
        """Datasheet TDP of the accelerators, for a labelled power estimate; None on CPU."""
        from capbench_core.hardware import match_accelerator

        total = 0.0
        for d in self.hardware.devices:
            if d.kind == "cpu":
                continue
            row = match_accelerator(d.model)
            if row is None:
                return None
            total += row["tdp_w"] * d.count
        return total or None

    def _base_result(self, backend: str, plan: RunPlan, spec: ModelSpec, workload: Workload,
                     level: Level, dtype: str) -> RunResult:
        sampling = asdict(workload.requests[0].sampling) if workload.requests else {}
        return RunResult(
            run_id=str(uuid.uuid4()), started_at=datetime.now(timezone.utc), status="partial",
            capbench_version=__version__, git_sha=self.sha, backend=backend,
            model=_model_record(plan.model, spec, dtype), hardware=self.hardware,
            workload=WorkloadRecord(task=workload.task, params=workload.params, hash=workload.hash(),
                                    num_requests=plan.num_requests, warmup_requests=plan.warmup,
                                    concurrency=level.concurrency, rate_rps=level.rate_rps,
                                    arrival="poisson" if level.rate_rps else "closed",
                                    duration_s=plan.duration_s, slo=plan.slo, sampling=sampling))

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
        options = plan.backend_options.get(backend.name, {})
        availability = backend.available_for(options)
        if not availability.ok:
            failed = self._base_result(backend.name, plan, spec, workload, plan.levels[0], "unknown")
            return [self._finish(failed, "failed", availability.reason)]
        done: list[RunResult] = []
        try:
            with backend.start(plan.model, self.hardware, options, load_shape(plan, workload)) as session:
                if not isinstance(session, Session):
                    raise CapbenchError(f"{backend.name}.start() yielded a {type(session).__name__}, which does "
                                        f"not subclass capbench_core.backend.Session")
                self._external = self._score_externally(plan, session)
                dtype = str(session.engine.launch_args.get("weight_dtype", "float32"))
                for level in plan.levels:
                    result = self._base_result(backend.name, plan, spec, workload, level, dtype)
                    result.engine = EngineRecord(**asdict(session.engine))
                    done.append(self._measure(session, result, plan, spec, workload, level, dtype))
        except (CapbenchError, OSError, RuntimeError, ValueError) as exc:
            level = plan.levels[min(len(done), len(plan.levels) - 1)]
            pending = self._base_result(backend.name, plan, spec, workload, level, "unknown")
            done.append(self._finish(pending, "failed", f"{backend.name} failed: {exc}"))
        return done

    def _score_externally(self, plan: RunPlan, session: Session) -> metrics.ExternalScore | None:
        """Tasks with an outside scorer (lm-eval) score the started server once, before the load."""
        if not plan.task.scores_externally:
            return None
        source = plan.task.name
        base_url, served = session.base_url, session.served_model
        if not base_url or not served:
            return metrics.ExternalScore(source, {}, 0, f"{source} needs a backend with an OpenAI-compatible "
                                                        f"endpoint (llamacpp_server, vllm, sglang, openai)")
        self.reporter.note(f"{source}: scoring {base_url} before the load…")
        try:
            scores, n = plan.task.evaluate(base_url, served, plan.model, plan.task_options)
        except CapbenchError as exc:
            return metrics.ExternalScore(source, {}, 0, str(exc))
        return metrics.ExternalScore(source, scores, n)

    def _measure(self, session: Session, result: RunResult, plan: RunPlan, spec: ModelSpec,
                 workload: Workload, level: Level, dtype: str) -> RunResult:
        self.pm.notify_started({"run_id": result.run_id, "backend": result.backend, "model": plan.model.name,
                                "task": workload.task, "concurrency": level.concurrency,
                                "rate_rps": level.rate_rps})
        warm, measured = workload.requests[:plan.warmup], workload.requests[plan.warmup:]
        warm_phase, main_phase = Phase(), Phase()
        on_gpu = self.pm.backends.get(result.backend).device != "cpu" and any(
            d.vendor == "NVIDIA" for d in self.hardware.devices if d.kind == "gpu")
        meter: RaplMeter | NvmlMeter = NvmlMeter() if on_gpu else RaplMeter()
        origin = time.perf_counter_ns()
        label = f"{result.backend} {level.label}"
        reports: list[WindowReport | None] = []
        arrivals = Arrivals(level.concurrency, level.rate_rps, plan.duration_s, plan.seed)

        async def drive() -> None:
            if warm:
                tick = self.reporter.phase(f"{label} warm-up", len(warm))
                await run_phase(session, warm, Arrivals(level.concurrency), origin, warm_phase, True, workload.score,
                                lambda _: tick())
                self.reporter.end_phase()
            tick = self.reporter.phase(label, len(measured))
            await asyncio.to_thread(session.begin_window)
            meter.start()
            await run_phase(session, measured, arrivals, origin, main_phase, False, workload.score,
                            lambda _: tick())
            self.reporter.end_phase()
            report = await asyncio.to_thread(session.end_window)
            if report is None or not report.experts_per_layer:
                counts = await session.expert_pass(measured, level.concurrency)
                if counts is not None:
                    report = report or WindowReport()
                    report.experts_per_layer, report.expert_method = counts.per_layer, counts.method
            reports.append(report)

        try:
            asyncio.run(drive())
        except KeyboardInterrupt:
            self.reporter.end_phase(failed=True)
            self._compute(result, warm_phase, main_phase, meter, session, spec, workload, plan, dtype, None)
            self._finish(result, "partial", "interrupted by the user (Ctrl-C or SIGTERM)")
            raise
        self._compute(result, warm_phase, main_phase, meter, session, spec, workload, plan, dtype,
                      reports[0] if reports else None)
        failed = result.metrics.num_failed
        if failed and failed == result.metrics.num_requests:
            return self._finish(result, "failed", f"all {failed} requests failed")
        reason = f"{failed} of {result.metrics.num_requests} requests failed" if failed else ""
        return self._finish(result, "partial" if failed else "complete", reason)

    def _compute(self, result: RunResult, warm: Phase, main: Phase, meter: RaplMeter | NvmlMeter, session: Session,
                 spec: ModelSpec, workload: Workload, plan: RunPlan, dtype: str,
                 report: WindowReport | None) -> None:
        joules = meter.stop()
        records = warm.records + main.records
        m: Metrics = metrics.latency_and_throughput(records, main.window_ns)
        metrics.accuracy(m, records, workload.scoring.metric if workload.scoring else None)
        if self._external is not None:
            metrics.external_accuracy(m, self._external)
        activation = session.expert_activation(main.start_ns)
        if activation is not None:
            steps = [s for s in activation.steps if s.started_ns <= main.end_ns]
            source, method = activation.source, activation.method
        elif report is not None and _engine_counts_steps(report):
            em = report.engine_metrics
            steps = metrics.server_side_steps(main.records, spec, float(em["generation_tokens"] or 0),
                                              float(em["server_tpot_ms_mean"] or 0),
                                              float(em["decode_batch_mean"] or 0))
            source, method = "estimated", (
                "the engine's own counters: step time = its generation seconds per generated token, batch = its "
                "busy slots per decode call (its stream reaches the client in bursts); A = uniform routing at that "
                "batch")
        elif report is not None and report.experts_per_layer:
            steps = metrics.client_side_steps(main.records, spec, False, main.window_ns)
            for step in steps:
                step.distinct_experts = list(report.experts_per_layer)
            source, method = "measured", report.expert_method
        else:
            serial = session.serial_decode
            steps = metrics.client_side_steps(main.records, spec, serial, main.window_ns)
            source, method = "estimated", (
                "batch of 1 (the engine serves one request at a time): top_k experts per layer; "
                "step time = window / output tokens (includes prefill: S-MBU is a lower bound)" if serial else
                "uniform routing E(1-(1-k/E)^B), B = requests decoding at once (client view); "
                "steps = client inter-token gaps")
        hw = self.hardware
        on_cpu = self.pm.backends.get(result.backend).device == "cpu"
        bw_peak = hw.cpu_peak_mem_bw_gbps if on_cpu and hw.cpu_peak_mem_bw_gbps else hw.peak_mem_bw_gbps
        bw = bw_peak.value
        flops_peak = (hw.cpu_peak_flops_tflops if on_cpu else hw.peak_flops_tflops).get(dtype)
        metrics.sparse_efficiency(m, spec, steps, source, method, dtype, bw,
                                  flops_peak.value if flops_peak else None)
        result.decode_steps = metrics.steps_record(steps, source, method, dtype)
        missing_price = ("no price for this hardware: pass --price-usd-per-hour (renting) or "
                         f"--hardware-price-usd (owning) for {self.hardware.label()!r}")
        metrics.energy(m, joules, meter.source if joules is not None else None, meter.reason)
        cost.apply(m, plan.cost, self._tdp_w(), missing_price)
        metrics.goodput(m, main.records, plan.slo, main.window_ns)
        if report is not None:
            result.engine_metrics = dict(report.engine_metrics)
            for key in ("server_ttft_ms_mean", "server_tpot_ms_mean", "server_e2e_ms_mean"):
                setattr(m, key, report.engine_metrics.get(key))
            m.notes.update({f"engine.{k}": v for k, v in report.notes.items()})
        result.requests = records
        result.metrics = m


def _engine_counts_steps(report: WindowReport) -> bool:
    """The engine reported its decode batch and per-token generation time (llama-server's counters)."""
    em = report.engine_metrics
    return all(em.get(k) for k in ("decode_batch_mean", "server_tpot_ms_mean", "generation_tokens"))


def load_shape(plan: RunPlan, workload: Workload) -> LoadShape:
    """The most requests in flight at any level, and a bound on any request's context."""
    longest = max((len(r.prompt.encode()) + r.max_tokens + 1 for r in workload.requests), default=None)
    return LoadShape(max(level.concurrency for level in plan.levels), longest)


def options_from_pairs(pairs: list[str]) -> dict[str, str]:
    """`k=v` strings -> dict, with an error naming a malformed pair."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not key.strip() or not value.strip():
            raise CapbenchError(f"option {pair!r} is malformed: write KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def backend_options(pairs: list[str], backends: Mapping[str, Backend]) -> dict[str, dict[str, str]]:
    """Route `KEY=VALUE` to every chosen backend that declares KEY, `BACKEND:KEY=VALUE` to one.

    An option no chosen backend knows is an error that lists what each accepts.
    """
    routed: dict[str, dict[str, str]] = {name: {} for name in backends}
    known = {name: dict(b.options) for name, b in backends.items()}
    for pair in pairs:
        scope, sep, rest = pair.partition(":")
        target = scope if sep and "=" not in scope else None
        [(key, value)] = options_from_pairs([rest if target else pair]).items()
        if target is not None and target not in backends:
            raise CapbenchError(f"option {pair!r} names backend '{target}', which is not in this run "
                                f"({', '.join(backends)})")
        names = [target] if target else [n for n in backends if key in known[n]]
        if not names or (target and key not in known[target]):
            listing = "; ".join(f"{n}: {', '.join(k) or '(none)'}" for n, k in known.items())
            raise CapbenchError(f"no backend in this run takes option '{key}'. Options by backend — {listing}")
        for name in names:
            routed[name][key] = value
    return routed

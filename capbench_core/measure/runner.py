"""Run a comparison: every backend x load level of a resolved RunConfig, on one model and workload.

Each (backend, level) point becomes one RunResult, stored as soon as it ends, with the RunConfig narrowed
to that point. A backend that cannot start gets a `failed` result with the reason and the others still
run. Ctrl-C stores the point in progress as `partial` and re-raises KeyboardInterrupt for the CLI to exit
with 130. The runner measures; the figures come from ``analytics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from capbench_core import __version__
from capbench_core.analytics import figures, metrics
from capbench_core.analytics.cost import CostModel
from capbench_core.analytics.model_spec import ModelSpec, config_of, spec_from_path
from capbench_core.config import Level, ResolvedRun, cost_model
from capbench_core.contract.backend import Backend, DecodeWindow, LoadShape, Session
from capbench_core.contract.records import HardwareSpec, Metrics, ModelRecord, RunResult, WorkloadRecord
from capbench_core.contract.registry import PluginManager
from capbench_core.contract.task import Workload
from capbench_core.contract.window import WindowReport
from capbench_core.errors import CapbenchError
from capbench_core.measure import progress
from capbench_core.measure.energy import NvmlMeter, RaplMeter
from capbench_core.measure.loadgen import Arrivals, Phase, run_phase
from capbench_core.measure.progress import Reporter
from capbench_core.store import Store


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass
class Point:
    """One (backend, level) being measured: its result so far and what the runner knows around it."""

    run: ResolvedRun
    backend: Backend
    level: Level
    spec: ModelSpec
    workload: Workload
    result: RunResult
    external: metrics.ExternalScore | None = None
    reports: list[WindowReport | None] = field(default_factory=list)


class Runner:
    def __init__(self, pm: PluginManager, store: Store, hardware: HardwareSpec, reporter: Reporter):
        self.pm, self.store, self.hardware, self.reporter = pm, store, hardware, reporter
        self.sha = git_sha()
        self.cost: CostModel | None = None

    def run(self, run: ResolvedRun) -> list[RunResult]:
        spec = spec_from_path(run.model.path, run.model.name)
        self.cost = cost_model(run.config, self.hardware)
        workload = run.task.build(run.model, run.config.num_requests + run.config.warmup, run.task_options)
        results: list[RunResult] = []
        with progress.using(self.reporter):
            for backend in run.backends:
                results.extend(self._run_backend(run, backend, spec, workload))
        return results

    def _base_result(self, run: ResolvedRun, backend: Backend, spec: ModelSpec, workload: Workload, level: Level,
                     dtype: str | None) -> RunResult:
        sampling = asdict(workload.requests[0].sampling) if workload.requests else {}
        config = run.config
        return RunResult(
            run_id=str(uuid.uuid4()), started_at=datetime.now(timezone.utc), status="partial",
            capbench_version=__version__, git_sha=self.sha, backend=backend.name,
            model=_model_record(run, spec, dtype), hardware=self.hardware,
            workload=WorkloadRecord(task=workload.task, params=workload.params, hash=workload.hash(),
                                    num_requests=config.num_requests, warmup_requests=config.warmup,
                                    concurrency=level.concurrency, rate_rps=level.rate_rps,
                                    arrival="poisson" if level.rate_rps else "closed",
                                    duration_s=config.duration_s, slo=config.slo, sampling=sampling,
                                    seed=config.seed),
            config=config.narrow(backend.name, level, set(backend.option_model().model_fields)).record())

    def _finish(self, result: RunResult, status: str, reason: str = "") -> RunResult:
        result.status = status  # type: ignore[assignment]
        result.status_reason = reason
        result.finished_at = datetime.now(timezone.utc)
        self.store.save(result)
        for warning in self.pm.notify_finished(result):
            self.reporter.note(warning)
        return result

    def _run_backend(self, run: ResolvedRun, backend: Backend, spec: ModelSpec,
                     workload: Workload) -> list[RunResult]:
        options = run.backend_options[backend.name]
        availability = backend.available_for(options)
        if not availability.ok:
            failed = self._base_result(run, backend, spec, workload, run.levels[0], None)
            return [self._finish(failed, "failed", availability.reason)]
        done: list[RunResult] = []
        try:
            with backend.start(run.model, self.hardware, options, load_shape(run, workload)) as session:
                if not isinstance(session, Session):
                    raise CapbenchError(f"{backend.name}.start() yielded a {type(session).__name__}, which does "
                                        f"not subclass capbench_core.contract.backend.Session")
                external = self._score_externally(run, session)
                for level in run.levels:
                    result = self._base_result(run, backend, spec, workload, level, session.engine.weight_dtype)
                    result.engine = dataclasses.replace(session.engine)
                    point = Point(run, backend, level, spec, workload, result, external)
                    done.append(self._measure(session, point))
        except (CapbenchError, OSError, RuntimeError, ValueError) as exc:
            level = run.levels[min(len(done), len(run.levels) - 1)]
            pending = self._base_result(run, backend, spec, workload, level, None)
            done.append(self._finish(pending, "failed", f"{backend.name} failed: {exc}"))
        return done

    def _score_externally(self, run: ResolvedRun, session: Session) -> metrics.ExternalScore | None:
        """Tasks with an outside scorer (lm-eval) score the started server once, before the load."""
        if not run.task.scores_externally:
            return None
        source = run.task.name
        base_url, served = session.base_url, session.served_model
        if not base_url or not served:
            return metrics.ExternalScore(source, {}, 0, f"{source} needs a backend with an OpenAI-compatible "
                                                        f"endpoint (llamacpp_server, vllm, sglang, openai)")
        self.reporter.note(f"{source}: scoring {base_url} before the load…")
        try:
            scores, n = run.task.evaluate(base_url, served, run.model, run.task_options)
        except CapbenchError as exc:
            return metrics.ExternalScore(source, {}, 0, str(exc))
        return metrics.ExternalScore(source, scores, n)

    def _measure(self, session: Session, point: Point) -> RunResult:
        result, level, config = point.result, point.level, point.run.config
        self.pm.notify_started({"run_id": result.run_id, "backend": result.backend, "model": point.run.model.name,
                                "task": point.workload.task, "concurrency": level.concurrency,
                                "rate_rps": level.rate_rps})
        requests = point.workload.requests
        warm, measured = requests[:config.warmup], requests[config.warmup:]
        warm_phase, main_phase = Phase(), Phase()
        on_gpu = point.backend.device != "cpu" and any(
            d.vendor == "NVIDIA" for d in self.hardware.devices if d.kind == "gpu")
        meter: RaplMeter | NvmlMeter = NvmlMeter() if on_gpu else RaplMeter()
        origin = time.perf_counter_ns()
        label = f"{result.backend} {level.label}"
        arrivals = Arrivals(level.concurrency, level.rate_rps, config.duration_s, config.seed)
        score = point.workload.score

        async def drive() -> None:
            if warm:
                tick = self.reporter.phase(f"{label} warm-up", len(warm))
                await run_phase(session, warm, Arrivals(level.concurrency), origin, warm_phase, True, score,
                                lambda _: tick())
                self.reporter.end_phase()
            tick = self.reporter.phase(label, len(measured))
            await asyncio.to_thread(session.begin_window)
            meter.start()
            await run_phase(session, measured, arrivals, origin, main_phase, False, score, lambda _: tick())
            self.reporter.end_phase()
            report = await asyncio.to_thread(session.end_window)
            if report is None or not report.experts_per_layer:
                counts = await session.expert_pass(measured, level.concurrency)
                if counts is not None:
                    report = report or WindowReport()
                    report.experts_per_layer, report.expert_method = counts.per_layer, counts.method
            point.reports.append(report)

        try:
            asyncio.run(drive())
        except KeyboardInterrupt:
            self.reporter.end_phase(failed=True)
            self._compute(point, session, warm_phase, main_phase, meter)
            self._finish(result, "partial", "interrupted by the user (Ctrl-C or SIGTERM)")
            raise
        self._compute(point, session, warm_phase, main_phase, meter)
        failed = result.metrics.num_failed
        if failed and failed == result.metrics.num_requests:
            return self._finish(result, "failed", f"all {failed} requests failed")
        reason = f"{failed} of {result.metrics.num_requests} requests failed" if failed else ""
        return self._finish(result, "partial" if failed else "complete", reason)

    def _compute(self, point: Point, session: Session, warm: Phase, main: Phase,
                 meter: RaplMeter | NvmlMeter) -> None:
        """Every figure of the window, from its raw records; the decode steps from the session when its
        engine times them, else from the client's view."""
        result, spec = point.result, point.spec
        report = point.reports[0] if point.reports else None
        joules = meter.stop()
        records = warm.records + main.records
        m: Metrics = metrics.latency_and_throughput(records, main.window_ns)
        metrics.accuracy(m, records, point.workload.scoring.metric if point.workload.scoring else None)
        if point.external is not None:
            metrics.external_accuracy(m, point.external)
        window = DecodeWindow(main.records, main.start_ns, main.end_ns, report, spec)
        found = session.decode_steps(window) or figures.client_decode_steps(window, spec, session.serial_decode)
        dtype = result.engine.weight_dtype if result.engine else None
        peaks = figures.peaks_for(self.hardware, point.backend.device == "cpu", dtype)
        figures.efficiency(m, spec, found, dtype, peaks)
        result.decode_steps = metrics.steps_record(found.steps, found.source, found.method, dtype or "unknown")
        metrics.energy(m, joules, meter.source if joules is not None else None, meter.reason)
        figures.price(m, self.cost, self.hardware)
        metrics.goodput(m, main.records, point.run.config.slo, main.window_ns)
        if report is not None:
            engine = report.engine_metrics
            result.engine_metrics = engine.record()
            m.server_ttft_ms_mean = engine.server_ttft_ms_mean
            m.server_tpot_ms_mean = engine.server_tpot_ms_mean
            m.server_e2e_ms_mean = engine.server_e2e_ms_mean
            m.notes.update({f"engine.{k}": v for k, v in report.notes.items()})
        result.requests = records
        result.metrics = m


def _model_record(run: ResolvedRun, spec: ModelSpec, dtype: str | None) -> ModelRecord:
    return ModelRecord(name=run.model.name, path=str(run.model.path), architecture=spec.architecture,
                       total_params=spec.total_params, active_params=spec.active_params,
                       active_params_no_embed=spec.active_params_no_embed, num_experts=spec.num_experts,
                       top_k=spec.top_k, sparsity=spec.sparsity, dtype=dtype or "unknown",
                       config=config_of(run.model.path))


def load_shape(run: ResolvedRun, workload: Workload) -> LoadShape:
    """The most requests in flight at any level, and a bound on any request's context."""
    longest = max((len(r.prompt.encode()) + r.max_tokens + 1 for r in workload.requests), default=None)
    return LoadShape(max(level.concurrency for level in run.levels), longest)

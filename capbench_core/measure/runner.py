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
from capbench_core.analytics.routing import shares as routing_shares
from capbench_core.analytics.weights import DTYPE_BYTES
from capbench_core.config import RATE_CAP, TRACE_CAP, Level, ResolvedRun, RunConfig, cost_model
from capbench_core.contract.backend import Backend, DecodeWindow, LoadShape, Session
from capbench_core.contract.records import HardwareSpec, Metrics, ModelRecord, RunResult, SearchPoint, WorkloadRecord
from capbench_core.contract.registry import PluginManager
from capbench_core.contract.task import Workload, build_workload
from capbench_core.contract.window import WindowReport
from capbench_core.errors import CapbenchError
from capbench_core.measure import progress
from capbench_core.measure.energy import NvmlMeter, RaplMeter
from capbench_core.measure.health import client_figures
from capbench_core.measure.loadgen import Arrivals, Phase, run_phase
from capbench_core.measure.memory import MemorySampler
from capbench_core.measure.progress import Reporter
from capbench_core.measure.search import meets, probes
from capbench_core.measure.workers import client_procs, measured_phase, run_loop
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
    spec: ModelSpec | None
    workload: Workload
    result: RunResult
    external: metrics.ExternalScore | None = None
    reports: list[WindowReport | None] = field(default_factory=list)
    shape: LoadShape | None = None
    memory: MemorySampler | None = None
    cache_note: str = ""
    procs: int = 1


@dataclass
class Cell:
    """One backend of a run, its engine started: what each of its rows shares."""

    run: ResolvedRun
    backend: Backend
    spec: ModelSpec | None
    workload: Workload
    external: metrics.ExternalScore | None
    shape: LoadShape


class Runner:
    def __init__(self, pm: PluginManager, store: Store, hardware: HardwareSpec, reporter: Reporter):
        self.pm, self.store, self.hardware, self.reporter = pm, store, hardware, reporter
        self.sha = git_sha()
        self.cost: CostModel | None = None
        self.analytics_note: str | None = None
        #: (model, workload hash) -> (backend, per-expert shares) of the first row that measured routing
        self.measured_routing: dict[tuple[str, str], tuple[str, list[list[float]]]] = {}

    def run(self, run: ResolvedRun) -> list[RunResult]:
        spec, self.analytics_note = analytics_of(run)
        self.cost = cost_model(run.config, self.hardware)
        workload = build_workload(run.task, run.model, run.config.num_requests, run.config.warmup,
                                  run.task_options)
        if any(r.at_s is not None for r in workload.requests[run.config.warmup:]):
            # a trace sets its own times: one level, in flight capped by --concurrency (engines size their batch
            # and KV cache for the cap; a cap that binds shows as schedule lag)
            cap = max(run.config.concurrency) if run.config.concurrency else TRACE_CAP
            run = dataclasses.replace(run, levels=[Level(cap, trace=True)])
        elif run.config.search:
            run = dataclasses.replace(run, levels=[Level(search_cap(run.config))])
        if run.chat:
            workload.requests = [dataclasses.replace(r, chat=True) for r in workload.requests]
            workload.params["chat"] = True
        results: list[RunResult] = []
        with progress.using(self.reporter):
            for backend in run.backends:
                results.extend(self._run_backend(run, backend, spec, workload))
        return results

    def _base_result(self, run: ResolvedRun, backend: Backend, spec: ModelSpec | None, workload: Workload,
                     level: Level, dtype: str | None) -> RunResult:
        sampling = asdict(workload.requests[0].sampling) if workload.requests else {}
        config = run.config
        return RunResult(
            run_id=str(uuid.uuid4()), started_at=datetime.now(timezone.utc), status="partial",
            capbench_version=__version__, git_sha=self.sha, backend=backend.name,
            model=_model_record(run, spec, dtype, self.analytics_note), hardware=self.hardware,
            workload=WorkloadRecord(task=workload.task, params=workload.params, hash=workload.hash(),
                                    num_requests=config.num_requests, warmup_requests=config.warmup,
                                    concurrency=level.concurrency, rate_rps=level.rate_rps,
                                    arrival=level.arrival,
                                    duration_s=config.duration_s, slo=config.slo, sampling=sampling,
                                    seed=config.seed),
            config=config.narrow(backend.name, level, set(backend.option_model().model_fields)).record(),
            placement=backend.placement(run.backend_options[backend.name]))

    def _finish(self, result: RunResult, status: str, reason: str = "") -> RunResult:
        result.status = status  # type: ignore[assignment]
        result.status_reason = reason
        result.finished_at = datetime.now(timezone.utc)
        self.store.save(result)
        for warning in self.pm.notify_finished(result):
            self.reporter.note(warning)
        return result

    def _run_backend(self, run: ResolvedRun, backend: Backend, spec: ModelSpec | None,
                     workload: Workload) -> list[RunResult]:
        options = run.backend_options[backend.name]
        availability = backend.available_for(options)
        shape = load_shape(run, workload)
        refusal = availability.reason if not availability.ok else memory_refusal(run, backend, spec, shape)
        if refusal:
            failed = self._base_result(run, backend, spec, workload, run.levels[0], None)
            return [self._finish(failed, "failed", refusal)]
        done: list[RunResult] = []
        try:
            with backend.start(run.model, self.hardware, options, shape) as session:
                if not isinstance(session, Session):
                    raise CapbenchError(f"{backend.name}.start() yielded a {type(session).__name__}, which does "
                                        f"not subclass capbench_core.contract.backend.Session")
                external = self._score_externally(run, session)
                cell = Cell(run, backend, spec, workload, external, shape)
                if run.config.search:
                    self._search(session, cell, done)
                else:
                    done.extend(self._point(session, cell, level) for level in run.levels)
        except (CapbenchError, OSError, RuntimeError, ValueError) as exc:
            level = run.levels[min(len(done), len(run.levels) - 1)]
            pending = self._base_result(run, backend, spec, workload, level, None)
            done.append(self._finish(pending, "failed", f"{backend.name} failed: {exc}"))
        return done

    def _point(self, session: Session, cell: Cell, level: Level) -> RunResult:
        """One measured row: this backend at this load level."""
        result = self._base_result(cell.run, cell.backend, cell.spec, cell.workload, level,
                                   session.engine.weight_dtype)
        result.engine = dataclasses.replace(session.engine)
        point = Point(cell.run, cell.backend, level, cell.spec, cell.workload, result, cell.external,
                      shape=cell.shape)
        return self._measure(session, point)

    def _search(self, session: Session, cell: Cell, done: list[RunResult]) -> None:
        """--search: probe loads (measure/search.py) until the highest that meets the SLO is bracketed; every
        probe is a stored row with its verdict, the winner marked."""
        config = cell.run.config
        goal = config.search
        assert goal is not None
        integer = goal == "max-concurrency"
        start = float(min(config.concurrency or (1,))) if integer else (config.rate[0] if config.rate else 1.0)
        cap = cell.run.levels[0].concurrency
        walk = probes(start, integer, config.search_precision, config.search_steps)
        by_load: dict[float, RunResult] = {}
        try:
            load = next(walk)
            while True:
                level = Level(int(load)) if integer else Level(cap, rate_rps=round(load, 4))
                result = self._point(session, cell, level)
                verdict = meets(result, config.slo, config.search_percentile)
                result.search = SearchPoint(goal=goal, percentile=float(config.search_percentile),
                                            step=len(by_load) + 1, met=verdict.met, why=verdict.why)
                self.store.save(result)
                done.append(result)
                by_load[load] = result
                self.reporter.note(f"{cell.backend.name} {level.label}: {'meets' if verdict.met else 'misses'} "
                                   f"the SLO ({verdict.why})")
                load = walk.send(verdict.met)
        except StopIteration as stop:
            best = stop.value
        if best is None:
            lowest = min(by_load, default=start)
            self.reporter.note(f"{cell.backend.name} cannot meet the SLO even at its lowest load "
                               f"({Level(int(lowest)).label if integer else f'{lowest:g}/s'})")
            return
        winner = by_load[best]
        assert winner.search is not None
        winner.search.winner = True
        self.store.save(winner)
        missed = [load for load, r in by_load.items() if r.search and not r.search.met and load > best]
        bracket = f", lowest miss {min(missed):g}" if missed else ", no miss found: raise --search-steps"
        self.reporter.note(f"{cell.backend.name}: SLO capacity {best:g}{'' if integer else ' requests/s'} "
                           f"({len(by_load)} probes{bracket})")

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
        options = point.run.backend_options[point.backend.name]
        on_gpu = point.backend.device_for(options) != "cpu" and any(
            d.vendor == "NVIDIA" for d in self.hardware.devices if d.kind == "gpu")
        meter: RaplMeter | NvmlMeter = NvmlMeter() if on_gpu else RaplMeter()
        engine_process = session.engine_process()
        if engine_process is not None:
            point.memory = MemorySampler(*engine_process, gpu=on_gpu).start()
        origin = time.perf_counter_ns()
        label = f"{result.backend} {level.label}"
        arrivals = Arrivals(level.concurrency, level.rate_rps, config.duration_s, config.seed)
        score = point.workload.score

        point.procs, procs_note = client_procs(config.client_procs, level.concurrency, session)
        if procs_note:
            self.reporter.note(f"{label}: {procs_note}")
        reset, how = session.reset_prefix_cache()
        result.metrics.prefix_cache_reset = reset
        point.cache_note = how

        async def drive() -> None:
            if warm:
                tick = self.reporter.phase(f"{label} warm-up", len(warm))
                await run_phase(session, warm, Arrivals(level.concurrency), origin, warm_phase, True, score,
                                lambda _: tick())
                self.reporter.end_phase()
            tick = self.reporter.phase(label, len(measured))
            await asyncio.to_thread(session.begin_window)
            meter.start()
            await measured_phase(session, measured, arrivals, origin, main_phase, score, lambda _: tick(),
                                 point.procs)
            self.reporter.end_phase()
            report = await asyncio.to_thread(session.end_window)
            if report is None or not report.experts_per_layer:
                counts = await session.expert_pass(measured, level.concurrency)
                if counts is not None:
                    report = report or WindowReport()
                    report.experts_per_layer, report.expert_method = counts.per_layer, counts.method
                    report.expert_tokens = counts.expert_tokens
            point.reports.append(report)

        try:
            run_loop(drive())
        except KeyboardInterrupt:
            self.reporter.end_phase(failed=True)
            self._compute(point, session, warm_phase, main_phase, meter)
            self._finish(result, "partial", "interrupted by the user (Ctrl-C or SIGTERM)")
            raise
        self._compute(point, session, warm_phase, main_phase, meter)
        failed = result.metrics.num_failed
        cause = session.failure_cause() if failed else None
        because = f": {cause}" if cause else ""
        if failed and failed == result.metrics.num_requests:
            return self._finish(result, "failed", f"all {failed} requests failed{because}")
        reason = f"{failed} of {result.metrics.num_requests} requests failed{because}" if failed else ""
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
        dtype = result.engine.weight_dtype if result.engine else None
        if spec is None:
            m.notes["s_mbu"] = m.notes["s_mfu"] = self.analytics_note or "the model is unknown to the analytics"
        else:
            key = (point.run.model.name, result.workload.hash)
            source, shares = self.measured_routing.get(key, (None, None))
            window = DecodeWindow(main.records, main.start_ns, main.end_ns, report, spec, shares, source)
            found = session.decode_steps(window) or figures.client_decode_steps(window, spec, session.serial_decode)
            result.routing = figures.routing(m, found, report, spec, point.run.backend_options[point.backend.name])
            if result.routing is not None and key not in self.measured_routing:
                self.measured_routing[key] = (point.backend.name, routing_shares(result.routing.tokens, spec.top_k))
            options = point.run.backend_options[point.backend.name]
            peaks = figures.peaks_for(self.hardware, point.backend.device_for(options) == "cpu", dtype,
                                      point.backend.devices_used(options))
            figures.efficiency(m, spec, found, result.engine, peaks, result.placement, self.hardware)
            _, kv_dtype, wb = figures.served_bytes(result.engine)
            result.decode_steps = metrics.steps_record(found.steps, found.source, found.method, dtype or "unknown",
                                                       kv_dtype, wb)
        metrics.energy(m, joules, meter.source if joules is not None else None, meter.reason)
        peak = point.memory.stop() if point.memory else None
        figures.memory(m, peak.peak_bytes if peak else None,
                       peak.method if peak else "an attached server's processes are not capbench's to measure",
                       peak.device_bytes if peak else None, session.kv_capacity_tokens, self._memory_need(point, dtype))
        figures.price(m, self.cost, self.hardware)
        metrics.goodput(m, main.records, point.run.config.slo, main.window_ns)
        metrics.workload_figures(m, main.records)
        client_figures(m, main.health, point.procs, session.base_url is None)
        m.prefix_cache_reset = result.metrics.prefix_cache_reset
        m.notes["prefix_cache_reset"] = point.cache_note
        if report is not None:
            engine = report.engine_metrics
            result.engine_metrics = engine.record()
            m.server_ttft_ms_mean = engine.server_ttft_ms_mean
            m.server_tpot_ms_mean = engine.server_tpot_ms_mean
            m.server_e2e_ms_mean = engine.server_e2e_ms_mean
            if engine.prefix_cache_queries:
                m.prefix_cache_hit_rate_engine = (engine.prefix_cache_hits or 0.0) / engine.prefix_cache_queries
            m.notes.update({f"engine.{k}": v for k, v in report.notes.items()})
        result.requests = records
        result.metrics = m


    @staticmethod
    def _memory_need(point: Point, dtype: str | None) -> figures.MemoryNeed | None:
        """Weights in the served dtype and the KV cache of this level's sequences at the run's context."""
        from capbench_core.analytics.checkpoint import max_context

        if point.spec is None or dtype not in DTYPE_BYTES or point.shape is None:
            return None
        context = point.shape.context_for(max_context(point.run.model)) or 2048
        return figures.memory_need(point.spec, str(dtype), point.level.concurrency, context)


def search_cap(config: RunConfig) -> int:
    """The most requests an SLO search may put in flight (engines size their batch for it): max-concurrency
    doubles from its start at most search_steps - 1 times; max-rate is capped by --concurrency or RATE_CAP."""
    if config.search == "max-concurrency":
        return int(min(RATE_CAP, min(config.concurrency or (1,)) * 2 ** (config.search_steps - 1)))
    return max(config.concurrency) if config.concurrency else RATE_CAP


def analytics_of(run: ResolvedRun) -> tuple[ModelSpec | None, str | None]:
    """The model's analytics, or None and why: an architecture capbench does not count still runs on every
    engine that serves it, with S-MBU and S-MFU null."""
    try:
        return spec_from_path(run.model.path, run.model.name), None
    except CapbenchError as exc:
        return None, f"capbench's analytics cannot count this model ({exc}), so S-MBU and S-MFU are not computed"


def _model_record(run: ResolvedRun, spec: ModelSpec | None, dtype: str | None, note: str | None) -> ModelRecord:
    config = config_of(run.model.path)
    if spec is None:
        return ModelRecord(name=run.model.name, path=str(run.model.path),
                           architecture=str((config or {}).get("model_type") or "unknown"), total_params=None,
                           active_params=None, active_params_no_embed=None, num_experts=None, top_k=None,
                           sparsity=None, dtype=dtype or "unknown", config=config, analytics_note=note)
    return ModelRecord(name=run.model.name, path=str(run.model.path), architecture=spec.architecture,
                       total_params=spec.total_params, active_params=spec.active_params,
                       active_params_no_embed=spec.active_params_no_embed, num_experts=spec.num_experts,
                       top_k=spec.top_k, sparsity=spec.sparsity, dtype=dtype or "unknown", config=config)


def memory_refusal(run: ResolvedRun, backend: Backend, spec: ModelSpec | None, shape: LoadShape) -> str | None:
    """Why a backend cannot start here for lack of memory (weights + KV cache against free host memory, or free
    memory of the GPUs it would use), in numbers; None when it fits or cannot be told (an attached server, a
    model the analytics do not count)."""
    from capbench_core.analytics.checkpoint import max_context, stored_dtype
    from capbench_core.measure.hardware import free_host_memory
    from capbench_core.measure.nvml import free_gpu_memory

    options = run.backend_options[backend.name]
    if spec is None or options.get("endpoint"):
        return None
    stored = stored_dtype(run.model.path) if run.model.path.is_dir() else None
    if run.model.path.is_dir() and stored is None:
        return None  # no weights to load: the backend's own start-up names what is missing
    dtype = backend.planned_dtype(run.model, options) or stored or "bfloat16"
    if dtype not in DTYPE_BYTES:
        return None
    context = shape.context_for(max_context(run.model)) or 2048
    sequences = 1 if backend.serial_decode else shape.max_concurrency  # one at a time: one sequence's KV
    need = figures.memory_need(spec, dtype, sequences, context)
    if backend.device_for(options) == "cpu":
        free, where = free_host_memory(), "of host memory is free"
    else:
        gpus = free_gpu_memory()
        free, where = (sum(gpus) if gpus else None), f"is free on the {len(gpus)} visible GPU(s)"
    if free is None or need.total <= free:
        return None
    return (f"{backend.name} was not started: the model needs at least {need.says(sequences, context)}, "
            f"and only {free / 1e9:.2f} GB {where}")


def load_shape(run: ResolvedRun, workload: Workload) -> LoadShape:
    """The most requests in flight at any level, and a bound on any request's context (a chat request's prompt
    as the model's chat template renders it)."""
    template = None
    if run.chat:
        from capbench_core.analytics.checkpoint import chat_template

        template = chat_template(run.model.path)
    longest = max((len((template.render(r.prompt) if template else r.prompt).encode()) + r.max_tokens + 1
                   for r in workload.requests), default=None)
    talks: dict[str, int] = {}
    for r in workload.requests:
        if r.session:  # a turn carries the earlier turns and replies (a reply re-read may take a few bytes a token)
            talks[r.session] = talks.get(r.session, 0) + len(r.prompt.encode()) + 2 + REPLY_BYTES * r.max_tokens
    if talks:
        longest = max(longest or 0, *talks.values())
    return LoadShape(max(level.concurrency for level in run.levels), longest)


#: bytes a generated token may take when a conversation sends it back (a bound for the context, not a count)
REPLY_BYTES = 4

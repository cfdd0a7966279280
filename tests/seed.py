"""Seeded test results: three hardware fingerprints, four backends, several load levels.

These are test fixtures for the store, the bundles and the leaderboard, not
measurements: every figure is made up here, on purpose, so that tests know what
the pages must show.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from capbench_core.analytics.datasheets import fingerprint
from capbench_core.contract.records import (
    Device,
    EngineInfo,
    HardwareSpec,
    Metrics,
    ModelRecord,
    Peak,
    Routing,
    RunResult,
    WorkloadRecord,
)

GIB = 1024**3


def hardware(gpu: str | None, count: int = 1, cpu: str = "AMD EPYC 9654") -> HardwareSpec:
    devices = [Device(kind="cpu", vendor="AMD", model=cpu, count=1, memory_bytes=512 * GIB)]
    if gpu:
        devices.append(Device(kind="gpu", vendor="NVIDIA", model=gpu, count=count, memory_bytes=80 * GIB))
    return HardwareSpec(devices=devices, cpu_model=cpu, cpu_cores=96, host_memory_bytes=512 * GIB,
                        fingerprint=fingerprint(devices, cpu, 512 * GIB),
                        peak_mem_bw_gbps=Peak(value=3350.0 * count if gpu else 460.0, source="datasheet"),
                        compute_device=gpu or "cpu")


HARDWARE = {"h100": hardware("NVIDIA H100 80GB HBM3"), "a100": hardware("NVIDIA A100-SXM4-80GB"),
            "cpu": hardware(None)}
BACKENDS = {"h100": ["vllm", "sglang"], "a100": ["vllm", "llamacpp_server"], "cpu": ["torch_moe", "llamacpp"]}
MODEL = ModelRecord(name="tiny-moe", path="/models/tiny-moe", architecture="qwen3_moe", total_params=2_900_000,
                    active_params=1_000_000, active_params_no_embed=900_000, num_experts=8, top_k=2,
                    sparsity=0.75, dtype="bfloat16")


def result(hw: str, backend: str, concurrency: int, *, model: ModelRecord = MODEL, task: str = "arith",
           engine_version: str = "1.0", tok_per_s: float | None = None) -> RunResult:
    """One complete run; throughput grows and latency worsens with concurrency, per backend."""
    speed = {"vllm": 3.0, "sglang": 3.3, "llamacpp_server": 1.2, "torch_moe": 1.0, "llamacpp": 1.5}.get(backend, 1.0)
    scale = {"h100": 10.0, "a100": 6.0, "cpu": 1.0}.get(hw, 1.0)
    out = tok_per_s if tok_per_s is not None else 100.0 * speed * scale * concurrency ** 0.7
    return RunResult(
        run_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{hw}/{backend}/{concurrency}/{model.name}/{task}")),
        started_at=datetime(2026, 11, 1, tzinfo=timezone.utc) + timedelta(minutes=concurrency),
        status="complete", capbench_version="0.1.0", backend=backend,
        engine=EngineInfo(name=backend, version=engine_version),
        model=model, hardware=HARDWARE[hw] if hw in HARDWARE else hardware(hw),
        workload=WorkloadRecord(task=task, hash="w1", num_requests=64, warmup_requests=8, concurrency=concurrency,
                                sampling={"temperature": 0.0}),
        metrics=Metrics(num_requests=64, num_completed=64, ttft_ms_p50=20.0 * concurrency / speed,
                        tpot_ms_p50=5.0 * concurrency ** 0.3 / speed, output_tok_per_s=out,
                        accuracy=0.95 + 0.01 * speed, accuracy_n=64, s_mbu=0.1 * speed, s_mfu=0.01 * speed,
                        cost_usd_per_mtok=10.0 / (speed * scale * concurrency ** 0.5),
                        energy_j_per_output_token=0.5 / speed))


#: SGLang rows carry a (made-up) measured routing: 3 MoE layers x 8 experts, layer 0 badly skewed
ROUTING = [[40, 2, 2, 2, 2, 2, 2, 4], [8, 7, 6, 7, 9, 8, 6, 5], [20, 12, 4, 4, 4, 4, 4, 4]]


def with_routing(r: RunResult) -> RunResult:
    from capbench_core.analytics.figures import routing_metrics

    r.routing = Routing(method="seeded loads", tokens=[list(layer) for layer in ROUTING])
    routing_metrics(r.metrics, r.routing)
    return r


def seeded() -> list[RunResult]:
    """12 runs: 3 hardware fingerprints x 2 backends each (4 distinct backends... 5 in all) x c = 1, 4."""
    runs = [result(hw, backend, c) for hw, backends in BACKENDS.items() for backend in backends for c in (1, 4)]
    return [with_routing(r) if r.backend == "sglang" else r for r in runs]

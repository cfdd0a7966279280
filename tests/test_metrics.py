"""Metric formulas on hand-built records, with hand-computed expectations."""

from __future__ import annotations

import pytest
from capbench_models import PUBLISHED_CONFIGS

from capbench_core.analytics import metrics
from capbench_core.analytics.model_spec import spec_from_path
from capbench_core.contract.backend import DecodeStep
from capbench_core.contract.records import Metrics, RequestRecord

MS = 1_000_000
CONFIGS = PUBLISHED_CONFIGS


def rec(offsets_ms: list[float], tokens: list[int] | None = None, **kw) -> RequestRecord:  # type: ignore[no-untyped-def]
    tokens = tokens or [1] * len(offsets_ms)
    return RequestRecord(id="r", sent_ns=0, chunk_offsets_ns=[int(o * MS) for o in offsets_ms],
                         chunk_tokens=tokens, output_tokens=sum(tokens), prompt_tokens=10, **kw)


def test_ttft_tpot_itl_e2e_of_one_request() -> None:
    t = metrics.request_timings(rec([50, 60, 70, 90]))
    assert t.ttft_ms == 50 and t.e2e_ms == 90
    assert t.tpot_ms == pytest.approx((90 - 50) / 3)
    assert t.itl_ms == [10, 10, 20]


def test_multi_token_chunk_counts_its_gap_once() -> None:
    t = metrics.request_timings(rec([40, 60], tokens=[1, 3]))
    assert t.output_tokens == 4 and t.multi_token_chunks == 1
    assert t.itl_ms == [20] and t.tpot_ms == pytest.approx(20 / 3)


def test_empty_chunks_do_not_count_as_tokens() -> None:
    t = metrics.request_timings(rec([5, 50, 60], tokens=[0, 1, 1]))
    assert t.ttft_ms == 50


def test_a_servers_token_free_eos_chunk_ends_e2e() -> None:
    """vLLM, SGLang and llama-server send the EOS step as an empty chunk and count it in their usage: E2E
    ends there, so TPOT spreads the three steps after the first token over three gaps, not two."""
    r = rec([50, 60, 70, 85], tokens=[1, 1, 1, 0])
    r.output_tokens = 4
    t = metrics.request_timings(r)
    assert t.ttft_ms == 50 and t.e2e_ms == 85 and t.tpot_ms == pytest.approx(35 / 3)
    assert t.itl_ms == [10, 10]  # ITL: token-bearing chunks only
    spec = spec_from_path(CONFIGS / "mixtral-8x7b.json")
    steps = metrics.client_side_steps([r], spec, serial=False, window_ns=85 * MS)
    assert [s.step_ns for s in steps] == [10 * MS, 10 * MS, 15 * MS]  # the EOS step is a decode step


def test_single_token_request_has_no_tpot() -> None:
    assert metrics.request_timings(rec([30])).tpot_ms is None


def test_aggregates_exclude_warmup_and_count_errors() -> None:
    records = [rec([10, 20]), rec([30, 40]), rec([1000, 2000], warmup=True),
               RequestRecord(id="e", sent_ns=0, error_kind="ReadTimeout", error="boom")]
    m = metrics.latency_and_throughput(records, window_ns=2_000 * MS)
    assert m.num_requests == 3 and m.num_completed == 2 and m.num_failed == 1
    assert m.error_kinds == {"ReadTimeout": 1}
    assert m.ttft_ms_p50 == 20 and m.ttft_ms_mean == 20
    assert m.output_tokens_total == 4 and m.output_tok_per_s == 2.0
    assert m.input_tok_per_s == 10.0 and m.total_tok_per_s == 12.0 and m.request_throughput_rps == 1.0


def test_unmeasured_is_null_not_zero() -> None:
    m = metrics.latency_and_throughput([], window_ns=None)
    assert m.ttft_ms_p50 is None and m.output_tok_per_s is None


def test_wilson_interval_known_values() -> None:
    low, high = metrics.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = metrics.wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.7225, abs=1e-4)


def test_accuracy_counts_failed_requests_as_wrong() -> None:
    records = [rec([1], correct=True), rec([1], correct=False),
               RequestRecord(id="e", sent_ns=0, error_kind="X", error="x")]
    m = Metrics()
    metrics.accuracy(m, records, "exact_match")
    assert m.accuracy == pytest.approx(1 / 3) and m.accuracy_n == 3


def test_uniform_expected_experts() -> None:
    assert metrics.uniform_expected_experts(8, 2, 1) == pytest.approx(2.0)
    assert metrics.uniform_expected_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))
    assert metrics.uniform_expected_experts(64, 8, 1000) == pytest.approx(64, rel=1e-6)


def test_decode_step_bytes_and_flops_by_hand() -> None:
    spec = spec_from_path(CONFIGS / "mixtral-8x7b.json")
    expert = 3 * 4096 * 14336
    step = DecodeStep(batch_size=4, step_ns=10 * MS, context_tokens=400, distinct_experts=[5] * 32)
    cost = metrics.decode_step_cost(spec, step, "bfloat16", "bfloat16")
    dense = spec.active_params_no_embed - 32 * 2 * expert
    kv = 400 * 32 * 2 * 8 * 128 * 2
    assert cost.bytes == (dense + 32 * 5 * expert + 4 * 4096) * 2 + kv
    attention = 2 * 32 * (4096 + 4096) * 400
    norms = 32 * 2 * 4096 + 4096  # elementwise: read, but no matmul FLOPs
    assert cost.flops == 4 * 2.0 * (dense - norms + 32 * 2 * expert) + attention


def test_s_mbu_and_s_mfu_are_sums_over_time() -> None:
    spec = spec_from_path(CONFIGS / "mixtral-8x7b.json")
    steps = [DecodeStep(1, 10 * MS, 100, [2] * 32), DecodeStep(8, 30 * MS, 800, [7] * 32)]
    m = Metrics()
    metrics.sparse_efficiency(m, spec, steps, "measured", "test", "bfloat16", 8000.0, 1000.0)
    costs = [metrics.decode_step_cost(spec, s, "bfloat16", "bfloat16") for s in steps]
    assert m.s_mbu == pytest.approx(sum(c.bytes for c in costs) / 0.040 / 8000e9)
    assert m.s_mfu == pytest.approx(sum(c.flops for c in costs) / 0.040 / 1000e12)
    assert m.experts_activated_per_layer_mean == 4.5 and m.expert_activation_source == "measured"


def test_impossible_utilisation_is_null_with_reason() -> None:
    spec = spec_from_path(CONFIGS / "mixtral-8x7b.json")
    m = Metrics()
    metrics.sparse_efficiency(m, spec, [DecodeStep(1, MS, 1, [2] * 32)], "estimated", "t", "bfloat16", 100.0, 1e6)
    assert m.s_mbu is None and "> 100 %" in m.notes["s_mbu"]
    assert m.s_mfu is not None


def test_s_mbu_is_null_with_reason_without_peaks() -> None:
    spec = spec_from_path(CONFIGS / "mixtral-8x7b.json")
    m = Metrics()
    metrics.sparse_efficiency(m, spec, [DecodeStep(1, MS, 1, [2] * 32)], "measured", "t", "bfloat16", None, None)
    assert m.s_mbu is None and "peak memory bandwidth" in m.notes["s_mbu"]


def test_energy_per_token() -> None:
    m = Metrics(output_tokens_total=500)
    metrics.energy(m, 100.0, "RAPL", "")
    assert m.energy_j_per_output_token == 0.2
    m2 = Metrics()
    metrics.energy(m2, None, None, "no counter")
    assert m2.energy_j is None and m2.notes["energy_j"] == "no counter"


def test_conventions_recompute_from_raw_timestamps() -> None:
    from capbench_core.analytics.conventions import recompute
    from tests.test_store_schema import make_result

    result = make_result()
    r = rec([50, 60, 70, 90], tokens=[1, 1, 1, 1])
    r.max_tokens = 10
    result.requests = [r]
    assert recompute(result, "vllm")["tpot_ms_p50"] == pytest.approx(40 / 3)
    assert recompute(result, "guidellm")["tpot_ms_p50"] == pytest.approx(90 / 4)
    assert recompute(result, "guidellm")["itl_ms_p50"] == pytest.approx(40 / 3)
    assert recompute(result, "llmperf")["itl_ms_p50"] == pytest.approx(90 / 4)
    assert recompute(result, "sglang")["tpot_ms_p50"] == pytest.approx(40 / 3)
    r.token_count_source = "tokenizer"
    assert recompute(result, "sglang")["tpot_ms_p50"] == pytest.approx(40 / 9)  # falls back to max_tokens
    assert recompute(result, "vllm")["itl_ms_p50"] == 10


def test_nvml_meter_without_nvml_gives_a_reason() -> None:
    import importlib.util

    from capbench_core.measure.energy import NvmlMeter

    meter = NvmlMeter()
    meter.start()
    joules = meter.stop()
    if importlib.util.find_spec("pynvml") is None:
        assert joules is None and "nvidia-ml-py is not installed" in meter.reason
    elif joules is None:  # NVML present but no GPU or no counter: the reason says which
        assert "NVML" in meter.reason

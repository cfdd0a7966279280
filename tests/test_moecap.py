"""MoE-CAP's S-MBU/S-MFU convention (capbench_core/analytics/moecap.py) pinned on hand-computed cases, and shown
beside capbench's own for stored runs."""

from __future__ import annotations

import json

import pytest
from capbench_models import PUBLISHED_CONFIGS

from capbench_core.analytics import moecap
from capbench_core.contract.backend import DecodeStep
from capbench_core.contract.records import Device, HardwareSpec, Peak
from tests.conftest import run_cli

# A Mixtral-layout toy small enough to count by hand: MoE-CAP's "default" formula.
TOY = {"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 4, "num_attention_heads": 2,
       "num_key_value_heads": 1, "head_dim": 2, "intermediate_size": 8, "num_local_experts": 4,
       "num_experts_per_tok": 2}


def test_default_formula_by_hand() -> None:
    """attn = 4*(2*2 + 2*1*2) + 2*2*4 = 48; expert = 3*8*4 = 96; KV per token = 2*2 layers*2*1 = 8;
    score factor = 2 layers * 2 heads * 2 = 8. One pass: B=2, 1 ms, summed context 10, A = (2+3)/2.
    bytes = (2*(2.5*96 + 48) + 10*8) * 2 (bf16) = 1312      -> / 1 ms / 1e6 B/s = 1.312
    FLOPs = (2*(48 + 96) + 10*8*2) * 2 * (2 / 1 ms) = 1.792e6 -> / 1e6 FLOP/s = 1.792  (one expert, not top-k)"""
    s = moecap.shape(TOY)
    assert (s.attn, s.expert, s.kv_per_token, s.score_k) == (48, 96, 8, 8)
    smbu, smfu = moecap.step_efficiency(s, DecodeStep(2, 1_000_000, 10, [2.0, 3.0]), 2.0,
                                        moecap.Peaks(1e6, 1e6, "test"))
    assert smbu == pytest.approx(1.312) and smfu == pytest.approx(1.792)


def test_qwen3_counts_dense_layers_and_deepseek_two_shared_experts() -> None:
    qwen3 = moecap.shape({**TOY, "model_type": "qwen3_moe", "moe_intermediate_size": 2, "mlp_only_layers": [0]})
    assert (qwen3.family, qwen3.moe_layers, qwen3.dense_layers) == ("qwen3", 1, 1)
    assert qwen3.expert == 3 * 2 * 4 and qwen3.dense_ffn == 3 * 8 * 4
    ds = json.loads(open(PUBLISHED_CONFIGS / "deepseek-v3.json").read())
    shape = moecap.shape(ds)
    assert shape.family == "deepseek" and shape.shared == 2 * shape.expert  # V3 has one shared expert
    assert shape.kv_per_token == 61 * (512 + 64)


def test_peaks_come_from_moe_caps_table_halved_where_it_lists_the_device() -> None:
    h100 = HardwareSpec(devices=[Device(kind="gpu", vendor="NVIDIA", model="NVIDIA H100 80GB HBM3", count=2)],
                        cpu_model="x", cpu_cores=1, host_memory_bytes=1, fingerprint="f",
                        peak_mem_bw_gbps=Peak(value=6700, source="datasheet"))
    peaks = moecap.peaks_for(h100, "bfloat16", True, 6700, 1978.8)
    assert peaks is not None and peaks.bw == 2 * 3350e9 and peaks.flops == 2 * 1979e12 / 2
    cpu = moecap.peaks_for(h100, "float32", False, 25.0, 0.1)
    assert cpu is not None and (cpu.bw, cpu.flops) == (25e9, 0.1e12) and "not halved" in cpu.note


def test_compare_shows_both_conventions_for_stored_runs(db_url: str) -> None:
    run_cli("run", "--backend", "torch_moe", "--num-requests", "8", "--warmup", "0", "--concurrency", "1,4",
            "--db", db_url, check=True)
    rows = json.loads(run_cli("compare", "--db", db_url, "--convention", "moe-cap", "--json", check=True).stdout)
    assert len(rows) == 2
    for row in rows:
        assert row["s_mbu"] > 0 and row["moe_cap_s_mbu"] > 0 and row["moe_cap_s_mfu"] > 0
        assert row["note"].startswith("qwen3 formula")
    shown = run_cli("compare", "--db", db_url, "--convention", "moe-cap", check=True).stdout
    assert "S-MBU MoE-CAP" in shown and "torch_moe" in shown

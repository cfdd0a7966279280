"""The tiered placement model, checked against the world (DeepEP's published bytes and bandwidths, published
offloading anchors), against capbench's own decode-step bytes, and in its uses: the placement study, placement
records, tiered S-MBU and the cost models that count CPU sockets, DRAM and NICs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from capbench_models import PUBLISHED_CONFIGS

from capbench_core.analytics import cost, metrics
from capbench_core.analytics.metrics import decode_step_cost
from capbench_core.analytics.model_spec import spec_from_path
from capbench_core.analytics.placement import (
    Placement,
    System,
    combine_bytes_per_token,
    dispatch_bytes_per_token,
    step_model,
)
from capbench_core.contract.backend import DecodeStep
from capbench_core.contract.records import Device, HardwareSpec, Metrics, Peak, TierUse
from capbench_core.contract.records import Placement as PlacementRecord
from capbench_core.errors import CapbenchError
from tests.conftest import run_cli


def spec(name: str):  # type: ignore[no-untyped-def]
    return spec_from_path(PUBLISHED_CONFIGS / name, name)


def test_deepep_dispatch_and_combine_bytes_reproduce_its_published_bandwidths() -> None:
    """DeepEP low-latency kernels, EP8, 128 tokens, hidden 7168, top-8: dispatch 77 us at 98 GB/s (FP8 with
    scales), combine 114 us at 127 GB/s (BF16) — its README."""
    dispatch, combine = dispatch_bytes_per_token(8, 7168), combine_bytes_per_token(8, 7168)
    assert dispatch == 8 * (7168 + 7168 / 128 * 4 + 16) == 59264
    assert combine == 8 * 2 * 7168
    assert 128 * dispatch / 77e-6 / 1e9 == pytest.approx(98, rel=0.02)
    assert 128 * combine / 114e-6 / 1e9 == pytest.approx(127, rel=0.02)


# Published offloaded-decode anchors (the placement notes name each source): model config, bytes per weight,
# machine, placement, batch 1, measured tok/s.
ANCHORS = [
    ("KTransformers, DeepSeek-V3 Q4_K_M, Xeon Gold 6454S 1 socket + RTX 4090D, experts on CPU", "deepseek-v3.json",
     "q4_k", System("1 x 4090D + 6454S", 1, host_dram_gbps=307.2, host_tflops=None, device_mem_gbps=1008,
                    pcie_gbps=31.5), Placement("experts on CPU", "host_compute"), 8.73),
    ("KTransformers, same, 2 sockets", "deepseek-v3.json", "q4_k",
     System("1 x 4090D + 2 x 6454S", 1, host_dram_gbps=614.4, host_tflops=None, device_mem_gbps=1008,
            pcie_gbps=31.5), Placement("experts on CPU", "host_compute"), 12.21),
    ("llama.cpp --n-cpu-moe 36, Qwen3-30B-A3B Q4_K_M, RTX 2080 + quad-channel DDR4", "qwen3-30b-a3b.json", "q4_k",
     System("RTX 2080 + i9-10900X", 1, host_dram_gbps=102, host_tflops=None, device_mem_gbps=448, pcie_gbps=15.75),
     Placement("--n-cpu-moe 36", "host_compute", host_layers=36), 36.7),
    ("MoE-Infinity, Mixtral-8x7B, A5000 over PCIe 4.0 (0.735 s/token)", "mixtral-8x7b.json", "bfloat16",
     System("A5000", 1, host_dram_gbps=100, host_tflops=None, device_mem_gbps=768, pcie_gbps=32),
     Placement("experts fetched over PCIe", "host_fetch"), 1 / 0.735),
    ("Qwen3-30B-A3B on an i7-8700, CPU only", "qwen3-30b-a3b.json", "q4_k",
     System("i7-8700", 0, host_dram_gbps=41.6, host_tflops=None), Placement("CPU"), 10.6),
]


@pytest.mark.parametrize("anchor", ANCHORS, ids=[a[0].split(",")[0] + f"-{i}" for i, a in enumerate(ANCHORS)])
def test_the_bound_is_above_every_published_offload_anchor(anchor: tuple) -> None:  # type: ignore[type-arg]
    label, config, dtype, system, placement, measured = anchor
    bound = step_model(spec(config), placement, system, batch=1, context=512, dtype=dtype)
    efficiency = measured / bound.tok_per_s
    out = os.environ.get("CAPBENCH_PLACEMENT_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"anchor": label, "measured_tok_s": measured, "bound_tok_s": bound.tok_per_s,
                                "efficiency": efficiency, "bottleneck": bound.bottleneck}) + "\n")
    assert 0.1 < efficiency <= 1.0, (label, bound.tok_per_s, bound.bytes)


def test_cpu_only_bytes_are_capbenchs_decode_step_bytes() -> None:
    """One definition of what a decode step reads: the placement model's host bytes on a CPU-only machine are
    decode_step_cost's, at the same routing and context."""
    s = spec("qwen3-30b-a3b.json")
    got = step_model(s, Placement("cpu"), System("cpu", 0, host_dram_gbps=100, host_tflops=None), batch=8,
                     context=1000, dtype="bfloat16", experts_per_layer=30.0)
    step = DecodeStep(batch_size=8, step_ns=0, context_tokens=8 * 1000, distinct_experts=[30.0] * s.moe_layers)
    assert got.bytes["host_dram"] == pytest.approx(decode_step_cost(s, step, "bfloat16", "bfloat16").bytes)
    assert got.experts_source == "measured"


def test_the_n_cpu_moe_ladder_is_linear_in_n() -> None:
    """llama.cpp runs the layers one after the other: each layer moved to the host adds the same time."""
    s = spec("qwen3-30b-a3b.json")
    system = System("H100 + DDR5", 1, host_dram_gbps=307.2, host_tflops=None, device_mem_gbps=3350, pcie_gbps=63)
    times = [step_model(s, Placement(f"n{n}", "host_compute", host_layers=n), system, 1, 1024).step_s
             for n in (0, 12, 24, 36, 48)]
    steps = [b - a for a, b in zip(times, times[1:])]
    assert all(d > 0 for d in steps) and max(steps) == pytest.approx(min(steps), rel=1e-6)


def test_expert_parallelism_splits_the_experts_and_pays_the_link() -> None:
    s = spec("deepseek-v3.json")
    system = System("16 x H100", 16, host_dram_gbps=614.4, host_tflops=None, device_mem_gbps=3350,
                    device_tflops=989.4, device_memory_gb=80, pcie_gbps=63, nvlink_gbps=450, infiniband_gbps=50)
    tp = step_model(s, Placement("tp", tp=16), system, 64, 4096, "fp8")
    ep = step_model(s, Placement("ep", ep=16, ep_link="infiniband"), system, 64, 4096, "fp8")
    assert ep.fits and ep.memory_per_device_gb is not None and ep.memory_per_device_gb < 80
    per_token = dispatch_bytes_per_token(8, 7168) + combine_bytes_per_token(8, 7168)
    assert ep.bytes["infiniband"] == pytest.approx(s.moe_layers * 64 * per_token * 15 / 16)
    assert ep.tok_per_s > tp.tok_per_s  # 16 x 64 sequences in flight against 64
    with pytest.raises(CapbenchError, match="spreads the model over 32 devices"):
        step_model(s, Placement("ep32", ep=32), system, 1, 1, "fp8")


def test_study_placement_prints_and_stores_the_comparison(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'p.db'}"
    out = run_cli("study", "placement", "--model", "Qwen3-30B-A3B-config", "--hardware", "H100 SXM", "--db", db,
                  "--json", check=True).stdout
    study = json.loads(out)
    names = {r["placement"] for r in study["rows"]}
    assert {"all on device", "experts on host, CPU computes", "experts on host, fetched over PCIe",
            "--n-cpu-moe 36"} <= names
    device = next(r for r in study["rows"] if r["placement"] == "all on device" and r["batch"] == 1)
    fetched = next(r for r in study["rows"] if r["placement"].endswith("PCIe") and r["batch"] == 1)
    assert device["bottleneck"] == "device_mem" and fetched["bottleneck"] == "pcie"
    assert device["tok_per_s"] > fetched["tok_per_s"] and device["usd_per_mtok"] < fetched["usd_per_mtok"]
    table = run_cli("study", "placement", "--model", "DeepSeek-V3-config", "--hardware", "H100 SXM", "--devices",
                    "16", "--dtype", "fp8", "--db", db, env={"COLUMNS": "200"}, check=True).stdout
    assert "EP16 over InfiniBand" in table and "a bytes-over-bandwidth bound" in table
    site = tmp_path / "site"
    run_cli("leaderboard", "build", "--db", db, "--out", str(site), check=True)
    page = (site / "placement.html").read_text()
    assert "DeepSeek-V3-config" in page and "Qwen3-30B-A3B-config" in page


# --- rows: placement records, tiered S-MBU, cost ------------------------------------------------------

def test_llama_server_placement_follows_its_options_on_a_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from capbench_llamacpp.server import LlamaCppServerBackend

    b = LlamaCppServerBackend()
    monkeypatch.setattr(b, "resolve", lambda opts: SimpleNamespace(device="cuda"))
    ladder = b.placement(b.parse({"n_cpu_moe": "12"}))
    assert ladder.host_expert_layers == 12 and ladder.weights["routed_experts"].tier == "split"
    assert ladder.weights["attention_dense"].tier == "device"
    assert b.placement(b.parse({"override_tensor": r"blk\..*_exps\.=CPU"})).weights["routed_experts"].tier == "host"
    monkeypatch.setattr(b, "resolve", lambda opts: SimpleNamespace(device="cpu"))
    cpu = b.placement(b.parse({"n_cpu_moe": "12"}))
    assert cpu.weights["routed_experts"].tier == "host" and "no GPU to act on" in cpu.source


def test_vllm_placement_records_parallelism_and_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    from capbench_vllm import VLLMBackend

    b = VLLMBackend()
    monkeypatch.setattr(type(b), "device_for", lambda self, options: "accelerator")
    p = b.placement(b.parse({"tp": "2", "dp": "2", "enable_expert_parallel": "true", "cpu_offload_gb": "8"}))
    assert (p.tp, p.dp, p.ep, p.all_to_all) == (2, 2, 4, "allgather_reducescatter")
    assert p.host_offload_gb == 8 and p.weights["routed_experts"].execution == "host_fetch"


def _gpu_hardware() -> HardwareSpec:
    return HardwareSpec(devices=[Device(kind="cpu", vendor="Intel", model="Intel(R) Xeon(R) Platinum 8480+", count=2),
                                 Device(kind="gpu", vendor="NVIDIA", model="NVIDIA H100 80GB HBM3", count=8)],
                        cpu_model="Intel(R) Xeon(R) Platinum 8480+", cpu_cores=224, host_memory_bytes=2 * 10**12,
                        fingerprint="f", peak_mem_bw_gbps=Peak(value=8 * 3350, source="datasheet"),
                        cpu_peak_mem_bw_gbps=Peak(value=500, source="measured"))


def test_tiered_s_mbu_divides_each_tier_by_its_own_bandwidth() -> None:
    s = spec("qwen3-30b-a3b.json")
    steps = [DecodeStep(batch_size=1, step_ns=10_000_000, context_tokens=100, distinct_experts=[8.0] * 48)] * 5
    placement = PlacementRecord.uniform("device", "test")
    placement.weights["routed_experts"] = TierUse(tier="split", execution="host_compute")
    placement.host_expert_layers = 24
    m = Metrics()
    metrics.sparse_efficiency(m, s, steps, "measured", "test", "bfloat16", 3350.0, 989.0)
    single = m.s_mbu
    tiers = {"device_mem": 3350.0, "host_dram": 500.0, "pcie": 63.0}
    metrics.tiered_mbu(m, s, steps, "bfloat16", placement, tiers)
    host_bytes = 5 * 8 * 48 * s.expert_params * 2 / 2  # half the layers' experts on the host
    assert m.s_mbu_single == single
    assert m.s_mbu_tiers["host_dram"] == pytest.approx(host_bytes / 0.05 / 500e9)
    assert m.s_mbu == max(m.s_mbu_tiers.values()) and "bottleneck tier is host_dram" in m.notes["s_mbu"]
    untouched = Metrics()
    metrics.sparse_efficiency(untouched, s, steps, "measured", "test", "bfloat16", 3350.0, 989.0)
    metrics.tiered_mbu(untouched, s, steps, "bfloat16", PlacementRecord.uniform("device", "t"), tiers)
    assert untouched.s_mbu == single and not untouched.s_mbu_tiers  # one memory: unchanged


def test_a_cpu_machine_gets_a_labelled_estimated_price() -> None:
    hw = HardwareSpec(devices=[], cpu_model="x", cpu_cores=2, host_memory_bytes=24 * 1024**3, fingerprint="f",
                      peak_mem_bw_gbps=Peak(value=20, source="measured"))
    estimate = cost.default_estimate(hw)
    assert estimate is not None and estimate.basis == "estimate"
    assert estimate.usd_per_hour == pytest.approx(2 * 0.031611 + 24 * 0.004237)
    assert "estimate" in estimate.name and "as of" in estimate.name


def test_owning_cost_counts_sockets_dram_and_nics_and_names_what_it_leaves_out() -> None:
    capex = cost.parts_preset(_gpu_hardware(), life_years=3, usd_per_kwh=0.1)
    assert capex.hardware_price_usd == pytest.approx(2 * 10710 + 8 * 38000 + 2000 * 18.8 + 8 * 2188)
    assert capex.power_w == 2 * 350 + 8 * 700
    assert "switch ports" in capex.name and "2 x Xeon Platinum 8480+" in capex.name
    with pytest.raises(CapbenchError, match="no row with a price matches"):
        cost.parts_preset(HardwareSpec(devices=[], cpu_model="Some CPU", cpu_cores=2, host_memory_bytes=1,
                                       fingerprint="f", peak_mem_bw_gbps=Peak(source="unknown")), 3, 0.1)

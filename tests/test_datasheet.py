"""The accelerator datasheet: every row sourced and dense, and the names NVML really reports match."""

from __future__ import annotations

import re

import pytest

from capbench_core.analytics.datasheets import accelerator_peaks, datasheet, match_accelerator
from capbench_core.contract.records import Device
from capbench_core.measure.hardware import build_spec


def test_every_row_has_a_source_and_sane_numbers() -> None:
    for row in datasheet():
        assert row["source"].strip(), row["name"]
        assert row["mem_bw_gbps"] > 0 and row["memory_gb"] > 0 and row["tdp_w"] > 0
        assert row["tflops"]["bfloat16"] > 0
        re.compile(row["match"])


@pytest.mark.parametrize("reported,expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
    ("NVIDIA B200", "B200"),
    ("AMD Instinct MI300X", "Instinct MI300X"),
])
def test_nvml_names_match_exactly_one_row(reported: str, expected: str) -> None:
    row = match_accelerator(reported)
    assert row is not None and row["name"] == expected


@pytest.mark.parametrize("reported", ["NVIDIA L40", "NVIDIA H100 80GB HBM3e", "Tesla V100-SXM2-16GB", ""])
def test_unknown_devices_get_no_guess(reported: str) -> None:
    assert match_accelerator(reported) is None


def test_peaks_scale_with_count_and_unknown_is_null_with_reason() -> None:
    bw, flops = accelerator_peaks(Device(kind="gpu", vendor="NVIDIA", model="NVIDIA H100 80GB HBM3", count=8))
    assert bw.value == 8 * 3350 and bw.source == "datasheet" and flops["bfloat16"].value == pytest.approx(8 * 989.4)
    bw, flops = accelerator_peaks(Device(kind="gpu", vendor="NVIDIA", model="NVIDIA L40", count=1))
    assert bw.value is None and "no datasheet entry matches 'NVIDIA L40'" in bw.note and flops == {}
    cpu = Device(kind="cpu", vendor="x", model="cpu", count=1, memory_bytes=2**30)
    spec = build_spec([cpu, Device(kind="gpu", vendor="NVIDIA", model="NVIDIA H200", count=1,
                                   memory_bytes=141 * 10**9)])
    assert spec.peak_mem_bw_gbps.value == 4800 and spec.compute_device == "NVIDIA H200"

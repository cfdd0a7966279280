"""RAPL reading on a fake powercap tree, fingerprints, and measured CPU peaks."""

from __future__ import annotations

from pathlib import Path

from capbench_core.analytics.datasheets import fingerprint
from capbench_core.contract.records import Device
from capbench_core.measure.energy import RaplMeter
from tests.conftest import run_cli


def _domain(root: Path, name: str, uj: int, max_uj: int = 1000) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(str(uj))
    (d / "max_energy_range_uj").write_text(str(max_uj))
    return d


def test_rapl_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    a = _domain(tmp_path, "intel-rapl:0", 900)
    b = _domain(tmp_path, "intel-rapl:1", 100)
    _domain(tmp_path, "intel-rapl:0:0", 5)  # a sub-domain: not summed
    meter = RaplMeter(tmp_path)
    meter.start()
    (a / "energy_uj").write_text("100")  # wrapped: 900 -> 1000 -> 100
    (b / "energy_uj").write_text("400")
    assert meter.stop() == (200 + 300) / 1e6


def test_rapl_absent_gives_reason(tmp_path: Path) -> None:
    meter = RaplMeter(tmp_path / "nothing")
    meter.start()
    assert meter.stop() is None and "no RAPL energy counter" in meter.reason


def test_rapl_unreadable_gives_reason(tmp_path: Path) -> None:
    d = _domain(tmp_path, "intel-rapl:0", 1)
    (d / "energy_uj").unlink()
    meter = RaplMeter(tmp_path)
    meter.start()
    assert meter.stop() is None and "not readable" in meter.reason


def test_fingerprint_depends_on_devices_not_order() -> None:
    gpu = Device(kind="gpu", vendor="NVIDIA", model="NVIDIA H100 80GB HBM3", count=8, memory_bytes=80 * 2**30)
    other = Device(kind="gpu", vendor="NVIDIA", model="NVIDIA A100-SXM4-80GB", count=8, memory_bytes=80 * 2**30)
    base = fingerprint([gpu], "Xeon", 2 * 2**40)
    assert base == fingerprint([gpu], "Xeon", 2 * 2**40 + 2**20)
    assert base != fingerprint([other], "Xeon", 2 * 2**40)
    assert fingerprint([gpu, other], "Xeon", 1) == fingerprint([other, gpu], "Xeon", 1)


def test_hardware_show_is_stable_and_measured() -> None:
    import json

    first = json.loads(run_cli("hardware", "show", "--json", check=True).stdout)
    second = json.loads(run_cli("hardware", "show", "--json", check=True).stdout)
    assert first["fingerprint"] == second["fingerprint"]
    assert first["peak_mem_bw_gbps"]["source"] == "measured" and first["peak_mem_bw_gbps"]["value"] > 0
    assert first["peak_flops_tflops"]["float32"]["value"] > 0

"""Sparsity study, analytic mode: the family holds the active budget, the roofline follows the formulas."""

from __future__ import annotations

import json

import pytest

from capbench_core import sparsity
from tests.conftest import run_cli


def test_family_holds_active_params_and_grows_total_with_experts() -> None:
    members = sparsity.family(1e9, [1, 4, 16, 64], 2)
    actives = [m.active_params for m in members]
    assert max(actives) / min(actives) < 1.01 and abs(actives[0] - 1e9) / 1e9 < 0.01
    totals = [m.total_params for m in members]
    assert totals == sorted(totals) and totals[-1] > 4 * totals[0]
    assert [round(m.sparsity, 4) for m in members] == [0.0, 0.5, 0.875, 0.9688]  # S = (E - k) / E


def test_expected_distinct_experts() -> None:
    assert sparsity.expected_distinct_experts(8, 2, 1) == pytest.approx(2.0)
    assert sparsity.expected_distinct_experts(64, 2, 8) == pytest.approx(64 * (1 - (62 / 64) ** 8))
    assert sparsity.expected_distinct_experts(8, 2, 1000) == pytest.approx(8.0)


def test_roofline_on_h100_is_memory_bound_at_batch_1_and_sparsity_costs_at_batch_64() -> None:
    machine = sparsity.machine_named("H100 SXM")
    rows = sparsity.analyse(sparsity.family(1e9, [1, 64], 2), machine, [1, 64])
    dense, sparse = rows
    one = dense.by_batch[1]
    assert one["bound"] == "memory"
    assert one["step_ms"] == pytest.approx(float(one["bytes"]) / 3350e9 * 1e3)  # type: ignore[arg-type]
    assert sparse.by_batch[1]["tok_per_s"] == pytest.approx(dense.by_batch[1]["tok_per_s"], rel=0.01)
    assert sparse.by_batch[64]["tok_per_s"] < 0.5 * dense.by_batch[64]["tok_per_s"]  # type: ignore[operator]
    assert dense.by_batch[64]["usd_per_mtok"] is not None


@pytest.mark.parametrize("args,message", [
    (["--top-k", "8", "--experts", "1,4"], "top-k 8 is larger than 4 experts"),
    (["--active-params", "1e6"], "smaller than attention, norms and embeddings alone"),
    (["--hardware", "H100 SXN"], "unknown hardware 'H100 SXN' — did you mean 'H100 SXM'?"),
])
def test_bad_families_and_hardware_are_clear(args: list[str], message: str) -> None:
    proc = run_cli("study", "sparsity", *args)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_table_and_json() -> None:
    out = json.loads(run_cli("study", "sparsity", "--json", check=True).stdout)
    assert out["machine"]["name"] == "H100 SXM" and len(out["rows"]) == 6
    table = run_cli("study", "sparsity", "--batch", "1,8", env={"COLUMNS": "250"}, check=True).stdout
    assert "E64-k2" in table and "roofline" in table

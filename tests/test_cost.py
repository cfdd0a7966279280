"""Cost models: hourly price, the dated and sourced price table, capex, and MoE-CAP's preset."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from capbench_core.analytics import cost
from capbench_core.analytics.datasheets import datasheet
from capbench_core.contract.records import Device, HardwareSpec, Metrics
from capbench_core.errors import CapbenchError
from capbench_core.measure.hardware import build_spec

CPU = Device(kind="cpu", vendor="x", model="cpu", count=1, memory_bytes=2**30)


def gpus(model: str, count: int) -> HardwareSpec:
    return build_spec([CPU, Device(kind="gpu", vendor="NVIDIA", model=model, count=count)])


def test_every_price_row_is_dated_sourced_and_names_a_datasheet_accelerator() -> None:
    names = {row["name"] for row in datasheet()}
    rows = cost.price_table()
    assert len(rows) >= 10 and len({r.id for r in rows}) == len(rows)
    for row in rows:
        assert row.accelerator in names, row.id
    preset = cost._table()["moe_cap"]
    assert preset["source"].startswith("https://github.com/Auto-CAP/MoE-CAP/") and set(preset["gpus"]) <= names


@pytest.mark.parametrize("broken", [{"source": ""}, {"source": None}, {"as_of": "recently"}, {"as_of": None},
                                    {"usd_per_hour": -1}, {"source_kind": "blog"}])
def test_a_row_without_a_date_or_source_is_refused(broken: dict[str, object]) -> None:
    row = {**json.loads(cost.price_table()[0].model_dump_json()), **broken}
    with pytest.raises(ValidationError):
        cost.PriceRow.model_validate(row)


def test_cost_per_million_tokens_and_null_reason() -> None:
    m = Metrics(output_tok_per_s=1000.0, total_tok_per_s=4000.0)
    cost.apply(m, cost.Hourly(3.6, "hourly price"), None, "unused")
    assert m.cost_usd_per_mtok == pytest.approx(1.0) and m.cost_usd_per_mtok_all == pytest.approx(0.25)
    m2 = Metrics(output_tok_per_s=1000.0)
    cost.apply(m2, None, None, "no price known")
    assert m2.cost_usd_per_mtok is None and m2.notes["cost_usd_per_mtok"] == "no price known"


def test_price_table_row_scales_to_the_gpus_used_and_refuses_other_hardware() -> None:
    hourly = cost.hourly_from_table("aws-capacity-block:p5.48xlarge", gpus("NVIDIA H100 80GB HBM3", 2))
    assert hourly.usd_per_hour == pytest.approx(39.33 / 8 * 2)
    assert "as of 2024-12" in hourly.name and "aws.amazon.com" in hourly.name
    with pytest.raises(CapbenchError, match="is for H100 SXM, but this run used A100 SXM 80GB; rows for it: "
                                            "runpod:a100-sxm"):
        cost.hourly_from_table("aws-capacity-block:p5.48xlarge", gpus("NVIDIA A100-SXM4-80GB", 1))
    with pytest.raises(CapbenchError, match="did you mean 'runpod:h100-sxm'"):
        cost.hourly_from_table("runpod:h100-sxn", gpus("NVIDIA H100 80GB HBM3", 1))
    with pytest.raises(CapbenchError, match="this machine has none"):
        cost.hourly_from_table("runpod:h100-sxm", build_spec([CPU]))


def test_capex_model_and_its_power_sources() -> None:
    c = cost.Capex(hardware_price_usd=26298.0, life_years=3.0, usd_per_kwh=0.1)
    m = Metrics(output_tok_per_s=1000.0, energy_j=3600.0, duration_s=10.0)
    cost.apply(m, c, 700.0, "")
    hourly = 26298.0 / (3 * 8766) + 0.360 * 0.1  # measured mean power 360 W wins over the TDP
    assert m.price_usd_per_hour == pytest.approx(hourly) and m.cost_usd_per_mtok == pytest.approx(hourly / 3.6)
    assert "measured mean power" in str(m.cost_model)
    m2 = Metrics(output_tok_per_s=1000.0)
    cost.apply(m2, c, 700.0, "")
    assert "datasheet TDP (estimate, not measured)" in str(m2.cost_model)
    m3 = Metrics(output_tok_per_s=1000.0)
    cost.apply(m3, c, None, "")
    assert m3.price_usd_per_hour == pytest.approx(26298.0 / (3 * 8766)) and "left out" in str(m3.cost_model)


def test_moe_cap_preset_uses_its_published_assumptions() -> None:
    c = cost.moe_cap_preset(gpus("NVIDIA H100 80GB HBM3", 2), life_years=3.0)
    assert c.hardware_price_usd == 2 * 38000 + 7214 and c.power_w == 2 * 700 + 350
    m = Metrics(output_tok_per_s=1000.0)
    cost.apply(m, c, None, "")
    expected = (2 * 38000 + 7214) * 1.25 / (3 * 8766) + 1.750 * 0.15 * 1.2
    assert m.price_usd_per_hour == pytest.approx(expected)
    assert "moe-cap preset" in str(m.cost_model) and "x1.25 capital, x1.2 energy" in str(m.cost_model)
    with pytest.raises(CapbenchError, match="MoE-CAP publishes no price for L40S"):
        cost.moe_cap_preset(gpus("NVIDIA L40S", 1), 3.0)
    with pytest.raises(CapbenchError, match="no GPU"):
        cost.moe_cap_preset(build_spec([CPU]), 3.0)

"""Cost models: what one hour of the measured deployment costs, and so $ per million tokens.

Three ways to price an hour, chosen on the command line and recorded in every
result (``cost_model`` names the model and its assumptions):

- an hourly price the user gives (``--price-usd-per-hour``);
- a row of the dated, sourced price table ``data/prices.json`` (``--price-from ID``),
  scaled to the number of accelerators the run used;
- owning the hardware (capex): its price amortised over a stated life plus power x
  $/kWh (``--hardware-price-usd``), or MoE-CAP's published assumptions
  (``--cost-preset moe-cap``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from capbench_core.contract.records import HardwareSpec, Metrics
from capbench_core.errors import CapbenchError, find_name

HOURS_PER_YEAR = 8766  # 365.25 days


class PriceRow(BaseModel):
    """One hourly price: what it buys, when it was published and where it was read."""

    model_config = ConfigDict(extra="forbid")
    id: str
    provider: str
    offering: str
    accelerator: str
    gpus: int = Field(gt=0)
    usd_per_hour: float = Field(gt=0)
    pricing: str
    as_of: str = Field(pattern=r"^\d{4}-\d{2}$")
    source: str = Field(pattern=r"^https://\S+")
    source_kind: str = Field(pattern=r"^(provider|secondary)$")

    def label(self) -> str:
        return (f"{self.id}: {self.offering}, ${self.usd_per_hour:g}/h for {self.gpus} x {self.accelerator} "
                f"(as of {self.as_of}, {self.source_kind} source {self.source})")


@cache
def _table() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(__file__).resolve().parent.parent / "data" / "prices.json").read_text())
    return data


def price_table() -> list[PriceRow]:
    """Every row of data/prices.json, validated (a row without a date or source fails here)."""
    return [PriceRow.model_validate(row) for row in _table()["prices"]]


def price_row(row_id: str) -> PriceRow:
    rows = {row.id: row for row in price_table()}
    return rows[find_name("price table row", row_id, rows)]


def rows_for(accelerator: str) -> list[PriceRow]:
    """Price rows for a datasheet accelerator name (e.g. 'H100 SXM'), cheapest per GPU first."""
    return sorted((r for r in price_table() if r.accelerator == accelerator), key=lambda r: r.usd_per_hour / r.gpus)


def _accelerators(hw: HardwareSpec) -> list[tuple[str, int]]:
    """(datasheet name, count) for the run's accelerators; a device missing from the datasheet raises."""
    from capbench_core.analytics.datasheets import match_accelerator

    found = []
    for device in hw.devices:
        if device.kind == "cpu":
            continue
        row = match_accelerator(device.model)
        if row is None:
            raise CapbenchError(f"no datasheet row matches {device.model!r}, so no price or preset applies to "
                                f"it: pass --price-usd-per-hour or --hardware-price-usd instead")
        found.append((str(row["name"]), device.count))
    return found


@dataclass(frozen=True)
class Hourly:
    """A price per hour, from the user or the price table."""

    usd_per_hour: float
    name: str


@dataclass(frozen=True)
class Capex:
    """Owning the hardware: its price amortised over a stated life, plus electricity.

    The overheads multiply each term (MoE-CAP's preset charges 1.25x capital for the
    rest of the server and 1.2x energy for cooling and delivery); 1.0 by default.
    """

    hardware_price_usd: float
    life_years: float
    usd_per_kwh: float
    power_w: float | None = None  # given; else measured energy, else datasheet TDP (estimate)
    capital_overhead: float = 1.0
    energy_overhead: float = 1.0
    name: str = "capex"


CostModel = Hourly | Capex


def hourly_from_table(row_id: str, hw: HardwareSpec) -> Hourly:
    """A price-table row scaled to this run's accelerators (usd_per_hour / gpus x devices).

    The row must be for the accelerator the run used: pricing an A100 run with an H100 row
    would be a made-up number.
    """
    row = price_row(row_id)
    accel = _accelerators(hw)
    if not accel:
        raise CapbenchError(f"price row {row.id!r} prices {row.accelerator} GPUs, and this machine has none: "
                            f"pass --price-usd-per-hour for a CPU machine")
    names = {name for name, _ in accel}
    if names != {row.accelerator}:
        raise CapbenchError(f"price row {row.id!r} is for {row.accelerator}, but this run used "
                            f"{', '.join(sorted(names))}; rows for it: "
                            f"{', '.join(r.id for r in rows_for(sorted(names)[0])) or '(none)'}")
    count = sum(n for _, n in accel)
    hourly = row.usd_per_hour / row.gpus * count
    return Hourly(hourly, f"price table {row.label()}, x{count}/{row.gpus} GPUs")


def moe_cap_preset(hw: HardwareSpec, life_years: float) -> Capex:
    """MoE-CAP's cost assumptions for this machine's GPUs (see data/prices.json "moe_cap")."""
    preset = _table()["moe_cap"]
    accel = _accelerators(hw)
    if not accel:
        raise CapbenchError("the moe-cap cost preset prices GPU servers, and this machine has no GPU: "
                            "pass --hardware-price-usd for a CPU machine")
    missing = sorted({name for name, _ in accel} - set(preset["gpus"]))
    if missing:
        raise CapbenchError(f"MoE-CAP publishes no price for {', '.join(missing)}; it covers "
                            f"{', '.join(sorted(preset['gpus']))}. Pass --hardware-price-usd instead")
    price = preset["cpu_price_usd"] + sum(preset["gpus"][name]["price_usd"] * n for name, n in accel)
    power = preset["cpu_tdp_w"] + sum(preset["gpus"][name]["tdp_w"] * n for name, n in accel)
    return Capex(price, life_years, preset["usd_per_kwh"], float(power), preset["capital_overhead"],
                 preset["energy_overhead"], name=f"moe-cap preset ({preset['source']}, as of {preset['as_of']})")


def apply(m: Metrics, model: CostModel | None, tdp_w: float | None, missing_reason: str) -> None:
    """Fill cost_usd_per_mtok(_all), price_usd_per_hour and cost_model; null with the reason when unpriced."""
    if model is None:
        m.notes["cost_usd_per_mtok"] = missing_reason
    elif isinstance(model, Hourly):
        _per_mtok(m, model.usd_per_hour, model.name)
    else:
        _capex(m, model, tdp_w)


def _per_mtok(m: Metrics, usd_per_hour: float, name: str) -> None:
    """cost_usd_per_mtok = $/h / (output tok/s x 3600) x 1e6; *_all uses all tokens (input + output)."""
    m.cost_model, m.price_usd_per_hour = name, usd_per_hour
    if m.output_tok_per_s:
        m.cost_usd_per_mtok = usd_per_hour / (m.output_tok_per_s * 3600) * 1e6
    else:
        m.notes["cost_usd_per_mtok"] = "no output throughput was measured"
    if m.total_tok_per_s:
        m.cost_usd_per_mtok_all = usd_per_hour / (m.total_tok_per_s * 3600) * 1e6


def _capex(m: Metrics, c: Capex, tdp_w: float | None) -> None:
    """$/h = price x capital_overhead / (life x 8766 h) + kW x $/kWh x energy_overhead.

    Power: the figure given (by the user or the preset), else the measured mean power over
    the window (energy / duration), else the datasheet TDP labelled as an estimate; with
    none of them, the energy term is left out and the name says so.
    """
    if c.power_w is not None:
        power, source = c.power_w, "power given" if c.name == "capex" else "the preset's TDPs (not measured)"
    elif m.energy_j is not None and m.duration_s:
        power, source = m.energy_j / m.duration_s, f"measured mean power ({m.energy_source})"
    elif tdp_w is not None:
        power, source = tdp_w, "datasheet TDP (estimate, not measured)"
    else:
        power, source = 0.0, "no power known: energy cost left out"
    hourly = (c.hardware_price_usd * c.capital_overhead / (c.life_years * HOURS_PER_YEAR)
              + power / 1000 * c.usd_per_kwh * c.energy_overhead)
    overheads = (f" (x{c.capital_overhead:g} capital, x{c.energy_overhead:g} energy)"
                 if (c.capital_overhead, c.energy_overhead) != (1.0, 1.0) else "")
    _per_mtok(m, hourly, f"{c.name}: ${c.hardware_price_usd:g} over {c.life_years:g} years + {power:.0f} W x "
                         f"${c.usd_per_kwh:g}/kWh{overheads} ({source})")

"""Cost models: what one hour of the measured deployment costs, and so $ per million tokens.

Three ways to price an hour, chosen on the command line and recorded in every
result (``cost_model`` names the model and its assumptions):

- an hourly price the user gives (``--price-usd-per-hour``);
- a row of the dated, sourced price table ``data/prices.json`` (``--price-from ID``),
  scaled to the number of accelerators the run used;
- owning the hardware (capex): its price amortised over a stated life plus power x
  $/kWh (``--hardware-price-usd``), MoE-CAP's published assumptions
  (``--cost-preset moe-cap``), or the server priced by its parts — accelerators, CPU
  sockets, host DRAM, NICs — from the sourced tables (``--cost-preset parts``).

With none of them, a run still gets a price, labelled an estimate (``cost_basis``):
the cheapest price-table row for its accelerators, or on a CPU-only machine its
logical CPUs and memory at a public cloud's on-demand per-vCPU and per-GB rates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

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
    """A price per hour, from the user (``given``), the price table, or an ``estimate`` nobody asked for."""

    usd_per_hour: float
    name: str
    basis: Literal["given", "price_table", "estimate"] = "given"


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
    return Hourly(hourly, f"price table {row.label()}, x{count}/{row.gpus} GPUs", "price_table")


def default_estimate(hw: HardwareSpec) -> Hourly | None:
    """The price a run gets when none was given, labelled an estimate: the cheapest price-table row per GPU for
    its accelerators, or for a CPU-only machine its logical CPUs and memory at the cloud VM rates of
    data/prices.json ("cpu_vm"); None when the accelerators have no row."""
    try:
        accel = _accelerators(hw)
    except CapbenchError:
        return None
    if accel:
        names = {name for name, _ in accel}
        rows = rows_for(sorted(names)[0]) if len(names) == 1 else []
        if not rows:
            return None
        count = sum(n for _, n in accel)
        row = rows[0]
        return Hourly(row.usd_per_hour / row.gpus * count,
                      f"estimate: the cheapest price-table row for this GPU, {row.label()}, x{count}/{row.gpus} GPUs "
                      f"(pass --price-usd-per-hour or --price-from for your own)", "estimate")
    vm = _table()["cpu_vm"]
    gib = hw.host_memory_bytes / 1024**3
    hourly = hw.cpu_cores * vm["usd_per_vcpu_hour"] + gib * vm["usd_per_gb_hour"]
    return Hourly(hourly, f"estimate: {hw.cpu_cores} vCPUs x ${vm['usd_per_vcpu_hour']:g}/h + {gib:.0f} GB x "
                          f"${vm['usd_per_gb_hour']:g}/h, {vm['provider']} {vm['offering']} (as of {vm['as_of']}, "
                          f"{vm['source_kind']} source {vm['source']}); pass --price-usd-per-hour for your own",
                  "estimate")


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


def parts_preset(hw: HardwareSpec, life_years: float, usd_per_kwh: float) -> Capex:
    """Owning the server priced by its parts from the sourced tables: accelerators (MoE-CAP's published GPU
    prices), CPU sockets (data/hosts.json), host DRAM per GB and one NIC per accelerator (data/prices.json
    "components"); power = the accelerators' and sockets' TDPs. A part without a sourced price is named and left
    out."""
    from capbench_core.analytics.datasheets import match_accelerator, match_host

    host = match_host(hw.cpu_model)
    if host is None or host["price_usd"] is None:
        raise CapbenchError(f"the parts preset prices CPU sockets from capbench_core/data/hosts.json, and no row "
                            f"with a price matches {hw.cpu_model!r}: add a sourced row, or pass --hardware-price-usd")
    sockets = sum(d.count for d in hw.devices if d.kind == "cpu") or 1
    parts = [(f"{sockets} x {host['name']} (${host['price_usd']:,}, {host['price_as_of']})",
              float(host["price_usd"]) * sockets, float(host["tdp_w"]) * sockets)]
    gpu_prices = _table()["moe_cap"]["gpus"]
    accel = _accelerators(hw)
    for name, n in accel:
        if name not in gpu_prices:
            raise CapbenchError(f"no sourced purchase price for {name} (MoE-CAP's table covers "
                                f"{', '.join(sorted(gpu_prices))}): pass --hardware-price-usd")
        row = match_accelerator(name) or {}
        parts.append((f"{n} x {name} (${gpu_prices[name]['price_usd']:,}, MoE-CAP)",
                      float(gpu_prices[name]["price_usd"]) * n, float(row.get("tdp_w") or 0) * n))
    components = _table()["components"]
    gb = hw.host_memory_bytes / 1e9
    dram = components["dram_usd_per_gb"]
    parts.append((f"{gb:.0f} GB DRAM x ${dram['value']:g}/GB ({dram['as_of']})", gb * dram["value"], 0.0))
    left_out = ["DRAM power (no sourced figure)"]
    nic = components["nic_usd_per_device"]
    if accel:
        count = sum(n for _, n in accel)
        parts.append((f"{count} NICs x ${nic['value']:,} ({nic['as_of']})", count * float(nic["value"]), 0.0))
        switch = components["switch_port_usd_per_device"]["note"]
        left_out += ["NIC power (no sourced figure)", f"switch ports ({switch})"]
    price = sum(p for _, p, _ in parts)
    power = sum(w for _, _, w in parts)
    return Capex(price, life_years, usd_per_kwh, power,
                 name=f"parts: {'; '.join(n for n, _, _ in parts)}; not counted: {', '.join(left_out)}")


def apply(m: Metrics, model: CostModel | None, tdp_w: float | None, missing_reason: str) -> None:
    """Fill cost_usd_per_mtok(_all), price_usd_per_hour, cost_model and cost_basis; null with the reason when
    unpriced."""
    if model is None:
        m.notes["cost_usd_per_mtok"] = missing_reason
    elif isinstance(model, Hourly):
        m.cost_basis = model.basis
        _per_mtok(m, model.usd_per_hour, model.name)
    else:
        m.cost_basis = "capex"
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

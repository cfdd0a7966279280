"""Terminal rendering of results (rich): the CAP table and model breakdowns.

Nulls print as '—' and their reasons are listed once under the table.
All values are rendered as plain text (no rich markup is interpreted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from capbench_core.model_spec import ModelSpec
from capbench_core.results import RunResult

DASH = "—"


def _fmt(value: float | None, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.2f}%"


def _accuracy(r: RunResult) -> str:
    m = r.metrics
    if m.accuracy is None:
        return DASH
    interval = ("" if m.accuracy_ci95_low is None or m.accuracy_ci95_high is None
                else f" [{m.accuracy_ci95_low:.2f},{m.accuracy_ci95_high:.2f}]")
    return f"{m.accuracy:.3f}{interval}" + (f" n={m.accuracy_n}" if m.accuracy_n else "")


def _experts(r: RunResult) -> str:
    m = r.metrics
    if m.experts_activated_per_layer_mean is None:
        return DASH
    tag = "meas" if m.expert_activation_source == "measured" else "est"
    return f"{m.experts_activated_per_layer_mean:.2f}/{r.model.num_experts} {tag}"


def load_label(r: RunResult) -> str:
    """`c=8` for a closed-loop level, `2/s` for a Poisson rate."""
    return f"{r.workload.rate_rps:g}/s" if r.workload.rate_rps else f"c={r.workload.concurrency}"


COLUMNS: list[tuple[str, Callable[[RunResult], str]]] = [
    ("backend", lambda r: r.backend),
    ("load", load_label),
    ("status", lambda r: r.status),
    ("TTFT p50 ms", lambda r: _fmt(r.metrics.ttft_ms_p50, ".2f")),
    ("TPOT p50 ms", lambda r: _fmt(r.metrics.tpot_ms_p50, ".2f")),
    ("out tok/s", lambda r: _fmt(r.metrics.output_tok_per_s, ".1f")),
    ("accuracy [95% CI]", _accuracy),
    ("A experts/layer", _experts),
    ("S-MBU", lambda r: _pct(r.metrics.s_mbu)),
    ("S-MFU", lambda r: _pct(r.metrics.s_mfu)),
    ("$/Mtok", lambda r: _fmt(r.metrics.cost_usd_per_mtok, ".4g")),
    ("J/token", lambda r: _fmt(r.metrics.energy_j_per_output_token, ".4g")),
]

NOTE_KEYS = {"cost_usd_per_mtok": "$/Mtok", "energy_j": "J/token", "s_mbu": "S-MBU", "s_mfu": "S-MFU",
             "accuracy": "accuracy"}


SERVER_COLUMNS: list[tuple[str, Callable[[RunResult], str]]] = [
    ("server TTFT mean ms", lambda r: _fmt(r.metrics.server_ttft_ms_mean, ".2f")),
    ("server TPOT mean ms", lambda r: _fmt(r.metrics.server_tpot_ms_mean, ".2f")),
]


def cap_table(results: Sequence[RunResult], title: str | None = None) -> Table:
    """The CAP table; when an engine reported its own latencies, they stand beside the client's."""
    columns = list(COLUMNS)
    if any(r.metrics.server_ttft_ms_mean is not None for r in results):
        columns[5:5] = SERVER_COLUMNS
    table = Table(title=Text(title) if title else None, title_justify="left")
    for header, _ in columns:
        table.add_column(header, justify="left" if header in ("backend", "status") else "right")
    for r in results:
        table.add_row(*(Text(cell(r)) for _, cell in columns))
    return table


def null_reasons(results: Sequence[RunResult]) -> list[str]:
    """One line per (column, reason) pair, and per failed run."""
    lines: list[str] = []
    for r in results:
        if r.status != "complete" and r.status_reason:
            lines.append(f"{r.backend} {load_label(r)}: {r.status} — {r.status_reason}")
        for key, label in NOTE_KEYS.items():
            reason = r.metrics.notes.get(key)
            line = f"{label}: {reason}"
            if reason and line not in lines:
                lines.append(line)
    return lines


def group_runs(results: Sequence[RunResult]) -> dict[tuple[str, str, str, str], list[RunResult]]:
    """Runs that may be compared side by side: same hardware fingerprint, model, task and workload."""
    groups: dict[tuple[str, str, str, str], list[RunResult]] = {}
    for r in results:
        key = (r.hardware.fingerprint, r.model.name, r.workload.task, r.workload.hash)
        groups.setdefault(key, []).append(r)
    return groups


def results_csv(results: Sequence[RunResult]) -> str:
    """`compare --csv`: the --json rows, nested fields as JSON text."""
    import csv
    import io
    import json

    rows = results_json(results)
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return out.getvalue()


def print_results(console: Console, results: Sequence[RunResult]) -> None:
    """The CAP table, grouped by (hardware, model, task), then the reasons for empty cells."""
    for (fp, model, task, workload), rows in group_runs(results).items():
        hw = rows[0].hardware
        title = (f"CAP — model {model}, task {task} (workload {workload}), hardware {hw.label()} [{fp}]  "
                 f"(peak {_fmt(hw.peak_mem_bw_gbps.value, '.1f')} GB/s, {hw.peak_mem_bw_gbps.source})")
        console.print(cap_table(rows, title=title))
        for line in null_reasons(rows):
            console.print(Text(f"  • {line}", style="dim"))


def results_json(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Rows for `compare --json`: identity plus every aggregate metric."""
    return [{"run_id": r.run_id, "started_at": r.started_at.isoformat(), "status": r.status,
             "backend": r.backend, "model": r.model.name, "task": r.workload.task,
             "workload_hash": r.workload.hash, "concurrency": r.workload.concurrency,
             "rate_rps": r.workload.rate_rps, "hardware_fingerprint": r.hardware.fingerprint,
             "engine_version": r.engine.version if r.engine else None,
             **r.metrics.model_dump(mode="json")} for r in results]


def _count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def model_table(spec: ModelSpec, context_len: int, dtype: str) -> Table:
    table = Table(title=f"{spec.name} ({spec.architecture})", title_justify="left")
    table.add_column("component")
    table.add_column("total params", justify="right")
    table.add_column("active params / token", justify="right")
    for name, comp in spec.components.items():
        table.add_row(name, _count(comp.total), _count(comp.active))
    table.add_row("[b]total[/b]", _count(spec.total_params), _count(spec.active_params))
    table.add_row("active without input embedding", "", _count(spec.active_params_no_embed))
    return table


def print_model(console: Console, spec: ModelSpec, context_len: int, dtype: str) -> None:
    console.print(model_table(spec, context_len, dtype))
    s = spec.summary(context_len, dtype)
    console.print(f"experts {spec.num_experts} (top-{spec.top_k}, {spec.shared_experts} shared), "
                  f"MoE layers {spec.moe_layers}/{spec.num_layers}, sparsity {spec.sparsity:.4f}")
    console.print(f"FLOPs/token at context {context_len}: {s['flops_per_token']:.4g}; "
                  f"KV bytes/token ({dtype}): {s['kv_bytes_per_token']:.4g}; "
                  f"weights ({dtype}): {s['weight_bytes'] / 1e9:.3f} GB; "
                  f"one expert of one layer: {s['expert_bytes_per_layer'] / 1e6:.3f} MB")


def print_convention(console: Console, results: Sequence[RunResult], convention: str, as_json: bool) -> None:
    """Latencies of stored runs recomputed under a peer tool's definitions."""
    import json

    from capbench_core.conventions import recompute

    stats = [recompute(r, convention) for r in results]
    if as_json:
        console.print_json(json.dumps([{"run_id": r.run_id, "backend": r.backend, "concurrency": r.workload.concurrency,
                                        "convention": convention, **s} for r, s in zip(results, stats)]))
        return
    table = Table(title=f"latencies under the {convention} convention (docs/metrics.md)", title_justify="left")
    for col in ("backend", "load", "TTFT p50 ms", "TPOT p50 ms", "TPOT p99 ms", "ITL p50 ms", "ITL p99 ms"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r, s in zip(results, stats):
        table.add_row(Text(r.backend), load_label(r),
                      *(_fmt(s[k], ".2f") for k in ("ttft_ms_p50", "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50",
                                                    "itl_ms_p99")))
    console.print(table)


def print_sparsity(console: Console, study: dict[str, Any]) -> None:
    """`capbench study sparsity`: one row per family member (roofline per batch), then measured points."""
    machine, members = study["machine"], study["members"]
    batches = list(members[0]["by_batch"]) if members else []
    title = (f"Sparsity ({study['description']}) on {machine['name']} "
             f"— roofline prediction ({study['dtype']}; {machine['mem_bw_gbps']:g} GB/s, {machine['tflops']:g} "
             f"TFLOP/s, {machine['memory_gb']:.3g} GB; peaks: {machine['peak_source']}; price: "
             f"{machine['price_source']})")
    table = Table(title=Text(title), title_justify="left")
    columns = ["member", "S", "total params", "active", "weights GB", "fits"]
    columns += ["pretrain loss"] if study["loss"]["source"] else []
    for col in columns:
        table.add_column(col, justify="left" if col == "member" else "right")
    for b in batches:
        for col in (f"B={b} A est", f"B={b} tok/s", f"B={b} $/Mtok"):
            table.add_column(col, justify="right")
    for m in members:
        cells = [m["name"], f"{m['sparsity']:.3f}", _count(m["total_params"]), _count(m["active_params"]),
                 f"{m['weight_gb']:.2f}", "yes" if m["fits"] else "does not fit"]
        cells += [_fmt(m["pretrain_loss"], ".4f")] if study["loss"]["source"] else []
        for b in batches:
            v = m["by_batch"][b]
            cells += [f"{v['experts_per_layer']:.1f}/{m['experts']}" if m["experts"] > 1 else "dense",
                      f"{v['tok_per_s']:.0f}{'' if v['bound'] == 'memory' else ' (compute)'}",
                      _fmt(v["usd_per_mtok"], ".3g")]
        table.add_row(*(Text(c) for c in cells))
    console.print(table)
    notes = ["A est: expected distinct experts per layer under uniform routing, E(1-(1-k/E)^B); tok/s = B / "
             "max(bytes / bandwidth, FLOPs / peak): a roofline, not a measurement"]
    notes.append(f"pretrain loss: Abnar et al. Eq. 6 with coefficients from {study['loss']['source']} at "
                 f"{study['loss']['compute_budget_flops']:.3g} training FLOPs" if study["loss"]["source"]
                 else study["loss"]["note"])
    for note in notes:
        console.print(Text(f"  • {note}", style="dim"))
    if study["measured"]:
        console.print(measured_table(study))


def measured_table(study: dict[str, Any]) -> Table:
    summary = study["error_summary"]
    span = (f"; error from {summary['min'] * 100:+.0f} % to {summary['max'] * 100:+.0f} % (median "
            f"{summary['median'] * 100:+.0f} %) over {summary['points']} points" if summary else "")
    table = Table(title=Text(f"Measured on this machine vs the roofline (uniform-routing A at the measured mean "
                             f"batch){span}"), title_justify="left")
    for col in ("member", "S", "backend", "B", "mean batch", "A measured", "A uniform", "predicted ms",
                "measured ms", "error", "tok/s", "status"):
        table.add_column(col, justify="left" if col in ("member", "backend", "status") else "right")
    for p in study["measured"]:
        a_meas = "—" if p["experts_measured"] is None else f"{p['experts_measured']:.2f} {p['experts_source'] or ''}"
        table.add_row(*(Text(c) for c in (
            p["member"], f"{p['sparsity']:.3f}", p["backend"], str(p["batch"]), _fmt(p["decode_batch_mean"], ".2f"),
            a_meas, _fmt(p["experts_uniform"], ".2f"), _fmt(p["predicted_ms"], ".2f"), _fmt(p["measured_ms"], ".2f"),
            "—" if p["error"] is None else f"{p['error'] * 100:+.0f} %", _fmt(p["tok_per_s"], ".0f"),
            p["status"] + (f": {p['note']}" if p["note"] else ""))))
    return table

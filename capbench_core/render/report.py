"""Terminal rendering of results (rich): the CAP table and model breakdowns.

Nulls print as '—' and their reasons are listed once under the table.
All values are rendered as plain text (no rich markup is interpreted).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from typing import Any, cast

from rich.console import Console
from rich.table import Table
from rich.text import Text

from capbench_core.analytics.grouping import group_runs, run_load
from capbench_core.analytics.model_spec import ModelSpec
from capbench_core.analytics.placement import combine_bytes_per_token, dispatch_bytes_per_token
from capbench_core.analytics.routing import EP_SIZES, EpRule, LinkBytes, hottest, link_bytes, summary
from capbench_core.contract.records import RunResult

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


def _accuracy_short(r: RunResult) -> str:
    return DASH if r.metrics.accuracy is None else f"{r.metrics.accuracy:.3f}"


def _experts_short(r: RunResult) -> str:
    m = r.metrics
    if m.experts_activated_per_layer_mean is None:
        return DASH
    return f"{m.experts_activated_per_layer_mean:.2f} {'meas' if m.expert_activation_source == 'measured' else 'est'}"


def _cost_short(r: RunResult) -> str:
    """$/Mtok, marked ``est`` when the price is an estimate nobody gave (docs/metrics.md, cost_basis)."""
    m = r.metrics
    if m.cost_usd_per_mtok is None:
        return DASH
    return f"{m.cost_usd_per_mtok:.3g}{' est' if m.cost_basis == 'estimate' else ''}"


def _variant(r: RunResult) -> str:
    return r.engine.variant if r.engine and r.engine.variant else ""


# (header, cell, in the terminal table) in priority order: the table keeps as many as the width allows.
COLUMNS: list[tuple[str, Callable[[RunResult], str]]] = [
    ("backend", lambda r: r.backend),
    ("load", run_load),
    ("dtype", lambda r: r.model.dtype),
    ("TTFT", lambda r: _fmt(r.metrics.ttft_ms_p50, ".2f")),
    ("TPOT", lambda r: _fmt(r.metrics.tpot_ms_p50, ".2f")),
    ("tok/s", lambda r: _fmt(r.metrics.output_tok_per_s, ".1f")),
    ("acc", _accuracy_short),
    ("$/Mtok", _cost_short),
    ("A", _experts_short),
    ("S-MBU", lambda r: _pct(r.metrics.s_mbu)),
    ("mem GB", lambda r: _fmt(r.metrics.mem_peak_gb, ".3g")),
    ("S-MFU", lambda r: _pct(r.metrics.s_mfu)),
    ("J/token", lambda r: _fmt(r.metrics.energy_j_per_output_token, ".4g")),
    ("status", lambda r: row_status(r)),
    ("server TTFT ms", lambda r: _fmt(r.metrics.server_ttft_ms_mean, ".2f")),
    ("server TPOT ms", lambda r: _fmt(r.metrics.server_tpot_ms_mean, ".2f")),
]
ESSENTIAL = 6  # backend .. tok/s: below this, one block per row reads better than a table
LEGEND = ("TTFT/TPOT: client p50, ms; tok/s: output tokens/s; acc: accuracy; A: distinct experts per MoE layer "
          "per decode step (meas = measured, est = uniform-routing estimate); $/Mtok: per million output tokens "
          "(est = an estimated price, see cost_model); mem GB: measured peak memory of the engine's processes; "
          "server TTFT/TPOT: the engine's own means, ms")

NOTE_KEYS = {"cost_usd_per_mtok": "$/Mtok", "energy_j": "J/token", "s_mbu": "S-MBU", "s_mfu": "S-MFU",
             "accuracy": "accuracy", "mem_peak_gb": "mem GB"}


def _shown(results: Sequence[RunResult]) -> list[tuple[str, Callable[[RunResult], str]]]:
    """The columns that say something for these rows: status only when a row is not complete,
    server latencies only when an engine reported them."""
    drop = set()
    if all(row_status(r) == "complete" for r in results):
        drop.add("status")
    if all(r.metrics.server_ttft_ms_mean is None for r in results):
        drop.add("server TTFT ms")
    if all(r.metrics.server_tpot_ms_mean is None for r in results):
        drop.add("server TPOT ms")
    return [c for c in COLUMNS if c[0] not in drop]


def _table(results: Sequence[RunResult], columns: list[tuple[str, Callable[[RunResult], str]]]) -> Table:
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False)
    for header, _ in columns:
        table.add_column(header, justify="left" if header in ("backend", "load", "dtype", "status") else "right",
                         no_wrap=True)
    for r in results:
        table.add_row(*(Text(cell(r)) for _, cell in columns))
    return table


def cap_table(results: Sequence[RunResult], width: int | None = None) -> tuple[Table | None, list[str]]:
    """The widest CAP table that fits ``width`` with every cell whole, and the columns left out.
    (None, all) when even the essential columns do not fit: print rows instead."""
    from rich.console import Console
    from rich.measure import Measurement

    columns = _shown(results)
    if width is None:
        return _table(results, columns), []
    probe = Console(width=10_000)
    for keep in range(len(columns), ESSENTIAL - 1, -1):
        table = _table(results, columns[:keep])
        if Measurement.get(probe, probe.options, table).maximum <= width:
            return table, [h for h, _ in columns[keep:]]
    return None, [h for h, _ in columns]


def _renderable(cell: Any) -> Any:
    return Text(cell) if isinstance(cell, str) else cell


def print_fit(console: Console, table: Table, wrap: Sequence[str] = ()) -> None:
    """Print ``table`` whole at the console's width (80 columns in a pipe): compact, every cell on one
    line (only the columns named in ``wrap`` may fold); when even that is too wide, one block of
    ``header value`` lines per row, headed by its first cell, so nothing is ever cut."""
    from rich import box
    from rich.measure import Measurement

    table.box, table.show_edge, table.pad_edge, table.collapse_padding = box.SIMPLE_HEAD, False, False, True
    probe = Console(width=10_000)
    for column in table.columns:
        column.no_wrap = str(column.header) not in wrap
        column.overflow = "fold"
        if not column.no_wrap:  # measured at its narrowest: the longest word of any of its cells
            column.max_width = max(Measurement.get(probe, probe.options, _renderable(c)).minimum
                                   for c in (column.header, *column.cells))
    fits = Measurement.get(probe, probe.options, table).maximum <= console.width
    for column in table.columns:
        column.max_width = None
    if fits:
        console.print(table)
        return
    if table.title:
        console.print(Text(str(table.title)), overflow="fold")
    headers = [str(c.header) for c in table.columns]
    cells = [[str(cell) for cell in column.cells] for column in table.columns]
    pad = max(len(h) for h in headers[1:]) if len(headers) > 1 else 0
    width = max(console.width - pad - 3, 20)
    for i in range(table.row_count):
        console.print(Text(cells[0][i] or "—"), overflow="fold")
        for header, values in zip(headers[1:], cells[1:]):
            if values[i]:  # a long value wraps under itself, not under the header
                lines = textwrap.wrap(values[i], width, break_on_hyphens=False) or [values[i]]
                console.print(Text(f"  {header:<{pad}} " + f"\n{'':<{pad + 3}}".join(lines)), overflow="fold")


def print_note(console: Console, note: str) -> None:
    """One note under a table, a `  • ` bullet whose continuation lines hang under its first word."""
    lines = textwrap.wrap(note, max(console.width - 4, 20), break_on_hyphens=False) or [""]
    console.print(Text("  • " + "\n    ".join(lines), style="dim"), overflow="fold")


def row_status(r: RunResult) -> str:
    """The row's status, and `client-limited` when its client could not keep up (its timings include the
    client's own delay)."""
    return f"{r.status}, client-limited" if r.metrics.client_limited else r.status


def row_block(r: RunResult) -> list[str]:
    """One row as `key value` lines (like vLLM's benchmark summary): every field, nothing cut."""
    m = r.metrics
    pairs = [(h, cell(r)) for h, cell in COLUMNS if h not in ("backend", "load")]
    pairs += [("accuracy 95% CI", _accuracy(r)), ("engine", r.engine.version if r.engine else DASH)]
    if _variant(r):
        pairs.append(("variant", _variant(r)))
    if m.notes.get("engine.experts") or m.expert_activation_method:
        pairs.append(("A method", m.expert_activation_method or DASH))
    head = f"{r.backend} {run_load(r)}"
    return [head] + [f"  {key:<18} {value}" for key, value in pairs]


def null_reasons(results: Sequence[RunResult]) -> list[str]:
    """One line per (column, reason) pair, and per failed run."""
    lines: list[str] = []
    for r in results:
        if r.status != "complete" and r.status_reason:
            lines.append(f"{r.backend} {run_load(r)}: {r.status} — {r.status_reason}")
        if r.metrics.client_limited:
            lines.append(f"{r.backend} {run_load(r)}: client-limited — {r.metrics.notes.get('client_limited', '')}")
        for key, label in NOTE_KEYS.items():
            reason = r.metrics.notes.get(key)
            line = f"{label}: {reason}"
            if reason and line not in lines:
                lines.append(line)
    return lines


def under_table(results: Sequence[RunResult], hidden: list[str]) -> list[str]:
    """What the table leaves out: confidence intervals, engine variants, columns cut for width, null reasons."""
    lines = []
    scored = [r for r in results if r.metrics.accuracy is not None]
    if scored:
        lines.append("accuracy 95% CI: " + "; ".join(f"{r.backend} {run_load(r)} {_accuracy(r)}" for r in scored))
    variants = {f"{r.backend}: {_variant(r)}" for r in results if _variant(r) not in ("", "cpu", "cuda")}
    lines += [f"engine variant — {v}" for v in sorted(variants)]
    if hidden:
        lines.append(f"not shown at this width: {', '.join(hidden)} (--format rows shows every field)")
    lines.append(LEGEND)
    return lines + null_reasons(results)


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


def print_results(console: Console, results: Sequence[RunResult], fmt: str = "table") -> None:
    """The CAP table per (hardware, model, task, workload) group, sized to the console: every cell whole,
    intervals and reasons under it; ``fmt='rows'`` (or a width too narrow for a table) prints blocks."""
    for (fp, model, task, workload), rows in group_runs(results).items():
        hw = rows[0].hardware
        console.print(Text(f"CAP — model {model}, task {task} (workload {workload}), hardware {hw.label()} [{fp}], "
                           f"peak {_fmt(hw.peak_mem_bw_gbps.value, '.1f')} GB/s ({hw.peak_mem_bw_gbps.source})",
                           style="bold"))
        table, hidden = cap_table(rows, console.width) if fmt == "table" else (None, [])
        if table is None:
            for r in rows:
                for line in row_block(r):
                    console.print(Text(line), overflow="fold")
            hidden = []
        else:
            console.print(table)
        for line in under_table(rows, hidden):
            print_note(console, line)


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
    table = Table(title=Text(f"{spec.name} ({spec.architecture})"), title_justify="left")
    table.add_column("component")
    table.add_column("total params", justify="right")
    table.add_column("active params / token", justify="right")
    for name, comp in spec.components.items():
        table.add_row(name, _count(comp.total), _count(comp.active))
    table.add_row(Text("total", style="bold"), _count(spec.total_params), _count(spec.active_params))
    table.add_row("active without input embedding", "", _count(spec.active_params_no_embed))
    return table


def print_model(console: Console, spec: ModelSpec, s: dict[str, Any]) -> None:
    """`model inspect`: the component table, then the figures of ``s`` (``spec.summary(context, dtype)``)."""
    context_len, dtype = s["flops_context_len"], s["kv_dtype"]
    print_fit(console, model_table(spec, context_len, dtype))
    window = (f"; sliding window {spec.sliding_window} tokens on {spec.sliding_layers} of {spec.num_layers} layers"
              if spec.sliding_window else "")
    console.print(Text(f"experts {spec.num_experts} (top-{spec.top_k}, {spec.shared_experts} shared), "
                       f"MoE layers {spec.moe_layers}/{spec.num_layers}, sparsity {spec.sparsity:.4f}{window}"))
    console.print(Text(f"FLOPs/token at context {context_len}: {s['flops_per_token']:.4g}; "
                       f"KV bytes/token ({dtype}): {s['kv_bytes_per_token']:.4g}; "
                       f"KV bytes of one sequence at context {context_len}: {s['kv_bytes_at_context']:.4g}; "
                       f"weights ({dtype}): {s['weight_bytes'] / 1e9:.3f} GB; "
                       f"one expert of one layer: {s['expert_bytes_per_layer'] / 1e6:.3f} MB"))


def print_convention(console: Console, results: Sequence[RunResult], stats: Sequence[dict[str, Any]],
                     convention: str, as_json: bool) -> None:
    """Latencies of stored runs recomputed under a peer tool's definitions (``stats``, one per run)."""
    import json

    if as_json:
        console.print_json(json.dumps([{"run_id": r.run_id, "backend": r.backend, "concurrency": r.workload.concurrency,
                                        "convention": convention, **s} for r, s in zip(results, stats)]))
        return
    table = Table(title=Text(f"latencies under the {convention} convention (docs/metrics.md)"), title_justify="left")
    for col in ("backend", "load", "TTFT p50 ms", "TPOT p50 ms", "TPOT p99 ms", "ITL p50 ms", "ITL p99 ms"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r, s in zip(results, stats):
        table.add_row(Text(r.backend), run_load(r),
                      *(_fmt(s[k], ".2f") for k in ("ttft_ms_p50", "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50",
                                                    "itl_ms_p99")))
    print_fit(console, table)


def print_moe_cap(console: Console, rows: Sequence[dict[str, Any]], as_json: bool) -> None:
    """capbench's S-MBU/S-MFU beside MoE-CAP's (rows from ``analytics.moecap.compare_row``)."""
    import json

    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=Text("S-MBU and S-MFU: capbench's definitions beside MoE-CAP's (docs/metrics.md lists every "
                             "difference)"), title_justify="left")
    notes = list(dict.fromkeys(row["note"] for row in rows))  # said once under the table, numbered when several
    tiered = any(row.get("s_mbu_single") is not None for row in rows)
    columns = ["backend", "load", "S-MBU", *(["S-MBU single"] if tiered else []), "S-MBU MoE-CAP", "S-MFU",
               "S-MFU MoE-CAP"]
    columns += ["how"] if len(notes) > 1 else []
    for col in columns:
        table.add_column(col, justify="left" if col in ("backend", "load", "how") else "right")
    for row in rows:
        how = [f"[{notes.index(row['note']) + 1}]"] if len(notes) > 1 else []
        single = [_pct(row.get("s_mbu_single"))] if tiered else []
        table.add_row(Text(row["backend"]), row["load"], _pct(row["s_mbu"]), *single, _pct(row["moe_cap_s_mbu"]),
                      _pct(row["s_mfu"]), _pct(row["moe_cap_s_mfu"]), *how)
    print_fit(console, table)
    if tiered:
        print_note(console, "S-MBU of rows whose experts sit off the accelerator is tiered (each memory and link "
                            "over its own bandwidth); S-MBU single: every byte over the device's bandwidth")
    for i, note in enumerate(notes, 1):
        print_note(console, f"{f'[{i}] ' if len(notes) > 1 else ''}how: {note}")


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
    print_fit(console, table)
    notes = ["A est: expected distinct experts per layer under uniform routing, E(1-(1-k/E)^B); tok/s = B / "
             "max(bytes / bandwidth, FLOPs / peak): a roofline, not a measurement"]
    loss = study["loss"]
    notes.append(f"pretrain loss: Abnar et al. Eq. 6 ({loss.get('label') or 'user fit'}) at "
                 f"{loss['compute_budget_flops']:.3g} training FLOPs for the member's own N and N_a; coefficients "
                 f"from {loss['source']}" if loss["source"] else loss["note"])
    for note in notes:
        print_note(console, note)
    if study.get("joint"):
        print_joint(console, study["joint"], machine)
    if study["measured"]:
        print_fit(console, measured_table(study))


def print_joint(console: Console, joint: dict[str, Any], machine: dict[str, Any]) -> None:
    """The two halves side by side: per sparsity, the compute-optimal model and what serving it costs."""
    b = joint["batch"]
    table = Table(title=Text(f"Compute-optimal model per sparsity at {joint['compute_budget_flops']:.3g} training "
                             f"FLOPs, served on {machine['name']} at B={b} (* = Pareto: lower loss vs cheaper "
                             f"serving)"), title_justify="left")
    for col in ("member", "S", "pred. loss", "total", "active", "train tokens", "weights GB", "fits",
                f"B={b} tok/s", "$/Mtok", ""):
        table.add_column(col, justify="left" if col in ("member", "") else "right", overflow="fold")
    for m in joint["members"]:
        table.add_row(*(Text(c) for c in (
            m["name"], f"{m['sparsity']:.3f}", f"{m['predicted_loss']:.4f}", _count(m["total_params"]),
            _count(m["active_params"]), f"{m['training_tokens']:.3g}", f"{m['weight_bytes'] / 1e9:.2f}",
            "yes" if m["fits_memory"] else "no", _fmt(m["tok_per_s"], ".0f"), _fmt(m["cost_usd_per_mtok"], ".3g"),
            ("* " if m["pareto"] else "") + ("extrapolated" if m["extrapolated"] else ""))))
    print_fit(console, table)
    sizes = "; ".join(f"N={f['total_params']:.0e}: S*={f['best_sparsity']:.3f}" for f in joint["fixed_size"])
    below = joint["dense_best_below_params"]
    unserved = [f"{m['name']} {m['serving_note']}" for m in joint["members"] if m.get("serving_note")]
    for note in (*unserved, f"{joint['label'] or 'user fit'} — {joint['source']}",
                 f"fixed N at this budget, the loss-minimising sparsity: {sizes}; dense is best below "
                 f"{'no size on the grid' if below is None else f'{below:.3g} parameters'}",
                 f"N and N_a related by capbench's analytics on one layout ({joint['layout']}); another layout "
                 f"moves the optima"):
        print_note(console, note)


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


PLACEMENT_RESOURCES = {"device_mem": "HBM", "device_compute": "GPU FLOPs", "host_dram": "DRAM",
                       "host_compute": "CPU FLOPs", "pcie": "PCIe", "nvlink": "NVLink", "infiniband": "IB"}


def print_placement(console: Console, study: dict[str, Any]) -> None:
    """`capbench study placement`: one row per (placement, batch): bytes and bound time per resource, the
    bottleneck, tokens/s, memory per device, $/Mtok."""
    system = study["system"]
    title = (f"Placement of {study['model']} ({study['dtype']}, {study['weights_gb']:.1f} GB of weights, context "
             f"{study['context']}) on {system['name']} — a bytes-over-bandwidth bound, not a measurement")
    table = Table(title=Text(title), title_justify="left")
    for col in ("placement", "B", "bytes/step (GB) by resource", "bottleneck", "step ms", "tok/s", "GB/device",
                "host GB", "fits", "$/Mtok"):
        table.add_column(col, justify="left" if col in ("placement", "bytes/step (GB) by resource", "bottleneck")
                         else "right")
    for r in study["rows"]:
        moved = ", ".join(f"{PLACEMENT_RESOURCES[k]} {v / 1e9:.3g}" for k, v in r["bytes"].items())
        table.add_row(Text(r["placement"]), str(r["batch"]), Text(moved),
                      Text(f"{PLACEMENT_RESOURCES.get(r['bottleneck'], r['bottleneck'])} ({r['composition']})"),
                      f"{r['step_ms']:.3g}", f"{r['tok_per_s']:.4g}", _fmt(r["memory_per_device_gb"], ".3g"),
                      f"{r['host_memory_gb']:.3g}", "yes" if r["fits"] else "no", _fmt(r["usd_per_mtok"], ".3g"))
    print_fit(console, table, wrap=("bytes/step (GB) by resource",))
    bw = ", ".join(f"{label} {system[key]:g} GB/s" for key, label in (
        ("device_mem_gbps", "HBM"), ("host_dram_gbps", "DRAM"), ("pcie_gbps", "PCIe"), ("nvlink_gbps", "NVLink"),
        ("infiniband_gbps", "IB")) if system.get(key))
    print_note(console, f"bandwidths per device and direction: {bw}; price: {system['price_source']}")
    print_note(console, study["method"])
    for note in dict.fromkeys(n for r in study["rows"] for n in r["notes"]):
        print_note(console, note)
    estimated = {r["experts_source"] for r in study["rows"]}
    print_note(console, f"experts touched per layer: {', '.join(sorted(estimated))}")


RANDOM_PROMPT_NOTE = ("random-token prompts do not route like real text: compare routing on content tasks (arith, "
                      "gsm8k/mmlu files, a trace)")


def print_routing_compare(console: Console, results: Sequence[RunResult], rule: str, as_json: bool) -> None:
    """`capbench compare --routing`: the rows that measured routing, grouped by model, task beside task."""
    import json


    rows: list[dict[str, Any]] = []
    for r in results:
        if r.routing is None:
            continue
        s = summary(r.routing.tokens, cast(EpRule, rule))
        rows.append({"run_id": r.run_id, "model": r.model.name, "task": r.workload.task, "backend": r.backend,
                     "load": run_load(r), "imbalance_mean": s.imbalance_mean, "imbalance_max": s.imbalance_max,
                     "hot_share": s.hot_share, "ep_tax": s.ep_tax, "ep_rule": rule, "forced": r.routing.forced,
                     "experts_per_layer": r.metrics.experts_activated_per_layer_mean,
                     "ep_link_bytes_per_token": {str(b.ranks): {"total": b.total_per_token,
                                                                "busiest_rank": b.busiest_rank_per_token}
                                                 for b in _link_bytes(r, cast(EpRule, rule))}})
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print(Text("no stored run measured its routing (torch_moe and SGLang rows do)"))
        return
    table = Table(title=Text(f"Routing over the measured decode window (EP tax: {rule} placement)"),
                  title_justify="left")
    for col in ("model", "task", "backend", "load", "A", "imbalance mean", "worst layer", "top 10 % share",
                "EP2 tax", "EP4 tax", "EP8 tax"):
        table.add_column(col, justify="left" if col in ("model", "task", "backend", "load") else "right")
    for row in sorted(rows, key=lambda x: (x["model"], x["task"], x["backend"])):
        tax = row["ep_tax"]
        table.add_row(Text(row["model"]), Text(row["task"] + (" (forced)" if row["forced"] else "")),
                      Text(row["backend"]), row["load"], _fmt(row["experts_per_layer"], ".2f"),
                      _fmt(row["imbalance_mean"], ".2f"), _fmt(row["imbalance_max"], ".2f"),
                      _fmt(row["hot_share"], ".2f"), *(_fmt(tax.get(n), ".2f") for n in ("2", "4", "8")))
    print_fit(console, table)
    print_note(console, "imbalance: max / mean expert load per layer (1 = even); top 10 % share: tokens taken by a "
                        "layer's hottest tenth of experts; EP tax: slowest rank's load over the mean (docs/metrics.md)")
    if any(row["task"] == "random" for row in rows):
        print_note(console, RANDOM_PROMPT_NOTE)


def _link_bytes(r: RunResult, rule: EpRule) -> list[LinkBytes]:
    """EP all-to-all bytes per decoded token for N = 2, 4, 8 (empty without the model's top-k and width)."""
    hidden = (r.model.config or {}).get("hidden_size")
    if r.routing is None or not r.model.top_k or not isinstance(hidden, int):
        return []
    experts = len(r.routing.tokens[0]) if r.routing.tokens else 0
    per_layer = dispatch_bytes_per_token(r.model.top_k, hidden) + combine_bytes_per_token(r.model.top_k, hidden)
    return [link_bytes(r.routing.tokens, per_layer, n, rule) for n in EP_SIZES if n <= experts]


def print_routing_run(console: Console, r: RunResult) -> None:
    """`capbench show RUN --routing`: the worst layers and the hottest experts of one run."""
    if r.routing is None:
        console.print(Text(f"run {r.run_id} ({r.backend}) did not measure its routing "
                           f"({r.metrics.expert_activation_method or 'no expert counts'})"))
        return
    s = summary(r.routing.tokens)
    console.print(Text(f"{r.backend} {run_load(r)} · {r.model.name} · task {r.workload.task}: imbalance mean "
                       f"{_fmt(s.imbalance_mean, '.2f')}, worst {_fmt(s.imbalance_max, '.2f')}; top 10 % of experts "
                       f"take {_fmt(s.hot_share, '.2f')} of the tokens; EP tax "
                       f"{', '.join(f'EP{k} {v:.2f}' for k, v in s.ep_tax.items())} ({r.routing.method})"))
    worst = sorted(((v, i) for i, v in enumerate(s.imbalance_per_layer) if v is not None), reverse=True)[:3]
    table = Table(title=Text("worst layers"), title_justify="left")
    for col in ("layer", "imbalance", "tokens", "busiest expert"):
        table.add_column(col, justify="right")
    for value, layer in worst:
        loads = r.routing.tokens[layer]
        table.add_row(str(layer), f"{value:.2f}", str(sum(loads)), str(max(range(len(loads)), key=loads.__getitem__)))
    print_fit(console, table)
    hot = Table(title=Text("hottest experts"), title_justify="left")
    for col in ("layer", "expert", "share of layer"):
        hot.add_column(col, justify="right")
    for layer, expert, share in hottest(r.routing.tokens):
        hot.add_row(str(layer), str(expert), f"{share:.3f}")
    print_fit(console, hot)
    link = _link_bytes(r, "contiguous")
    if link:
        console.print(Text("EP all-to-all per decoded token (dispatch + combine, DeepEP sizes, contiguous "
                           "placement): " + ", ".join(f"EP{b.ranks} {b.total_per_token / 1e3:.1f} KB, busiest rank "
                                                      f"{b.busiest_rank_per_token / 1e3:.1f} KB" for b in link)))
    if r.routing.forced:
        print_note(console, f"routing forced by the engine ({r.routing.forced}): these loads are the simulation's")
    if r.workload.task == "random":
        print_note(console, RANDOM_PROMPT_NOTE)


def print_pareto(console: Console, results: Sequence[RunResult], as_json: bool) -> None:
    """`capbench compare --pareto`: per comparison group, each backend's frontier of output tokens/s per device
    against tokens/s per user, with cost and accuracy beside."""
    import json

    from capbench_core.analytics.pareto import points

    groups = group_runs(results)
    rows: list[dict[str, Any]] = []
    for (fingerprint, model, task, workload), runs in groups.items():
        for p in points(runs):
            if p.frontier:
                rows.append({"hardware": fingerprint, "model": model, "task": task, "workload": workload,
                             "backend": p.run.backend, "load": p.load, "run_id": p.run.run_id,
                             "tok_per_s_per_user": p.per_user, "tok_per_s_per_device": p.per_device,
                             "tpot_ms": p.tpot_ms, "tpot_source": p.tpot_source,
                             "cost_usd_per_mtok": p.run.metrics.cost_usd_per_mtok, "accuracy": p.run.metrics.accuracy,
                             "slo_search_winner": bool(p.run.search and p.run.search.winner)})
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print(Text("no complete run with a TPOT and a throughput stored"))
        return
    for key in dict.fromkeys((r["hardware"], r["model"], r["task"], r["workload"]) for r in rows):
        table = Table(title=Text(f"Pareto frontier — model {key[1]}, task {key[2]} (workload {key[3]}), "
                                 f"hardware [{key[0]}]"), title_justify="left")
        for col in ("backend", "load", "tok/s/user", "tok/s/device", "TPOT ms", "$/Mtok", "acc"):
            table.add_column(col, justify="left" if col in ("backend", "load") else "right")
        for r in sorted((r for r in rows if (r["hardware"], r["model"], r["task"], r["workload"]) == key),
                        key=lambda r: (r["backend"], -r["tok_per_s_per_user"])):
            bursty = " eng" if r["tpot_source"].startswith("engine") else ""
            table.add_row(Text(r["backend"]), Text(r["load"] + (" ★" if r["slo_search_winner"] else "")),
                          _fmt(r["tok_per_s_per_user"], ".1f"), _fmt(r["tok_per_s_per_device"], ".1f"),
                          Text(_fmt(r["tpot_ms"], ".2f") + bursty), _fmt(r["cost_usd_per_mtok"], ".4g"),
                          _fmt(r["accuracy"], ".3f"))
        print_fit(console, table)
    print_note(console, "frontier points only: no other load of the same backend is faster per user and more "
                        "productive per device; tok/s/user = 1000 / TPOT; TPOT \"eng\": the engine's own mean, where "
                        "its stream reached the client in bursts; ★ = an SLO search's winner")

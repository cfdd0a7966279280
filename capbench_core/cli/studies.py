"""Studies and matrices: `capbench sweep` (plan, run), `capbench study sparsity` and `capbench study placement`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from capbench_core.cli.root import (
    DB_OPTION,
    cli,
    csv_list,
    int_list,
    make_console,
    plain,
    plugin_manager,
    print_fit,
    progress_reporter,
    sigterm_as_interrupt,
)
from capbench_core.errors import CapbenchError


@cli.group()
def sweep() -> None:
    """Declarative benchmark matrices: plan them, run them here or on a Ray cluster, resume them."""


def _matrix(path: Path) -> Any:
    from capbench_core.studies import sweep as sweeps

    pm = plugin_manager()
    known = {"backend": pm.backends.names(), "model": pm.models.names(), "task": pm.tasks.names()}
    return sweeps.load(path, known)


@sweep.command("plan")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the cells as JSON.")
def sweep_plan(path: Path, as_json: bool) -> None:
    """Expand a matrix file into its cells and show what each needs (GPUs, weight memory, runnable here)."""
    from capbench_core.analytics.checkpoint import model_ref
    from capbench_core.analytics.model_spec import spec_from_path

    matrix = _matrix(path)
    pm = plugin_manager()
    rows = []
    for cell in matrix.cells:
        ref = model_ref(pm, cell.config.model)
        try:
            weight_gb: float | None = spec_from_path(ref.path, ref.name).weight_bytes("bfloat16") / 1e9
        except CapbenchError:
            weight_gb = None
        availability = pm.backends.get(cell.backend).available()
        rows.append({"cell": cell.hash, "label": cell.label(), "settings": cell.settings, "load": cell.level.label,
                     "num_gpus": cell.resources.num_gpus,
                     "accelerator": cell.resources.accelerator, "weights_gb_bf16": weight_gb,
                     "runs_here": availability.ok, "why_not": availability.reason})
    if as_json:
        click.echo(json.dumps({"sweep": matrix.spec.name, "cells": rows}, indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"sweep {matrix.spec.name}: {len(rows)} cells ({path})"), title_justify="left")
    for col in ("cell", "backend", "model", "task", "load", "GPUs", "accelerator", "weights GB (bf16)", "here"):
        table.add_column(col)
    for r in rows:
        s = r["settings"]
        table.add_row(*(Text(str(c)) for c in (
            r["cell"], s["backend"], s["model"], s.get("task") or "—", r["load"], f"{r['num_gpus']:g}",
            r["accelerator"] or "—",
            "—" if r["weights_gb_bf16"] is None else f"{r['weights_gb_bf16']:.3g}",
            "yes" if r["runs_here"] else f"no: {r['why_not']}")))
    print_fit(make_console(), table)


@sweep.command("run")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: cells one after another here; ray: each cell a Ray task on a cluster.")
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray instance).")
@click.option("--resume", is_flag=True, help="Skip cells already stored as complete for this sweep.")
@click.option("--max-retries", type=click.IntRange(min=0), default=1, show_default=True,
              help="Ray: times a cell is retried when its worker dies.")
@DB_OPTION
def sweep_run(path: Path, executor: str, address: str | None, resume: bool, max_retries: int,
              db_url: str | None) -> None:
    """Run every cell (or, with --resume, the missing ones) into one database; exits 3 if a cell failed."""
    from capbench_core.store import Store
    from capbench_core.studies import sweep as sweeps

    matrix = _matrix(path)
    store = Store(db_url)
    cells = sweeps.pending(matrix, store, resume)
    console = make_console()
    skipped = len(matrix.cells) - len(cells)
    console.print(plain(f"sweep {matrix.spec.name}: {len(cells)} cell(s) to run"
                       + (f", {skipped} already complete" if skipped else "") + f" ({executor})"))
    failed: list[str] = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("cells", total=len(cells))

        def progress(cell: Any, outcome: Any) -> None:
            mark = "ok" if outcome.status == "complete" else f"FAILED: {outcome.reason}"
            bar.console.print(plain(f"{cell.hash} {cell.label()}: {mark}"))
            if outcome.status != "complete":
                failed.append(cell.hash)
            bar.advance(task)

        sigterm_as_interrupt()
        if executor == "local":
            from capbench_core.measure.hardware import detect_hardware
            from capbench_core.measure.progress import Reporter

            pm = plugin_manager()
            sweeps.run_local(matrix, cells, store, detect_hardware(pm), Reporter(), progress, pm)
        else:
            sweeps.run_ray(matrix, cells, store, address, progress, max_retries)
    console.print(plain(f"{len(cells) - len(failed)} cell(s) complete, {len(failed)} failed; results in {store.url}"))
    if failed:
        sys.exit(3)


@cli.group()
def study() -> None:
    """Studies built on capbench's model analytics and hardware tables."""


@study.command("sparsity")
@click.option("--hardware", default=None,
              help="A datasheet accelerator (e.g. 'H100 SXM'; default) or 'here' (this machine, measured peaks). "
                   "--measure always uses this machine.")
@click.option("--active-params", type=click.FloatRange(min=1), default=None,
              help="Active parameters per token, held fixed across the family (default 1e9; 5e7 with --measure).")
@click.option("--experts", default=None, metavar="E,...",
              help="Experts per MoE layer of each member (1: the dense model); default 1,4,8,16,32,64. "
                   "With --fixed total: one E (default 32).")
@click.option("--top-k", default=None, metavar="K[,...]",
              help="Experts per token (default 2). With --fixed total: the values to vary (default 1,2,4,8).")
@click.option("--fixed", type=click.Choice(["active", "total"]), default="active", show_default=True,
              help="active: same FLOPs per token, E varies; total: the mirror family, same weights, top-k varies.")
@click.option("--total-params", type=click.FloatRange(min=1), default=None,
              help="--fixed total: parameters of every member (default 4e9; 2e8 with --measure).")
@click.option("--batch", default="1,8,64", show_default=True, metavar="B,...",
              help="Decode batch sizes (concurrent requests in measured mode).")
@click.option("--context", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Analytic mode: context tokens per sequence (KV cache read per step).")
@click.option("--measure", is_flag=True,
              help="Also run the family here (random weights, a small layout) and compare with the roofline.")
@click.option("--measure-backends", default="torch_moe,llamacpp", show_default=True, metavar="A,B",
              help="Backends for --measure (llamacpp decodes one request at a time: batch 1 only).")
@click.option("--max-weight-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--measure: skip members with more float32 weights (default: a quarter of host memory).")
@click.option("--loss-fit", default=None, metavar="abnar2025|FILE",
              help="Abnar et al. Eq. 6 coefficients: 'abnar2025' (shipped, transcribed by third parties) or a JSON "
                   "file of your own with its source. Adds the predicted pre-training loss and the joint view: "
                   "the compute-optimal model per sparsity and what serving it costs.")
@click.option("--compute-budget", type=click.FloatRange(min=0, min_open=True), default=1e21, show_default=True,
              help="Training FLOPs for the predicted pre-training loss (with --loss-fit).")
@click.option("--plot-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write PNG and SVG plots here (needs matplotlib: capbench[plots]).")
@click.option("--db", "db_url", default=None, envvar="CAPBENCH_DB", help="Results database (the study is stored).")
@click.option("--json", "as_json", is_flag=True, help="Print the study as JSON.")
def sparsity_study(**flags: Any) -> None:
    """What sparsity costs at serving time: analytic roofline, and (--measure) measured runs beside it."""
    from capbench_core.store import Store
    from capbench_core.studies.sparsity import StudyConfig, run_study

    as_json, plot_dir = flags.pop("as_json"), flags.pop("plot_dir")
    console = make_console(stderr=as_json)  # with --json, stdout holds the JSON only
    store = Store(flags.pop("db_url"))
    for key, flag in (("experts", "--experts"), ("top_k", "--top-k"), ("batch", "--batch")):
        flags[key] = int_list(flags[key], flag) if flags[key] else None
    flags["measure_backends"] = csv_list(flags["measure_backends"])
    config = StudyConfig.build(flags)
    hw = None
    if config.measure or config.hardware == "here":
        from capbench_core.measure.hardware import detect_hardware

        with console.status("probing hardware (peaks are measured once per machine)…"):
            hw = detect_hardware(plugin_manager())
    study = run_study(config, plugin_manager(), store, hw, progress_reporter(console))
    if plot_dir:
        from capbench_core.render.plots import write_plots

        written = write_plots(study, plot_dir)
        console.print(plain(f"wrote {', '.join(str(p) for p in written)}"), style="dim")
    if as_json:
        click.echo(json.dumps(study, indent=2))
        return
    from capbench_core.render.report import print_sparsity

    print_sparsity(console, study)
    console.print(plain(f"stored study {study['study_id']} in {store.url}"), style="dim")


@study.command("placement")
@click.option("--model", required=True, help="Registered model (e.g. Qwen3-30B-A3B-config), checkpoint directory, "
                                             "config.json or GGUF.")
@click.option("--hardware", default="here", show_default=True,
              help="Accelerator datasheet name (e.g. 'H100 SXM'; `capbench hardware datasheet`), or 'here'.")
@click.option("--devices", type=click.IntRange(min=1), default=None, help="Accelerators (default 1).")
@click.option("--host", default=None, help="Host CPU (data/hosts.json; default: Xeon Platinum 8480+).")
@click.option("--sockets", type=click.IntRange(min=1), default=None, help="Host CPU sockets (default 2).")
@click.option("--batch", default="1,16,64", show_default=True, metavar="B,...", help="Decode batch per device.")
@click.option("--context", type=click.IntRange(min=0), default=4096, show_default=True,
              help="Tokens each sequence attends to.")
@click.option("--dtype", default="bfloat16", show_default=True,
              help="Bytes per weight: bfloat16, fp8, q4_k, mxfp4, ... (KV in bfloat16 for quantized weights).")
@click.option("--ep-link", default=None, help="InfiniBand link for EP across nodes (data/links.json; default "
                                              "ib-ndr).")
@click.option("--experts-per-layer", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Distinct experts per layer per step, when measured (default: the uniform-routing estimate).")
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the study as JSON.")
def placement_study(**flags: Any) -> None:
    """Where the experts live: bytes per resource (HBM, DRAM, PCIe, NVLink, InfiniBand), the bound, the
    bottleneck, tok/s, memory per device and $/Mtok for each placement of one model on one machine."""
    from capbench_core.analytics.checkpoint import model_ref
    from capbench_core.analytics.model_spec import spec_from_path
    from capbench_core.store import Store
    from capbench_core.studies.placement import PlacementConfig, run_placement_study

    as_json, db_url = flags.pop("as_json"), flags.pop("db_url")
    console = make_console(stderr=as_json)
    flags["batch"] = int_list(flags["batch"], "--batch")
    config = PlacementConfig.build(flags)
    pm = plugin_manager()
    ref = model_ref(pm, config.model)
    spec = spec_from_path(ref.path, ref.name)
    hw = None
    if config.hardware == "here":
        from capbench_core.measure.hardware import detect_hardware

        with console.status("probing hardware (peaks are measured once per machine)…"):
            hw = detect_hardware(pm)
    study = run_placement_study(config, spec, hw)
    store = Store(db_url)
    study["study_id"] = store.save_study("placement", study["system"]["name"], hw.fingerprint if hw else None, study)
    if as_json:
        click.echo(json.dumps(study, indent=2))
        return
    from capbench_core.render.report import print_placement

    print_placement(console, study)
    console.print(plain(f"stored study {study['study_id']} in {store.url}"), style="dim")

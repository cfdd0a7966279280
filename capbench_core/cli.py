"""The `capbench` command. Heavy modules are imported inside commands so --help stays fast."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from capbench_core.errors import CapbenchError


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _ints(value: str, flag: str) -> list[int]:
    try:
        levels = [int(v) for v in _csv(value)]
    except ValueError:
        raise CapbenchError(f"{flag} {value!r} must be a comma-separated list of integers, e.g. 1,4,16") from None
    if not levels or min(levels) < 1:
        raise CapbenchError(f"{flag} {value!r} needs integers >= 1")
    return levels


class CapbenchGroup(click.Group):
    """Prints CapbenchError as one line (traceback only with --debug); Ctrl-C exits 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CapbenchError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.secho("interrupted: what was measured is stored as partial", fg="yellow", err=True)
            # Every `with` block has closed its engine and every result is committed by now. Leave without
            # interpreter teardown: an engine thread still inside torch or llama.cpp would abort the process
            # when native thread objects are destroyed under it ("terminate called ...").
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)


@click.group(cls=CapbenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="capbench")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """capbench — Cost, Accuracy and Performance of MoE serving systems, side by side.

    \b
    Quick start:
      capbench run                 compare every available backend on the embedded tiny MoE
      capbench compare             show stored runs
      capbench plugins             list plugins and whether each backend can run here
      capbench model inspect NAME  parameters, sparsity, FLOPs and KV bytes of a model
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _pm() -> Any:
    from capbench_core.plugins import get_plugin_manager

    return get_plugin_manager()


def _text(value: str) -> Any:
    from rich.text import Text

    return Text(value)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


def _resolve_model(pm: Any, name: str) -> Any:
    from capbench_core.backend import ModelRef
    from capbench_core.errors import unknown_name

    if name in pm.models.names():
        return pm.models.get(name)
    path = Path(name)
    if path.exists():
        directory = path.parent if path.is_file() else path
        label = path.stem if path.is_file() and path.stem != "config" else directory.resolve().name
        return ModelRef(name=label, path=directory.resolve())
    raise unknown_name("model", name, pm.models.names())


def _slo(value: str | None) -> dict[str, float]:
    from capbench_core.metrics import SLO_PRESETS

    if not value:
        return {}
    if value in SLO_PRESETS:
        return dict(SLO_PRESETS[value])
    out: dict[str, float] = {}
    for pair in _csv(value):
        key, _, raw = pair.partition("=")
        if key not in ("ttft_ms", "tpot_ms", "e2e_ms"):
            raise CapbenchError(f"--slo {value!r}: unknown budget {key!r}; use ttft_ms, tpot_ms, e2e_ms or a preset "
                                f"({', '.join(SLO_PRESETS)})")
        try:
            out[key] = float(raw)
        except ValueError:
            raise CapbenchError(f"--slo {value!r}: {key} needs a number of milliseconds") from None
    return out


def _levels(concurrency: str | None, rate: str | None) -> list[Any]:
    """Closed-loop levels (default 1,8), or Poisson rates capped by --concurrency when it is given."""
    from capbench_core.runner import Level

    if not rate:
        return [Level(c) for c in _ints(concurrency or "1,8", "--concurrency")]
    try:
        rates = [float(r) for r in _csv(rate)]
    except ValueError:
        raise CapbenchError(f"--rate {rate!r} must be a comma-separated list of requests/second") from None
    if not rates or min(rates) <= 0:
        raise CapbenchError(f"--rate {rate!r} needs rates > 0")
    cap = max(_ints(concurrency, "--concurrency")) if concurrency else 1024
    return [Level(cap, r) for r in rates]


def _choose_backends(pm: Any, console: Any, backends: str | None, endpoint: str | None) -> list[str]:
    if backends:
        chosen = _csv(backends)
        for name in chosen:
            pm.backends.get(name)
        return chosen
    if endpoint:
        raise CapbenchError("--endpoint needs --backend to say what serves it (openai for any "
                            "OpenAI-compatible server, or the engine's own backend, e.g. llamacpp_server)")
    runnable = {n: b for n, b in pm.backends.items() if not getattr(b, "needs_endpoint", False)}
    chosen = [n for n, b in runnable.items() if b.available().ok]
    skipped = [f"{n} ({b.available().reason})" for n, b in runnable.items() if not b.available().ok]
    if skipped:
        console.print(f"[dim]not available here: {'; '.join(skipped)}[/dim]", highlight=False)
    if not chosen:
        raise CapbenchError("no backend can run here; `capbench plugins` says why for each")
    return chosen


@cli.command()
@click.option("--backend", "backends", metavar="A,B", help="Backends to compare (default: every available one).")
@click.option("--model", "model_name", default="tiny-moe", show_default=True,
              help="A registered model name or a Hugging Face model directory.")
@click.option("--task", "task_name", default=None, help="Task (default: the model's own task, else 'random').")
@click.option("--num-requests", type=click.IntRange(min=1), default=128, show_default=True,
              help="Measured requests per load level.")
@click.option("--warmup", type=click.IntRange(min=0), default=8, show_default=True,
              help="Warm-up requests per level, run first and excluded from the metrics (but recorded).")
@click.option("--concurrency", default=None, metavar="N,...",
              help="Concurrent requests (closed loop; default 1,8); a list gives one row per level. "
                   "With --rate: the most requests in flight.")
@click.option("--rate", default=None, metavar="R,...",
              help="Poisson arrival rates in requests/s (open loop, seeded) instead of fixed concurrency.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Stop sending new requests after this long (per level).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for arrivals.")
@click.option("--slo", default=None, metavar="ttft_ms=N,tpot_ms=N|PRESET",
              help="Latency budgets for goodput; presets: mlperf-mixtral-8x7b, mlperf-llama2-70b, mlperf-deepseek-r1.")
@click.option("--price-usd-per-hour", type=click.FloatRange(min=0), default=None,
              help="Hourly price of this machine, for $/Mtok.")
@click.option("--price-from", default=None, metavar="ROW_ID",
              help="Hourly price from the dated, sourced price table (see `capbench prices`), scaled to "
                   "the accelerators used.")
@click.option("--hardware-price-usd", type=click.FloatRange(min=0), default=None,
              help="Capex cost model instead of an hourly price: what this machine cost.")
@click.option("--cost-preset", type=click.Choice(["moe-cap"]), default=None,
              help="Capex model with MoE-CAP's published GPU prices, TDPs, $/kWh and overheads.")
@click.option("--life-years", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
              help="Capex model: years the hardware price is spread over.")
@click.option("--usd-per-kwh", type=click.FloatRange(min=0), default=0.10, show_default=True,
              help="Capex model: electricity price.")
@click.option("--power-w", type=click.FloatRange(min=0), default=None,
              help="Capex model: power draw to charge (default: measured energy, else datasheet TDP as an estimate).")
@click.option("--endpoint", default=None, metavar="URL",
              help="Attach to a running server instead of launching one (server backends).")
@click.option("--served-model", default=None, help="Model name on the attached server.")
@click.option("--backend-option", "backend_option_pairs", multiple=True, metavar="[BACKEND:]KEY=VALUE",
              help="Backend options (see `capbench plugins --json`); unscoped ones go to every backend "
                   "that takes them.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="Data file for file-based tasks (gsm8k, mmlu): JSONL, JSON or Parquet.")
@click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE",
              help="Passed to the task (random: input_len, output_len, range_ratio, seed).")
@click.option("--db", "db_url", default=None, envvar="CAPBENCH_DB",
              help="SQLAlchemy URL of the results database (default: SQLite in the user data dir).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
def run(backends: str | None, model_name: str, task_name: str | None, num_requests: int, warmup: int,
        concurrency: str | None, rate: str | None, duration: float | None, seed: int, slo: str | None,
        price_usd_per_hour: float | None, price_from: str | None, hardware_price_usd: float | None,
        cost_preset: str | None, life_years: float, usd_per_kwh: float, power_w: float | None,
        endpoint: str | None, served_model: str | None,
        backend_option_pairs: tuple[str, ...], data_path: Path | None, task_options: tuple[str, ...],
        db_url: str | None,
        json_path: Path | None) -> None:
    """Run the same model and workload through each backend and print the CAP table."""
    from capbench_core.report import print_results
    from capbench_core.runner import Runner, RunPlan, backend_options, detect_hardware, options_from_pairs
    from capbench_core.store import Store

    pm = _pm()
    console = _console()
    levels = _levels(concurrency, rate)
    budgets = _slo(slo)
    chosen_costs = [flag for flag, value in (("--price-usd-per-hour", price_usd_per_hour), ("--price-from", price_from),
                                             ("--hardware-price-usd", hardware_price_usd),
                                             ("--cost-preset", cost_preset)) if value is not None]
    if len(chosen_costs) > 1:
        raise CapbenchError(f"give one cost model, not {' and '.join(chosen_costs)}")
    model = _resolve_model(pm, model_name)
    task = pm.tasks.get(task_name or model.default_task or "random")
    chosen = _choose_backends(pm, console, backends, endpoint)
    pairs = list(backend_option_pairs)
    pairs += [f"endpoint={endpoint}"] if endpoint else []
    pairs += [f"served_model={served_model}"] if served_model else []
    routed = backend_options(pairs, {name: pm.backends.get(name) for name in chosen})
    _refuse_if_none_can_run(pm, chosen, routed)
    store = Store(db_url)
    plan = RunPlan(backends=chosen, model=model, task=task, num_requests=num_requests, warmup=warmup,
                   levels=levels, backend_options=routed,
                   task_options={**options_from_pairs(list(task_options)), **({"data": str(data_path)} if data_path
                                                                            else {})},
                   duration_s=duration, seed=seed, slo=budgets)
    with console.status("probing hardware (peaks are measured once per machine)…"):
        hardware = detect_hardware(pm)
    plan.cost = _cost_model(hardware, price_usd_per_hour, price_from, hardware_price_usd, cost_preset,
                            life_years, usd_per_kwh, power_w)
    reporter = _progress_reporter(console)
    _sigterm_as_interrupt()
    results = Runner(pm, store, hardware, reporter).run(plan)
    print_results(console, results)
    console.print(f"[dim]stored {len(results)} run(s) in {store.url}[/dim]", highlight=False)
    if json_path:
        json_path.write_text(json.dumps([r.model_dump(mode="json") for r in results], indent=2))
        console.print(f"[dim]wrote {json_path}[/dim]", highlight=False)
    if any(r.status == "failed" for r in results):
        sys.exit(3)


def _cost_model(hardware: Any, price_usd_per_hour: float | None, price_from: str | None,
                hardware_price_usd: float | None, cost_preset: str | None, life_years: float, usd_per_kwh: float,
                power_w: float | None) -> Any:
    """The one cost model the flags chose (None: no price, and the results say so)."""
    from capbench_core import cost

    if price_usd_per_hour is not None:
        return cost.Hourly(price_usd_per_hour, "hourly price (--price-usd-per-hour)")
    if price_from is not None:
        return cost.hourly_from_table(price_from, hardware)
    if hardware_price_usd is not None:
        return cost.Capex(hardware_price_usd, life_years, usd_per_kwh, power_w)
    if cost_preset == "moe-cap":
        return cost.moe_cap_preset(hardware, life_years)
    return None


def _refuse_if_none_can_run(pm: Any, chosen: list[str], routed: dict[str, dict[str, str]]) -> None:
    """When no requested backend can run here, say why in one sentence each and store nothing."""
    reasons = []
    for name in chosen:
        backend = pm.backends.get(name)
        check = getattr(backend, "available_for", None)
        availability = check(routed.get(name, {})) if check else backend.available()
        if availability.ok:
            return
        reasons.append(f"{name} cannot run here: {availability.reason}")
    raise CapbenchError("; ".join(reasons))


def _sigterm_as_interrupt() -> None:
    def handler(signum: int, frame: Any) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _progress_reporter(console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from capbench_core.runner import Reporter

    class RichReporter(Reporter):
        def __init__(self) -> None:
            self.progress: Progress | None = None

        def phase(self, label: str, total: int) -> Any:
            self.end_phase()
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=console, transient=True)
            self.progress.start()
            task = self.progress.add_task(label, total=total)
            progress = self.progress
            return lambda: progress.advance(task)

        def end_phase(self) -> None:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

        def note(self, text: str) -> None:
            console.print(f"[yellow]{text}[/yellow]", highlight=False)

    return RichReporter()


@cli.command()
@click.option("--db", "db_url", default=None, envvar="CAPBENCH_DB", help="Results database URL.")
@click.option("--model", default=None, help="Only runs of this model.")
@click.option("--backend", default=None, help="Only runs of this backend.")
@click.option("--task", default=None, help="Only runs of this task.")
@click.option("--hardware", default=None, metavar="FINGERPRINT",
              help="Only runs on this hardware (a fingerprint or its first characters; see `capbench hardware show`).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Newest N runs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of tables.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV rows instead of tables.")
@click.option("--convention", type=click.Choice(["capbench", "vllm", "sglang", "guidellm", "llmperf"]),
              default=None, help="Recompute TTFT/TPOT/ITL from the raw timestamps under a peer's definitions.")
def compare(db_url: str | None, model: str | None, backend: str | None, task: str | None, hardware: str | None,
            limit: int, as_json: bool, as_csv: bool, convention: str | None) -> None:
    """Show stored runs as CAP tables, one table per (hardware, model, task, workload)."""
    from capbench_core.report import print_convention, print_results, results_csv, results_json
    from capbench_core.store import Store

    if as_json and as_csv:
        raise CapbenchError("give --json or --csv, not both")
    store = Store(db_url)
    results = store.runs(model=model, backend=backend, task=task, limit=limit, hardware=hardware)
    if convention:
        print_convention(_console(), list(reversed(results)), convention, as_json)
        return
    if as_json:
        click.echo(json.dumps(results_json(results), indent=2))
        return
    if as_csv:
        click.echo(results_csv(results), nl=False)
        return
    if not results:
        click.echo(f"no runs stored in {store.url} yet: try `capbench run`")
        return
    print_results(_console(), list(reversed(results)))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List plugins, where each comes from, what it registers, and backend availability."""
    pm = _pm()
    backends = {}
    for name, backend in pm.backends.items():
        availability = backend.available()
        backends[name] = {"plugin": pm.backends.owner(name), "available": availability.ok,
                          "reason": availability.reason, "description": getattr(backend, "description", "")}
    listing = [{"name": p.name, "source": p.source, "registers": p.registers} for p in pm.plugins.values()]
    if as_json:
        click.echo(json.dumps({"plugins": listing, "backends": backends}, indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    console = _console()
    table = Table(title="plugins", title_justify="left")
    for col in ("plugin", "source", "registers"):
        table.add_column(col)
    for p in listing:
        regs = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in p["registers"].items()) or "—"
        table.add_row(Text(p["name"]), Text(p["source"]), Text(regs))
    console.print(table)
    table = Table(title="backends", title_justify="left")
    for col in ("backend", "plugin", "available here", "why not"):
        table.add_column(col)
    for name, b in backends.items():
        table.add_row(Text(name), Text(b["plugin"]), "yes" if b["available"] else "no", Text(b["reason"] or ""))
    console.print(table)


@cli.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@click.option("--all", "export_all", is_flag=True, help="Export every stored run.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Bundle file to write (JSON).")
@click.option("--db", "db_url", default=None, envvar="CAPBENCH_DB", help="Results database URL.")
def export(run_ids: tuple[str, ...], export_all: bool, out: Path, db_url: str | None) -> None:
    """Write stored runs to a result bundle (JSON with a content hash per run) for `capbench db import`."""
    from capbench_core import bundle
    from capbench_core.store import Store

    if export_all == bool(run_ids):
        raise CapbenchError("name the runs to export (RUN_ID...) or pass --all; `capbench compare --json` "
                            "lists run ids")
    store = Store(db_url)
    if export_all:
        results = list(reversed(store.runs()))
    else:
        results = []
        for run_id in run_ids:
            found = store.get(run_id)
            if found is None:
                raise CapbenchError(f"no run {run_id!r} in {store.url}: `capbench compare --json` lists run ids")
            results.append(found)
    if not results:
        raise CapbenchError(f"no runs stored in {store.url} yet: nothing to export")
    bundle.write(results, out)
    click.echo(f"wrote {len(results)} run(s) to {out}")


@cli.group()
def db() -> None:
    """The results database: import submitted bundles, migrate."""


@db.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--db", "db_url", default=None, envvar="CAPBENCH_DB", help="Results database URL.")
def import_bundles(files: tuple[Path, ...], db_url: str | None) -> None:
    """Validate result bundles against schemas/ and add their runs once; a bad file changes nothing.

    Exits 1 when any file was rejected (the others are still imported).
    """
    from capbench_core import bundle
    from capbench_core.store import Store

    report = bundle.import_files(Store(db_url), list(files))
    for rejected in report.rejected:
        click.echo(f"rejected {rejected}", err=True)
    for conflict in report.conflicts:
        click.echo(f"conflict {conflict}", err=True)
    click.echo(f"{report.files_ok} file(s) accepted, {len(report.rejected)} rejected; runs: {report.added} added, "
               f"{report.duplicate} already stored, {len(report.conflicts)} conflicting")
    if report.rejected or report.conflicts:
        sys.exit(1)


@db.command("upgrade")
@click.option("--db", "db_url", default=None, envvar="CAPBENCH_DB", help="Results database URL.")
def upgrade_db(db_url: str | None) -> None:
    """Migrate the database to the newest schema (every command does this on open; this does only that)."""
    from capbench_core.store import Store

    store = Store(db_url)
    click.echo(f"{store.url}: schema is current ({store.count()} runs)")


@cli.group()
def model() -> None:
    """Model analytics and the embedded tiny MoE."""


@model.command("inspect")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the contract keys as JSON.")
@click.option("--context-len", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Context length for flops_per_token.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32", "fp8"]), default="bfloat16",
              show_default=True, help="Element type for byte counts.")
def inspect_model(name: str, as_json: bool, context_len: int, dtype: str) -> None:
    """Parameters (total / active per token), sparsity, FLOPs and KV bytes of NAME.

    NAME is a registered model (see `capbench model list`), a model directory or a config.json.
    """
    from capbench_core.model_spec import spec_from_path

    ref = _resolve_model(_pm(), name)
    path = Path(name) if Path(name).is_file() else ref.path
    spec = spec_from_path(path, ref.name)
    if as_json:
        click.echo(json.dumps(spec.summary(context_len, dtype), indent=2))
        return
    from capbench_core.report import print_model

    print_model(_console(), spec, context_len, dtype)


@model.command("list")
def list_models() -> None:
    """Registered models."""
    pm = _pm()
    for name, ref in pm.models.items():
        click.echo(f"{name}\t{ref.description}\t{ref.path}")


@cli.group()
def sweep() -> None:
    """Declarative benchmark matrices: plan them, run them here or on a Ray cluster, resume them."""


def _matrix(path: Path) -> Any:
    from capbench_core import sweep as sweeps

    pm = _pm()
    known = {"backend": pm.backends.names(), "model": pm.models.names(), "task": pm.tasks.names()}
    return sweeps.load(path, known)


@sweep.command("plan")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the cells as JSON.")
def sweep_plan(path: Path, as_json: bool) -> None:
    """Expand a matrix file into its cells and show what each needs (GPUs, weight memory, runnable here)."""
    from capbench_core.model_spec import spec_from_path

    matrix = _matrix(path)
    pm = _pm()
    rows = []
    for cell in matrix.cells:
        s = cell.settings
        ref = pm.models.get(s["model"])
        try:
            weight_gb: float | None = spec_from_path(ref.path, ref.name).weight_bytes("bfloat16") / 1e9
        except CapbenchError:
            weight_gb = None
        availability = pm.backends.get(s["backend"]).available()
        rows.append({"cell": cell.hash, "label": cell.label(), "settings": s, "num_gpus": cell.resources.num_gpus,
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
        load = f"{s['rate']:g}/s" if s.get("rate") else f"c={s['concurrency']}"
        table.add_row(*(Text(str(c)) for c in (
            r["cell"], s["backend"], s["model"], s["task"], load, f"{r['num_gpus']:g}", r["accelerator"] or "—",
            "—" if r["weights_gb_bf16"] is None else f"{r['weights_gb_bf16']:.3g}",
            "yes" if r["runs_here"] else f"no: {r['why_not']}")))
    _console().print(table)


@sweep.command("run")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: cells one after another here; ray: each cell a Ray task on a cluster.")
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray instance).")
@click.option("--resume", is_flag=True, help="Skip cells already stored as complete for this sweep.")
@click.option("--max-retries", type=click.IntRange(min=0), default=1, show_default=True,
              help="Ray: times a cell is retried when its worker dies.")
@click.option("--db", "db_url", default=None, envvar="CAPBENCH_DB", help="Results database URL.")
def sweep_run(path: Path, executor: str, address: str | None, resume: bool, max_retries: int,
              db_url: str | None) -> None:
    """Run every cell (or, with --resume, the missing ones) into one database; exits 3 if a cell failed."""
    from capbench_core import sweep as sweeps
    from capbench_core.store import Store

    matrix = _matrix(path)
    store = Store(db_url)
    cells = sweeps.pending(matrix, store, resume)
    console = _console()
    skipped = len(matrix.cells) - len(cells)
    console.print(_text(f"sweep {matrix.spec.name}: {len(cells)} cell(s) to run"
                       + (f", {skipped} already complete" if skipped else "") + f" ({executor})"))
    failed: list[str] = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("cells", total=len(cells))

        def progress(cell: Any, outcome: Any) -> None:
            mark = "ok" if outcome.status == "complete" else f"FAILED: {outcome.reason}"
            bar.console.print(_text(f"{cell.hash} {cell.label()}: {mark}"))
            if outcome.status != "complete":
                failed.append(cell.hash)
            bar.advance(task)

        _sigterm_as_interrupt()
        if executor == "local":
            from capbench_core.runner import Reporter, detect_hardware

            sweeps.run_local(matrix, cells, store, detect_hardware(_pm()), Reporter(), progress)
        else:
            sweeps.run_ray(matrix, cells, store, address, progress, max_retries)
    console.print(_text(f"{len(cells) - len(failed)} cell(s) complete, {len(failed)} failed; results in {store.url}"))
    if failed:
        sys.exit(3)


@cli.group()
def study() -> None:
    """Studies built on capbench's model analytics and hardware tables."""


@study.command("sparsity")
@click.option("--hardware", "hardware_name", default=None,
              help="A datasheet accelerator (e.g. 'H100 SXM'; default) or 'here' (this machine, measured peaks). "
                   "--measure always uses this machine.")
@click.option("--active-params", type=click.FloatRange(min=1), default=None,
              help="Active parameters per token, held fixed across the family (default 1e9; 5e7 with --measure).")
@click.option("--experts", default=None, metavar="E,...",
              help="Experts per MoE layer of each member (1: the dense model); default 1,4,8,16,32,64. "
                   "With --fixed total: one E (default 32).")
@click.option("--top-k", default=None, metavar="K[,...]",
              help="Experts per token (default 2). With --fixed total: the values to vary (default 1,2,4,8).")
@click.option("--fixed", "held", type=click.Choice(["active", "total"]), default="active", show_default=True,
              help="active: same FLOPs per token, E varies; total: the mirror family, same weights, top-k varies.")
@click.option("--total-params", type=click.FloatRange(min=1), default=None,
              help="--fixed total: parameters of every member (default 4e9; 2e8 with --measure).")
@click.option("--batch", "batches", default="1,8,64", show_default=True, metavar="B,...",
              help="Decode batch sizes (concurrent requests in measured mode).")
@click.option("--context", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Analytic mode: context tokens per sequence (KV cache read per step).")
@click.option("--measure", is_flag=True,
              help="Also run the family here (random weights, a small layout) and compare with the roofline.")
@click.option("--measure-backends", default="torch_moe,llamacpp", show_default=True, metavar="A,B",
              help="Backends for --measure (llamacpp decodes one request at a time: batch 1 only).")
@click.option("--max-weight-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--measure: skip members with more float32 weights (default: a quarter of host memory).")
@click.option("--loss-fit", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON with the coefficients of Abnar et al. Eq. 6 and their source (capbench ships none).")
@click.option("--compute-budget", type=click.FloatRange(min=0, min_open=True), default=1e21, show_default=True,
              help="Training FLOPs for the predicted pre-training loss (with --loss-fit).")
@click.option("--plot-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write PNG and SVG plots here (needs matplotlib: capbench[plots]).")
@click.option("--db", "db_url", default=None, envvar="CAPBENCH_DB", help="Results database (the study is stored).")
@click.option("--json", "as_json", is_flag=True, help="Print the study as JSON.")
def sparsity_study(hardware_name: str | None, active_params: float | None, experts: str | None,
                   top_k: str | None, held: str, total_params: float | None, batches: str, context: int,
                   measure: bool, measure_backends: str, max_weight_gb: float | None,
                   loss_fit: Path | None, compute_budget: float, plot_dir: Path | None, db_url: str | None,
                   as_json: bool) -> None:
    """What sparsity costs at serving time: analytic roofline, and (--measure) measured runs beside it."""
    from capbench_core import sparsity
    from capbench_core.model_spec import spec_from_config
    from capbench_core.store import Store

    console = _console(stderr=as_json)  # with --json, stdout holds the JSON only
    fit = sparsity.LossFit.from_file(loss_fit) if loss_fit else None
    store = Store(db_url)
    batch_sizes = _ints(batches, "--batch")
    if held == "total":
        expert_counts = _ints(experts or "32", "--experts")
        if len(expert_counts) != 1:
            raise CapbenchError("--fixed total holds one expert count: give a single --experts value")
        top_ks = _ints(top_k or "1,2,4,8", "--top-k")
    else:
        expert_counts = _ints(experts or "1,4,8,16,32,64", "--experts")
        top_ks = _ints(top_k or "2", "--top-k")
        if len(top_ks) != 1:
            raise CapbenchError("--fixed active holds one top-k: give a single --top-k value (or --fixed total "
                                "to vary it)")

    def configs_for(base: dict[str, Any] | None, default_active: float, default_total: float) -> Any:
        if held == "total":
            return sparsity.mirror_configs(total_params or default_total, expert_counts[0], top_ks, base)
        return sparsity.family_configs(active_params or default_active, expert_counts, top_ks[0], base)

    hw = None
    if measure or hardware_name == "here":
        from capbench_core.runner import detect_hardware

        with console.status("probing hardware (peaks are measured once per machine)…"):
            hw = detect_hardware(_pm())
    if measure:
        configs = configs_for(sparsity.MEASURE_BASE, 5e7, 2e8)
        machine, dtype, context = sparsity.machine_here(hw), "float32", 8 + 16
    else:
        configs = configs_for(None, 1e9, 4e9)
        if hardware_name == "here":
            machine, dtype = sparsity.machine_here(hw), "float32"
        else:
            machine, dtype = sparsity.machine_named(hardware_name or "H100 SXM"), "bfloat16"
    members = [spec_from_config(c, sparsity.member_name(c)) for c in configs]
    rows = sparsity.analyse(members, machine, batch_sizes, dtype, context)
    measured = []
    if measure:
        from platformdirs import user_cache_dir

        measured = sparsity.measure(_pm(), store, hw, configs, batch_sizes, _csv(measure_backends),
                                    _progress_reporter(console), Path(user_cache_dir("capbench")) / "sparsity",
                                    max_weight_gb=max_weight_gb)
    study = sparsity.to_json(machine, dtype, context, held, rows, measured, fit, compute_budget)
    study["study_id"] = store.save_study("sparsity", machine.name, hw.fingerprint if hw else None, study)
    if plot_dir:
        written = sparsity.write_plots(study, plot_dir)
        console.print(f"[dim]wrote {', '.join(str(p) for p in written)}[/dim]", highlight=False)
    if as_json:
        click.echo(json.dumps(study, indent=2))
        return
    from capbench_core.report import print_sparsity

    print_sparsity(console, study)
    console.print(f"[dim]stored study {study['study_id']} in {store.url}[/dim]", highlight=False)


@cli.group()
def hardware() -> None:
    """What capbench sees on this machine."""


@hardware.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print the HardwareSpec as JSON.")
def show_hardware(as_json: bool) -> None:
    """Devices, fingerprint and peaks (CPU peaks are measured once and cached)."""
    from capbench_core.runner import detect_hardware

    spec = detect_hardware(_pm())
    if as_json:
        click.echo(spec.model_dump_json(indent=2))
        return
    click.echo(f"fingerprint: {spec.fingerprint}")
    for d in spec.devices:
        mem = f", {d.memory_bytes / 2**30:.1f} GiB" if d.memory_bytes else ""
        click.echo(f"{d.kind}: {d.count}x {d.model} ({d.vendor}{mem})")
    bw = spec.peak_mem_bw_gbps
    click.echo(f"peak memory bandwidth: {_peak(bw.value, 'GB/s')} ({bw.source}; {bw.note})")
    for dtype, peak in spec.peak_flops_tflops.items():
        click.echo(f"peak dense {dtype}: {_peak(peak.value, 'TFLOP/s')} ({peak.source}; {peak.note})")


@hardware.command("prices")
@click.option("--accelerator", default=None, help="Only rows for this datasheet accelerator (e.g. 'H100 SXM').")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def show_prices(accelerator: str | None, as_json: bool) -> None:
    """The dated, sourced hourly price table used by `capbench run --price-from ROW_ID`."""
    from capbench_core.cost import price_table

    rows = [r for r in price_table() if accelerator is None or r.accelerator == accelerator]
    if as_json:
        click.echo(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title="hourly prices (check the date before you publish a cost)", title_justify="left")
    for col in ("row id", "accelerator", "GPUs", "$/h", "$/GPU-h", "pricing", "as of", "source"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(Text(r.id), Text(r.accelerator), str(r.gpus), f"{r.usd_per_hour:g}",
                      f"{r.usd_per_hour / r.gpus:.2f}", r.pricing, r.as_of, Text(f"{r.source_kind}: {r.source}"))
    _console().print(table)


def _peak(value: float | None, unit: str) -> str:
    return "unknown" if value is None else f"{value:g} {unit}"


def main() -> None:
    try:
        _pm().add_commands(cli)
    except CapbenchError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    cli(prog_name="capbench")


if __name__ == "__main__":
    main()

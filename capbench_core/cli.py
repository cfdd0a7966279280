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

FORMATS = ["table", "rows", "csv", "json"]


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


DB_OPTION = click.option(
    "--db", "db_url", default=None, envvar="CAPBENCH_DB", metavar="URL|PATH",
    help="Results database: a SQLAlchemy URL (sqlite:///…, postgresql+psycopg://…) or a SQLite file path "
         "(default: SQLite in the user data dir; env CAPBENCH_DB).")

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


def _print_fit(console: Any, table: Any, wrap: tuple[str, ...] = ()) -> None:
    from capbench_core.report import print_fit

    print_fit(console, table, wrap)


def _resolve_model(pm: Any, name: str) -> Any:
    """A model directory or config file when the path exists, else a registered model (forgivingly)."""
    from capbench_core.backend import ModelRef

    path = Path(name)
    if name not in pm.models.names() and path.exists():
        directory = path.parent if path.is_file() else path
        label = path.stem if path.is_file() and path.stem != "config" else directory.resolve().name
        return ModelRef(name=label, path=directory.resolve())
    return pm.models.get(name)


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
    runnable = {n: b for n, b in pm.backends.items() if not b.needs_endpoint}
    chosen = [n for n, b in runnable.items() if b.available().ok]
    skipped = [f"{n} ({b.available().reason})" for n, b in runnable.items() if not b.available().ok]
    if skipped:
        console.print(_text(f"not available here: {'; '.join(skipped)}"), style="dim")
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
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Weight dtype for every backend that can hold it (default: each backend's own; every row "
                   "shows the dtype it ran).")
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
@DB_OPTION
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table: the CAP table sized to the terminal; rows: one block per run; csv/json: machine-readable "
                   "rows on stdout (progress and notes go to stderr).")
def run(backends: str | None, model_name: str, task_name: str | None, num_requests: int, warmup: int,
        concurrency: str | None, rate: str | None, duration: float | None, seed: int, slo: str | None,
        price_usd_per_hour: float | None, price_from: str | None, hardware_price_usd: float | None,
        cost_preset: str | None, life_years: float, usd_per_kwh: float, power_w: float | None,
        dtype: str | None, endpoint: str | None, served_model: str | None,
        backend_option_pairs: tuple[str, ...], data_path: Path | None, task_options: tuple[str, ...],
        db_url: str | None, json_path: Path | None, fmt: str) -> None:
    """Run the same model and workload through each backend and print the CAP table."""
    from capbench_core.runner import Runner, RunPlan, backend_options, detect_hardware, options_from_pairs
    from capbench_core.store import Store

    pm = _pm()
    console = _console(stderr=fmt in ("csv", "json"))
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
    if dtype:
        _apply_dtype(pm, console, chosen, routed, dtype)
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
    _show(console, results, fmt)
    console.print(_text(f"stored {len(results)} run(s) in {store.url}"), style="dim")
    if json_path:
        json_path.write_text(json.dumps([r.model_dump(mode="json") for r in results], indent=2))
        console.print(_text(f"wrote {json_path}"), style="dim")
    if any(r.status == "failed" for r in results):
        sys.exit(3)


def _show(console: Any, results: list[Any], fmt: str) -> None:
    from capbench_core.report import print_results, results_csv, results_json

    if fmt == "json":
        click.echo(json.dumps(results_json(results), indent=2))
    elif fmt == "csv":
        click.echo(results_csv(results), nl=False)
    else:
        print_results(console, results, fmt)


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


def _apply_dtype(pm: Any, console: Any, chosen: list[str], routed: dict[str, dict[str, str]], dtype: str) -> None:
    """--dtype becomes each backend's own option; an option the user gave for the same thing wins."""
    for name in chosen:
        options = pm.backends.get(name).dtype_options(dtype)
        if options is None:
            console.print(_text(f"{name} cannot hold its weights in {dtype}: it runs at its default"), style="dim")
            continue
        for key, value in options.items():
            routed[name].setdefault(key, value)


def _refuse_if_none_can_run(pm: Any, chosen: list[str], routed: dict[str, dict[str, str]]) -> None:
    """When no requested backend can run here, say why in one sentence each and store nothing."""
    reasons = []
    for name in chosen:
        backend = pm.backends.get(name)
        availability = backend.available_for(routed.get(name, {}))
        if availability.ok:
            return
        reasons.append(f"{name} cannot run here: {availability.reason}")
    raise CapbenchError("; ".join(reasons))


def _sigterm_as_interrupt() -> None:
    def handler(signum: int, frame: Any) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _progress_reporter(console: Any) -> Any:
    from capbench_core.progress import TerminalReporter

    return TerminalReporter(console)


@cli.command()
@DB_OPTION
@click.option("--model", default=None, help="Only runs of this model.")
@click.option("--backend", default=None, help="Only runs of this backend.")
@click.option("--task", default=None, help="Only runs of this task.")
@click.option("--hardware", default=None, metavar="FINGERPRINT",
              help="Only runs on this hardware (a fingerprint or its first characters; see `capbench hardware show`).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Newest N runs.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table: CAP tables sized to the terminal; rows: one block per run; csv/json: machine-readable rows.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--csv", "as_csv", is_flag=True, help="Same as --format csv.")
@click.option("--convention", type=click.Choice(["capbench", "vllm", "sglang", "guidellm", "llmperf", "moe-cap"]),
              default=None, help="Recompute stored runs under a peer's definitions: TTFT/TPOT/ITL from the raw "
                                 "timestamps (vllm, sglang, guidellm, llmperf), or S-MBU/S-MFU from the stored "
                                 "decode steps as MoE-CAP computes them, beside capbench's (moe-cap).")
def compare(db_url: str | None, model: str | None, backend: str | None, task: str | None, hardware: str | None,
            limit: int, fmt: str, as_json: bool, as_csv: bool, convention: str | None) -> None:
    """Show stored runs as CAP tables, one table per (hardware, model, task, workload)."""
    from capbench_core.report import print_convention
    from capbench_core.store import Store

    if as_json and as_csv:
        raise CapbenchError("give --json or --csv, not both")
    fmt = "json" if as_json else "csv" if as_csv else fmt
    store = Store(db_url)
    results = store.runs(model=model, backend=backend, task=task, limit=limit, hardware=hardware)
    if convention == "moe-cap":
        from capbench_core.report import print_moe_cap

        print_moe_cap(_console(), list(reversed(results)), fmt == "json")
        return
    if convention:
        print_convention(_console(), list(reversed(results)), convention, fmt == "json")
        return
    if not results and fmt in ("table", "rows"):
        click.echo(f"no runs stored in {store.url} yet: try `capbench run`")
        return
    _show(_console(), list(reversed(results)), fmt)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List plugins, where each comes from, what it registers, and backend availability."""
    pm = _pm()
    backends = {}
    for name, backend in pm.backends.items():
        availability = backend.available()
        backends[name] = {"plugin": pm.backends.owner(name), "available": availability.ok,
                          "reason": availability.reason, "description": backend.description}
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
    _print_fit(console, table, wrap=("registers",))
    table = Table(title="backends", title_justify="left")
    for col in ("backend", "plugin", "available here", "why not"):
        table.add_column(col)
    for name, b in backends.items():
        table.add_row(Text(name), Text(b["plugin"]), "yes" if b["available"] else "no", Text(b["reason"] or ""))
    _print_fit(console, table, wrap=("why not",))


@cli.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@click.option("--all", "export_all", is_flag=True, help="Export every stored run.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Bundle file to write (JSON).")
@DB_OPTION
@click.option("--sign", "key_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Sign the bundle with this private key (from `capbench keys generate`).")
def export(run_ids: tuple[str, ...], export_all: bool, out: Path, db_url: str | None, key_path: Path | None) -> None:
    """Write stored runs to a result bundle (JSON with a content hash per run) for `capbench db import`."""
    from capbench_core import bundle, signing
    from capbench_core.store import Store

    key = signing.load_private(key_path) if key_path else None

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
    bundle.write(results, out, key)
    signed = f", signed by {signing.public_key_text(key)}" if key is not None else ""
    click.echo(f"wrote {len(results)} run(s) to {out}{signed}")


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def verify(files: tuple[Path, ...]) -> None:
    """Check result bundles as `capbench db import` would, without a database: schema, hashes, signature,
    and every figure re-derived from each run's raw records. Exits 1 when any file would be rejected."""
    import time

    from capbench_core import bundle

    tasks = dict(_pm().tasks.items())
    bad = 0
    for path in files:
        t0 = time.perf_counter()
        try:
            found = bundle.read(path, tasks)
        except bundle.Rejected as exc:
            bad += 1
            for line in str(exc).splitlines():
                click.echo(f"rejected {line}", err=True)
            continue
        signed = f"signed by {found.signed_by}" if found.signed_by else "unsigned"
        click.echo(f"{path}: ok — {len(found.results)} run(s) re-derived from their records in "
                   f"{time.perf_counter() - t0:.2f} s; {signed}")
    if bad:
        sys.exit(1)


@cli.group()
def keys() -> None:
    """Signing keys for result bundles (ed25519)."""


@keys.command("generate")
@click.option("--name", default="capbench", show_default=True, help="File name stem: NAME.key and NAME.pub.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the key pair (default: keys/ in the user data directory).")
def keys_generate(name: str, out_dir: Path | None) -> None:
    """Make a key pair: the private key (mode 0600) signs exports, the public key goes to the leaderboard."""
    from platformdirs import user_data_dir

    from capbench_core import signing

    private, public = signing.generate(out_dir or Path(user_data_dir("capbench")) / "keys", name)
    click.echo(f"private key: {private} (keep it; sign with `capbench export --sign {private}`)")
    click.echo(f"public key:  {public}: {public.read_text().strip()} (give it to the leaderboard: "
               f"`capbench db trust {public} --name NAME`)")


@cli.group()
def db() -> None:
    """The results database: import submitted bundles, migrate."""


@db.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@DB_OPTION
@click.option("--require-signature", is_flag=True,
              help="Take only bundles signed by a trusted key (`capbench db trust`).")
def import_bundles(files: tuple[Path, ...], db_url: str | None, require_signature: bool) -> None:
    """Validate result bundles, re-derive every figure from each run's own records, and add their runs
    once; a bad file changes nothing.

    Exits 1 when any file was rejected (the others are still imported).
    """
    from capbench_core import bundle
    from capbench_core.store import Store

    report = bundle.import_files(Store(db_url), list(files), dict(_pm().tasks.items()), require_signature)
    for rejected in report.rejected:
        for line in str(rejected).splitlines():
            click.echo(f"rejected {line}", err=True)
    for conflict in report.conflicts:
        click.echo(f"conflict {conflict}", err=True)
    click.echo(f"{report.files_ok} file(s) accepted, {len(report.rejected)} rejected; runs: {report.added} added, "
               f"{report.duplicate} already stored, {len(report.conflicts)} conflicting")
    if report.rejected or report.conflicts:
        sys.exit(1)


@db.command("trust")
@click.argument("public_key")
@click.option("--name", required=True, help="Who submits with this key (shown on the leaderboard).")
@DB_OPTION
def trust(public_key: str, name: str, db_url: str | None) -> None:
    """Trust bundles signed with PUBLIC_KEY (a .pub file or its base64 text) as submitted by NAME."""
    from capbench_core import signing
    from capbench_core.store import Store

    key = signing.read_public(public_key)
    Store(db_url).trust(key, name)
    click.echo(f"trusted {key} as {name!r}")


@db.command("upgrade")
@DB_OPTION
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
    _print_fit(_console(), table)


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
            from capbench_core.progress import Reporter
            from capbench_core.runner import detect_hardware

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
def sparsity_study(hardware_name: str | None, active_params: float | None, experts: str | None,
                   top_k: str | None, held: str, total_params: float | None, batches: str, context: int,
                   measure: bool, measure_backends: str, max_weight_gb: float | None,
                   loss_fit: str | None, compute_budget: float, plot_dir: Path | None, db_url: str | None,
                   as_json: bool) -> None:
    """What sparsity costs at serving time: analytic roofline, and (--measure) measured runs beside it."""
    from capbench_core import sparsity
    from capbench_core.losslaw import LossFit
    from capbench_core.model_spec import spec_from_config
    from capbench_core.store import Store

    console = _console(stderr=as_json)  # with --json, stdout holds the JSON only
    fit = LossFit.load(loss_fit) if loss_fit else None
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
    joint = None
    if fit and not measure:
        if held == "total":
            raise CapbenchError("the joint view compares sparsity levels at one training budget: use it with "
                                "--fixed active (the default), not --fixed total")
        joint = sparsity.joint(fit, compute_budget, expert_counts, top_ks[0], machine, max(batch_sizes), dtype,
                               context)
    study = sparsity.to_json(machine, dtype, context, held, rows, measured, fit, compute_budget, joint)
    study["study_id"] = store.save_study("sparsity", machine.name, hw.fingerprint if hw else None, study)
    if plot_dir:
        written = sparsity.write_plots(study, plot_dir)
        console.print(_text(f"wrote {', '.join(str(p) for p in written)}"), style="dim")
    if as_json:
        click.echo(json.dumps(study, indent=2))
        return
    from capbench_core.report import print_sparsity

    print_sparsity(console, study)
    console.print(_text(f"stored study {study['study_id']} in {store.url}"), style="dim")


@cli.group()
def engines() -> None:
    """Engine environments: vLLM, SGLang and llama.cpp each in their own virtualenv or build.

    \b
    capbench engines list              what is installed, with package, version, Python and device
    capbench engines install vllm      create engines/vllm under the user data directory
    capbench engines remove vllm
    """


def _recipes(names: tuple[str, ...]) -> list[Any]:
    pm = _pm()
    return [pm.engines.get(n) for n in names] if names else [r for _, r in pm.engines.items()]


@engines.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def engines_list(as_json: bool) -> None:
    """Every engine capbench can install, and whether it is installed here."""
    from dataclasses import asdict

    from capbench_core import engines as env

    rows = list(env.listing(_recipes(()), env.this_device()))
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"engine environments ({env.engines_dir()})"), title_justify="left")
    for col in ("engine", "package", "version", "device", "installed", "variant", "python / binary"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(Text(c) for c in (
            r.name, r.package, r.version or "—", r.device,
            "yes" if r.installed else f"no (about {r.estimate_min:g} min: capbench engines install {r.name})",
            r.variant or "—", r.executable or "—")))
    _print_fit(_console(), table)


@engines.command("install")
@click.argument("names", nargs=-1, required=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Build for this device (auto: cuda when an NVIDIA GPU is visible).")
@click.option("--force", is_flag=True, help="Reinstall even when the environment is installed.")
def engines_install(names: tuple[str, ...], device: str, force: bool) -> None:
    """Install engine environments (one virtualenv or build each, under the user data directory)."""
    from capbench_core import engines as env

    target: Any = env.this_device() if device == "auto" else device
    console = _console()
    for recipe in _recipes(names):
        found = env.installed(recipe.name)
        if found and not force:
            console.print(_text(f"{recipe.name}: already installed ({found.package} {found.version}, "
                                f"{found.device}) in {env.home(recipe.name)}"))
            continue
        minutes = recipe.estimate_s(target) / 60
        console.print(_text(f"{recipe.name}: installing {recipe.packages.get(target, '')} for {target} into "
                            f"{env.home(recipe.name)} — about {minutes:.0f} min on 2 cores with a cold pip cache; "
                            f"log: {env.log_path(recipe.name)}"))
        reporter = _progress_reporter(console)
        try:
            record = env.install(recipe, target, _install_progress(reporter, recipe.name), force=force)
        except BaseException as exc:
            reporter.end_phase(failed=True)
            if isinstance(exc, env.StepFailed):
                raise CapbenchError(f"{recipe.name} was not installed (nothing is left marked installed): {exc}") \
                    from None
            raise
        reporter.end_phase()
        console.print(_text(f"{recipe.name}: installed {record.package} {record.version} ({record.variant}) in "
                            f"{_duration(record.install_s)}"))


@engines.command("remove")
@click.argument("names", nargs=-1, required=True)
def engines_remove(names: tuple[str, ...]) -> None:
    """Delete engine environments."""
    from capbench_core import engines as env

    for recipe in _recipes(names):
        gone = env.remove(recipe.name)
        click.echo(f"{recipe.name}: {'removed ' + str(env.home(recipe.name)) if gone else 'was not installed'}")


def _install_progress(reporter: Any, name: str) -> Any:
    return lambda i, n, step: reporter.phase(f"{name} [{i + 1}/{n}] {step.label} (about {_duration(step.estimate_s)})")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


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


@hardware.command("measure")
def measure_hardware() -> None:
    """Measure this machine's CPU peaks again (memory bandwidth, float32 and bfloat16 GEMM) and cache them
    unless other processes kept the CPUs busy; later runs use the cached peaks."""
    from capbench_core.hardware import is_busy, peaks_cache_file
    from capbench_core.runner import detect_hardware

    with _console().status("measuring memory bandwidth and GEMM peaks (about 20 s)…"):
        spec = detect_hardware(_pm(), refresh_peaks=True)
    _print_peaks(spec)
    cached = peaks_cache_file(spec.fingerprint)
    busy = cached.is_file() and is_busy(json.loads(cached.read_text()))
    click.echo(f"cached in {cached}" if cached.is_file() and not busy else
               "not cached: other processes kept the CPUs busy; run it again on a quiet machine")


def _print_peaks(spec: Any) -> None:
    bw = spec.cpu_peak_mem_bw_gbps or spec.peak_mem_bw_gbps
    click.echo(f"CPU peak memory bandwidth: {_peak(bw.value, 'GB/s')} ({bw.source}; {bw.note})")
    for dtype, peak in (spec.cpu_peak_flops_tflops or spec.peak_flops_tflops).items():
        click.echo(f"CPU peak dense {dtype}: {_peak(peak.value, 'TFLOP/s')} ({peak.source}; {peak.note})")


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
    _print_fit(_console(), table)


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

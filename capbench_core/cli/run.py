"""`capbench run`: its flags are RunConfig's fields (capbench_core/config.py); the command only reads them,
resolves the config and hands it to the runner."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from capbench_core.cli.root import (
    DB_OPTION,
    FORMATS,
    cli,
    csv_list,
    int_list,
    make_console,
    plain,
    plugin_manager,
    progress_reporter,
    show_results,
    sigterm_as_interrupt,
)
from capbench_core.errors import CapbenchError

#: What `capbench run` takes that is not a run setting: where results go and how they are shown.
OUTPUT_FLAGS = ("db_url", "json_path", "fmt", "from_run")

RUN_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--backend", metavar="A,B", help="Backends to compare (default: every available one)."),
    click.option("--model", default="tiny-moe", show_default=True,
                 help="A registered model, a checkpoint directory, a .gguf file, or a Hugging Face id found in the "
                      "local Hugging Face cache (nothing is downloaded)."),
    click.option("--revision", default=None, metavar="REF",
                 help="With a Hugging Face id: the cached revision (a ref or a commit; default main)."),
    click.option("--task", default=None, help="Task (default: the model's own task, else 'random')."),
    click.option("--num-requests", type=click.IntRange(min=1), default=128, show_default=True,
                 help="Measured requests per load level."),
    click.option("--warmup", type=click.IntRange(min=0), default=8, show_default=True,
                 help="Warm-up requests per level, run first and excluded from the metrics (but recorded)."),
    click.option("--concurrency", default=None, metavar="N,...",
                 help="Concurrent requests (closed loop; default 1,8); a list gives one row per level. "
                      "With --rate: the most requests in flight."),
    click.option("--rate", default=None, metavar="R,...",
                 help="Poisson arrival rates in requests/s (open loop, seeded) instead of fixed concurrency."),
    click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True), default=None,
                 metavar="SECONDS", help="Stop sending new requests after this long (per level)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for arrivals."),
    click.option("--slo", default=None, metavar="ttft_ms=N,tpot_ms=N|PRESET",
                 help="Latency budgets for goodput; presets: mlperf-mixtral-8x7b, mlperf-llama2-70b, "
                      "mlperf-deepseek-r1."),
    click.option("--search", type=click.Choice(["max-rate", "max-concurrency"]), default=None,
                 help="Find each backend's highest Poisson rate (or concurrency) whose TTFT and TPOT percentile "
                      "meet --slo: doubling, then bisection; every probe is stored, the winner marked."),
    click.option("--search-percentile", type=click.Choice(["50", "90", "99"]), default="99", show_default=True,
                 help="With --search: the latency percentile the SLO applies to."),
    click.option("--search-precision", type=click.FloatRange(min=0.01, max=1), default=0.1, show_default=True,
                 help="With --search max-rate: stop when the bracket is this narrow (relative)."),
    click.option("--search-steps", type=click.IntRange(min=2, max=32), default=8, show_default=True,
                 help="With --search: at most this many probes per backend."),
    click.option("--client-procs", type=click.IntRange(min=1, max=256), default=None, metavar="N",
                 help="Client processes that send the measured requests, each with its own event loop and "
                      "connections (default: one per 64 streams, at most half the cores; backends that run in "
                      "capbench's process use one). A row whose client could not keep up is marked "
                      "client_limited."),
    click.option("--price-usd-per-hour", type=click.FloatRange(min=0), default=None,
                 help="Hourly price of this machine, for $/Mtok."),
    click.option("--price-from", default=None, metavar="ROW_ID",
                 help="Hourly price from the dated, sourced price table (see `capbench prices`), scaled to "
                      "the accelerators used."),
    click.option("--hardware-price-usd", type=click.FloatRange(min=0), default=None,
                 help="Capex cost model instead of an hourly price: what this machine cost."),
    click.option("--cost-preset", type=click.Choice(["moe-cap", "parts"]), default=None,
                 help="Capex model: moe-cap (MoE-CAP's published GPU prices, TDPs, $/kWh and overheads) or parts "
                      "(GPUs, CPU sockets, host DRAM and NICs from the sourced tables, with their power)."),
    click.option("--life-years", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
                 help="Capex model: years the hardware price is spread over."),
    click.option("--usd-per-kwh", type=click.FloatRange(min=0), default=0.10, show_default=True,
                 help="Capex model: electricity price."),
    click.option("--power-w", type=click.FloatRange(min=0), default=None,
                 help="Capex model: power draw to charge (default: measured energy, else datasheet TDP as an "
                      "estimate)."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
                 help="Weight dtype for every backend that can hold it (default: each backend's own; every row "
                      "shows the dtype it ran)."),
    click.option("--endpoint", default=None, metavar="URL",
                 help="Attach to a running server instead of launching one (server backends)."),
    click.option("--served-model", default=None, help="Model name on the attached server."),
    click.option("--backend-option", "backend_options", multiple=True, metavar="[BACKEND:]KEY=VALUE",
                 help="Backend options (see `capbench plugins --json`); unscoped ones go to every backend "
                      "that takes them."),
    click.option("--data", type=click.Path(path_type=Path), default=None,
                 help="Data file for file-based tasks (gsm8k, mmlu): JSONL, JSON or Parquet."),
    click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE",
                 help="Passed to the task (random: input_len, output_len, range_ratio, seed)."),
    click.option("--chat", is_flag=True, default=None,
                 help="Send prompts as user messages through the model's chat template (servers: "
                      "/v1/chat/completions); tasks random, gsm8k and mmlu."),
    DB_OPTION,
    click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Also write the results as JSON to this file."),
    click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                 help="table: the CAP table sized to the terminal; rows: one block per run; csv/json: "
                      "machine-readable rows on stdout (progress and notes go to stderr)."),
    click.option("--from", "from_run", default=None, metavar="RUN_ID",
                 help="Repeat a stored run with the exact settings it recorded (seed included); flags given "
                      "beside it replace those settings."),
]


def run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Every `capbench run` flag, in help order."""
    for option in reversed(RUN_OPTIONS):
        command = option(command)
    return command


def pairs_to_dict(pairs: list[str]) -> dict[str, str]:
    """`k=v` strings -> dict, with an error naming a malformed pair."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not key.strip() or not value.strip():
            raise CapbenchError(f"option {pair!r} is malformed: write KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def settings_from_cli(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags as RunConfig settings: text lists checked with errors naming the flag."""
    settings = {k: v for k, v in flags.items() if k not in OUTPUT_FLAGS and v is not None}
    if settings.get("concurrency") is not None:
        settings["concurrency"] = int_list(settings["concurrency"], "--concurrency")
    if settings.get("rate") is not None:
        settings["rate"] = rate_list(settings["rate"])
    if "backend" in settings:
        settings["backend"] = csv_list(settings["backend"])
    settings["backend_options"] = pairs_to_dict(list(settings.get("backend_options") or ()))
    settings["task_options"] = pairs_to_dict(list(settings.get("task_options") or ()))
    if settings.get("data") is not None:
        settings["data"] = str(settings["data"])
    return settings


def rate_list(value: str) -> list[float]:
    import math

    try:
        rates = [float(r) for r in csv_list(value)]
    except ValueError:
        raise CapbenchError(f"--rate {value!r} must be a comma-separated list of requests/second") from None
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise CapbenchError(f"--rate {value!r} needs finite rates > 0")
    return rates


def config_from_cli(ctx: click.Context, flags: dict[str, Any]) -> Any:
    """The RunConfig the flags describe; with --from, the stored run's, with the flags given beside it."""
    from capbench_core.config import RunConfig

    settings = settings_from_cli(flags)
    if not flags.get("from_run"):
        return RunConfig.build(settings)
    stored = stored_config(flags["from_run"], flags.get("db_url"))
    given = {k: v for k, v in settings.items()
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    return stored.with_settings(**given)


def stored_config(run_id: str, db_url: str | None) -> Any:
    from capbench_core.config import RunConfig
    from capbench_core.store import Store

    store = Store(db_url)
    found = store.get(run_id)
    if found is None:
        raise CapbenchError(f"no run {run_id!r} in {store.url}: `capbench compare --json` lists run ids")
    if found.config is None:
        raise CapbenchError(f"run {run_id} was stored before capbench recorded run settings: repeat it with flags")
    return RunConfig.build(found.config)


@cli.command()
@run_options
@click.pass_context
def run(ctx: click.Context, /, **flags: Any) -> None:
    """Run the same model and workload through each backend and print the CAP table."""
    from capbench_core.config import dtype_refusals, resolve
    from capbench_core.measure.hardware import detect_hardware
    from capbench_core.measure.runner import Runner
    from capbench_core.store import Store

    fmt = flags["fmt"]
    pm = plugin_manager()
    console = make_console(stderr=fmt in ("csv", "json"))
    resolved = resolve(config_from_cli(ctx, flags), pm)
    if resolved.skipped:
        console.print(plain(f"not available here: {'; '.join(resolved.skipped)}"), style="dim")
    for line in dtype_refusals(resolved):
        console.print(plain(line), style="dim")
    store = Store(flags["db_url"])
    with console.status("probing hardware (peaks are measured once per machine)…"):
        hardware = detect_hardware(pm)
    sigterm_as_interrupt()
    results = Runner(pm, store, hardware, progress_reporter(console)).run(resolved)
    show_results(console, results, fmt)
    console.print(plain(f"stored {len(results)} run(s) in {store.url}"), style="dim")
    if flags["json_path"]:
        flags["json_path"].write_text(json.dumps([r.model_dump(mode="json") for r in results], indent=2))
        console.print(plain(f"wrote {flags['json_path']}"), style="dim")
    if any(r.status == "failed" for r in results):
        sys.exit(3)

"""The root `capbench` group and what every command group shares: one-line errors, Ctrl-C, output helpers.
Heavy modules are imported inside commands so --help stays fast."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, NoReturn

import click

from capbench_core.errors import CapbenchError

FORMATS = ["table", "rows", "csv", "json"]


def csv_list(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def int_list(value: str, flag: str) -> list[int]:
    try:
        levels = [int(v) for v in csv_list(value)]
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


def plugin_manager() -> Any:
    from capbench_core.contract.registry import get_plugin_manager

    return get_plugin_manager()


def plain(value: str) -> Any:
    from rich.text import Text

    return Text(value)


def make_console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


def print_fit(console: Any, table: Any, wrap: tuple[str, ...] = ()) -> None:
    from capbench_core.render.report import print_fit

    print_fit(console, table, wrap)
def sigterm_as_interrupt() -> None:
    def handler(signum: int, frame: Any) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def progress_reporter(console: Any) -> Any:
    from capbench_core.measure.progress import TerminalReporter

    return TerminalReporter(console)

def install_progress(reporter: Any, name: str) -> Any:
    return lambda i, n, step: reporter.phase(f"{name} [{i + 1}/{n}] {step.label} (about {duration(step.estimate_s)})")


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def format_peak(value: float | None, unit: str) -> str:
    return "unknown" if value is None else f"{value:g} {unit}"


def show_results(console: Any, results: list[Any], fmt: str) -> None:
    from capbench_core.render.report import print_results, results_csv, results_json

    if fmt == "json":
        click.echo(json.dumps(results_json(results), indent=2))
    elif fmt == "csv":
        click.echo(results_csv(results), nl=False)
    else:
        print_results(console, results, fmt)



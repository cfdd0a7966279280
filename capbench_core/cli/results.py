"""`capbench compare`: stored runs as CAP tables, or under a peer's definitions."""

from __future__ import annotations

import click

from capbench_core.cli.root import (
    DB_OPTION,
    FORMATS,
    cli,
    make_console,
    show_results,
)
from capbench_core.errors import CapbenchError


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
@click.option("--convention", default=None, metavar="NAME",
              help="Recompute stored runs under a peer's definitions: TTFT/TPOT/ITL from the raw timestamps "
                   "(vllm, sglang, guidellm, llmperf; capbench: its own), or S-MBU/S-MFU from the stored decode "
                   "steps as MoE-CAP computes them, beside capbench's (moe-cap).")
def compare(db_url: str | None, model: str | None, backend: str | None, task: str | None, hardware: str | None,
            limit: int, fmt: str, as_json: bool, as_csv: bool, convention: str | None) -> None:
    """Show stored runs as CAP tables, one table per (hardware, model, task, workload)."""
    from capbench_core.analytics.conventions import CONVENTIONS, recompute
    from capbench_core.analytics.moecap import compare_row
    from capbench_core.errors import find_name
    from capbench_core.render.report import print_convention, print_moe_cap
    from capbench_core.store import Store

    if as_json and as_csv:
        raise CapbenchError("give --json or --csv, not both")
    fmt = "json" if as_json else "csv" if as_csv else fmt
    if convention is not None:
        convention = find_name("convention", convention, [*CONVENTIONS, "moe-cap"])
    store = Store(db_url)
    results = list(reversed(store.runs(model=model, backend=backend, task=task, limit=limit, hardware=hardware)))
    if convention == "moe-cap":
        print_moe_cap(make_console(), [compare_row(r) for r in results], fmt == "json")
        return
    if convention:
        print_convention(make_console(), results, [recompute(r, convention) for r in results], convention,
                         fmt == "json")
        return
    if not results and fmt in ("table", "rows"):
        click.echo(f"no runs stored in {store.url} yet: try `capbench run`")
        return
    show_results(make_console(), results, fmt)

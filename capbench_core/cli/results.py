"""`capbench compare`: stored runs as CAP tables, under a peer's definitions, or their routing; `capbench show`:
one run."""

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
@click.option("--json", "fmt", flag_value="json", help="Same as --format json.")
@click.option("--csv", "fmt", flag_value="csv", help="Same as --format csv.")
@click.option("--convention", default=None, metavar="NAME",
              help="Recompute stored runs under a peer's definitions: TTFT/TPOT/ITL from the raw timestamps "
                   "(vllm, sglang, guidellm, llmperf; capbench: its own), or S-MBU/S-MFU from the stored decode "
                   "steps as MoE-CAP computes them, beside capbench's (moe-cap).")
@click.option("--routing", type=click.Choice(["contiguous", "round-robin"]), is_flag=False,
              flag_value="contiguous", default=None,
              help="Per-expert routing of the rows that measured it: imbalance, hot experts, EP tax (experts placed "
                   "on EP ranks contiguously, or round-robin), side by side across tasks.")
@click.option("--pareto", is_flag=True, help="Each backend's frontier of output tokens/s per device against "
                                              "tokens/s per user, with $/Mtok and accuracy.")
def compare(db_url: str | None, model: str | None, backend: str | None, task: str | None, hardware: str | None,
            limit: int, fmt: str, convention: str | None, routing: str | None, pareto: bool) -> None:
    """Show stored runs as CAP tables, one table per (hardware, model, task, workload)."""
    from capbench_core.analytics.conventions import CONVENTIONS, recompute
    from capbench_core.analytics.moecap import compare_row
    from capbench_core.errors import find_name
    from capbench_core.render.report import print_convention, print_moe_cap
    from capbench_core.store import Store

    if convention is not None:
        convention = find_name("convention", convention, [*CONVENTIONS, "moe-cap"])
    store = Store(db_url, create=False)
    results = list(reversed(store.runs(model=model, backend=backend, task=task, limit=limit, hardware=hardware)))
    if pareto:
        from capbench_core.render.report import print_pareto

        print_pareto(make_console(), results, fmt == "json")
        return
    if routing:
        from capbench_core.render.report import print_routing_compare

        print_routing_compare(make_console(), results, routing, fmt == "json")
        return
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


@cli.command()
@click.argument("run_id")
@DB_OPTION
@click.option("--routing", is_flag=True, help="The run's routing: worst layers and hottest experts.")
@click.option("--json", "as_json", is_flag=True, help="The stored result as JSON.")
def show(run_id: str, db_url: str | None, routing: bool, as_json: bool) -> None:
    """One stored run: every field (`--json`), or its routing summary (`--routing`)."""
    from capbench_core.render.report import print_routing_run
    from capbench_core.store import Store

    store = Store(db_url, create=False)
    found = store.get(run_id) or next((r for r in store.runs(limit=100000) if r.run_id.startswith(run_id)), None)
    if found is None:
        raise CapbenchError(f"no run {run_id!r} in {store.url} (`capbench compare` lists the stored runs)")
    if as_json:
        click.echo(found.model_dump_json(indent=1))
    elif routing:
        print_routing_run(make_console(), found)
    else:
        show_results(make_console(), [found], "rows")

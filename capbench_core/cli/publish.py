"""Publishing: `capbench export`, `verify`, `keys` and `db` (import, trust, upgrade)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from capbench_core.cli.root import (
    DB_OPTION,
    cli,
    plugin_manager,
)
from capbench_core.errors import CapbenchError, printable


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
    from capbench_core.publish import bundle, signing
    from capbench_core.store import Store

    key = signing.load_private(key_path) if key_path else None

    if export_all == bool(run_ids):
        raise CapbenchError("name the runs to export (RUN_ID...) or pass --all; `capbench compare --json` "
                            "lists run ids")
    if not out.parent.is_dir():
        raise CapbenchError(f"cannot write {printable(str(out))}: directory {printable(str(out.parent))} does not "
                            f"exist (create it first)")
    store = Store(db_url, create=False)
    if export_all:
        results = list(reversed(store.runs()))
    else:
        results = []
        for run_id in run_ids:
            found = store.get(run_id)
            if found is None:
                raise CapbenchError(f"no run {printable(run_id)!r} in {store.url}: `capbench compare --json` lists "
                                    f"run ids")
            results.append(found)
    if not results:
        raise CapbenchError(f"no runs stored in {store.url} yet: nothing to export")
    bundle.write(results, out, key)
    signed = f", signed by {signing.public_key_text(key)}" if key is not None else ""
    click.echo(f"wrote {len(results)} run(s) to {out}{signed}")


CAP_OPTIONS = [
    click.option("--max-bundle-mb", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MB",
                 help="Refuse a bundle larger than this (default 256; env CAPBENCH_MAX_BUNDLE_MB)."),
    click.option("--max-runs", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Refuse a bundle of more runs than this (default 1000; env CAPBENCH_MAX_BUNDLE_RUNS)."),
]


def cap_options(command: Any) -> Any:
    for option in reversed(CAP_OPTIONS):
        command = option(command)
    return command


def _echo_rejected(error: Exception) -> None:
    for line in str(error).splitlines():
        click.echo(f"rejected {printable(line)}", err=True)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@cap_options
def verify(files: tuple[Path, ...], max_bundle_mb: float | None, max_runs: int | None) -> None:
    """Check result bundles as `capbench db import` would, without a database: size, schema, hashes, signature,
    and every figure re-derived from each run's raw records. Exits 1 when any file would be rejected."""
    import time

    from capbench_core.publish import bundle, limits

    caps = limits.Limits.of(max_bundle_mb, max_runs)
    tasks = dict(plugin_manager().tasks.items())
    bad = 0
    for path in files:
        t0 = time.perf_counter()
        try:
            found = bundle.read(path, tasks, caps)
        except bundle.Rejected as exc:
            bad += 1
            _echo_rejected(exc)
            continue
        signed = f"signed by {found.signed_by}" if found.signed_by else "unsigned"
        reported = sorted({k for r in found.results for k in r.metrics.unverified})
        click.echo(f"{printable(str(path))}: ok — {len(found.results)} run(s) re-derived from their records in "
                   f"{time.perf_counter() - t0:.2f} s; {signed}; reported, not verified: "
                   f"{', '.join(reported) or 'nothing'}")
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

    from capbench_core.publish import signing

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
@click.option("--create", is_flag=True, help="Create the database named by --db when it does not exist.")
@cap_options
def import_bundles(files: tuple[Path, ...], db_url: str | None, require_signature: bool, create: bool,
                   max_bundle_mb: float | None, max_runs: int | None) -> None:
    """Validate result bundles, re-derive every figure from each run's own records, and add their runs
    once; a bad file changes nothing, and when no file passes the database is not even opened.

    Exits 1 when any file was rejected (the others are still imported).
    """
    from capbench_core.publish import bundle, limits
    from capbench_core.store import Store

    caps = limits.Limits.of(max_bundle_mb, max_runs)
    report = bundle.ImportReport()
    accepted = bundle.read_all(list(files), dict(plugin_manager().tasks.items()), caps, report)
    if accepted:
        bundle.add_all(Store(db_url, create=create), accepted, report, require_signature)
    for rejected in report.rejected:
        _echo_rejected(rejected)
    for conflict in report.conflicts:
        click.echo(f"conflict {printable(conflict)}", err=True)
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
    from capbench_core.publish import signing
    from capbench_core.store import Store

    key = signing.read_public(public_key)
    if not name.isprintable():
        raise CapbenchError(f"--name {printable(name)!r} must be printable text (one line, no control characters)")
    Store(db_url).trust(key, name)
    click.echo(f"trusted {key} as {name!r}")


@db.command("init")
@DB_OPTION
def init_db(db_url: str | None) -> None:
    """Create a results database (or migrate an existing one) at --db: the one command besides `capbench run`
    and `db upgrade` that makes a new database where none is."""
    from capbench_core.store import Store

    store = Store(db_url, create=True)
    click.echo(f"{store.url}: ready, schema current ({store.count()} runs)")


@db.command("upgrade")
@DB_OPTION
def upgrade_db(db_url: str | None) -> None:
    """Migrate the database to the newest schema (every command does this on open; this does only that)."""
    from capbench_core.store import Store

    store = Store(db_url)
    click.echo(f"{store.url}: schema is current ({store.count()} runs)")



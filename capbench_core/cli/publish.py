"""Publishing: `capbench export`, `verify`, `keys` and `db` (import, trust, upgrade)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from capbench_core.cli.root import (
    DB_OPTION,
    cli,
    plugin_manager,
)
from capbench_core.errors import CapbenchError


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

    from capbench_core.publish import bundle

    tasks = dict(plugin_manager().tasks.items())
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
def import_bundles(files: tuple[Path, ...], db_url: str | None, require_signature: bool) -> None:
    """Validate result bundles, re-derive every figure from each run's own records, and add their runs
    once; a bad file changes nothing.

    Exits 1 when any file was rejected (the others are still imported).
    """
    from capbench_core.publish import bundle
    from capbench_core.store import Store

    report = bundle.import_files(Store(db_url), list(files), dict(plugin_manager().tasks.items()), require_signature)
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
    from capbench_core.publish import signing
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



"""capbench_leaderboard: renders the static CAP leaderboard from the results database.

Registers `capbench leaderboard build` and `capbench leaderboard serve` through the
same `register_commands` hook any plugin uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from capbench_core import hookimpl
from capbench_core.errors import CapbenchError


@click.group()
def leaderboard() -> None:
    """Build the static CAP leaderboard site and look at it locally."""


@leaderboard.command("build")
@click.option("--db", "db_url", default=None, envvar="CAPBENCH_DB", help="Results database URL.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the site (replaced atomically when the build succeeds).")
def build(db_url: str | None, out: Path) -> None:
    """Render every stored run into a self-contained static site, grouped by hardware fingerprint."""
    from capbench_core.store import Store
    from capbench_leaderboard import site

    store = Store(db_url)
    results = store.runs()
    summary = site.build(results, out, store.studies("sparsity"), store.provenance(), store.studies("placement"))
    click.echo(f"built {summary.out}: {summary.groups} hardware group(s), {summary.runs} run(s); "
               f"open {summary.out / 'index.html'} or run `capbench leaderboard serve --dir {out}`")


@leaderboard.command("serve")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="A directory made by `capbench leaderboard build`.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free).")
def serve(directory: Path, port: int) -> None:
    """Serve the site on http://127.0.0.1:PORT (loopback only) until Ctrl-C."""
    import functools
    import http.server

    if not (directory / "index.html").exists():
        raise CapbenchError(f"{directory} has no index.html: build it with `capbench leaderboard build --out "
                            f"{directory}`")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    try:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise CapbenchError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror} (try --port 0)") from None
    click.echo(f"serving {directory} on http://127.0.0.1:{httpd.server_address[1]}/ (Ctrl-C stops)", err=True)
    with httpd:
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass


@hookimpl
def register_commands(cli: Any) -> None:
    cli.add_command(leaderboard)

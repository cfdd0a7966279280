"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temp data dir, loopback only.

PostgreSQL refuses to run as root, so under root the server runs as the `postgres`
user that Debian's package creates. `.ci/run` installs the package; on a machine
without it the PostgreSQL tests are skipped with the command that installs it
(and fail under CI=true, where skipping would hide a gap).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = "apt-get install -y postgresql (or run .ci/run, which installs it)"


def bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(found[0]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server() -> Iterator[str]:
    """Start a server; yields the admin URL (user `capbench`, trust auth on 127.0.0.1)."""
    bins = bindir()
    if bins is None:
        raise FileNotFoundError(f"PostgreSQL is not installed: {INSTALL_HINT}")
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="capbench-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if as_root:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    port = _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, timeout=120)

    pg(str(bins / "initdb"), "-D", str(data), "-U", "capbench", "-A", "trust", "--no-sync", "-E", "UTF8")
    pg(str(bins / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "start", "-o",
       f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200")
    try:
        yield f"postgresql+psycopg://capbench@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bins / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def new_database(admin_url: str) -> str:
    """A fresh, empty database on the server; returns its SQLAlchemy URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"

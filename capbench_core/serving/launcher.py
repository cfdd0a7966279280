"""Start an engine's server command and always tear it down.

The command runs in its own process group (``start_new_session``) with stdout
and stderr streamed to a log file kept with the run. Readiness is polled over
HTTP; a start-up failure quotes the command and the last log lines. On exit —
normal, exception, Ctrl-C or SIGTERM (which the CLI turns into
KeyboardInterrupt) — the whole group gets SIGTERM, then SIGKILL after a grace
period, so no engine process survives capbench.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from capbench_core.errors import CapbenchError
from capbench_core.measure import progress


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it if capbench itself dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_log_dir() -> Path:
    """Where engine logs are kept (one file per launch), in the user data directory."""
    from platformdirs import user_data_dir

    path = Path(user_data_dir("capbench")) / "logs" / time.strftime("%Y-%m-%d")
    path.mkdir(parents=True, exist_ok=True)
    return path


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass
class Server:
    """A launched engine: its process, base URL and log file."""

    argv: list[str]
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    @property
    def pgid(self) -> int:
        return self.process.pid


def _ready(url: str, timeout: float) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(server: Server, health_paths: Sequence[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise CapbenchError(
                f"engine exited with code {code} during start-up.\ncommand: {shlex.join(server.argv)}\n"
                f"last log lines ({server.log_path}):\n{tail(server.log_path)}")
        if any(_ready(server.base_url + p, 2.0) for p in health_paths):
            return
        time.sleep(0.25)
    raise CapbenchError(
        f"engine did not become ready within {timeout_s:.0f} s (polled {', '.join(health_paths)}).\n"
        f"command: {shlex.join(server.argv)}\nlast log lines ({server.log_path}):\n{tail(server.log_path)}")


def stop(server: Server, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pgid, sig)
        except ProcessLookupError:
            break
        try:
            server.process.wait(timeout=grace_s)
            _reap_group(server.pgid, grace_s)
            break
        except subprocess.TimeoutExpired:
            continue


def _reap_group(pgid: int, wait_s: float) -> None:
    """Wait until no process of the group is left (children may outlive the leader)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def launch(argv: Sequence[str], base_url: str, log_path: Path, health_paths: Sequence[str] = ("/health",),
           timeout_s: float = 300.0, env: dict[str, str] | None = None, label: str = "engine") -> Iterator[Server]:
    """Run ``argv`` until the block ends; the process group is always torn down.

    Start-up is shown as a phase with elapsed time (engines take from seconds to minutes)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env={**os.environ, **(env or {})},
                                       preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        except OSError as exc:
            raise CapbenchError(f"cannot start {shlex.join(argv)}: {exc.strerror}") from None
    server = Server(list(argv), process, base_url, log_path)
    try:
        with progress.waiting(f"{label}: starting the engine (log: {log_path})"):
            wait_ready(server, health_paths, timeout_s)
        yield server
    finally:
        stop(server)

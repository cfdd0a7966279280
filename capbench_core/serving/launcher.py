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
import re
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
from capbench_core.measure.workers import die_with_parent


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


#: words that mark an engine's own error line in its log
ERROR_MARKS = re.compile(r"\berror\b|exception|out of memory|killed|not supported|unrecognized|no such file|"
                         r"aborted|segmentation fault", re.IGNORECASE)
#: a Python exception line (``RuntimeError: ...``), anywhere in a log line
EXCEPTION = re.compile(r"\b[A-Z]\w*(Error|Exception): \S")
#: a log record's own prefix (vLLM's ``(Worker pid=1) ERROR 12-05 08:07:58 [file.py:12] ``)
PREFIX = re.compile(r"^(\(\w+ pid=\d+\) )?(\w+ )?(\d\d-\d\d \d\d:\d\d:\d\d )?(\[[^\]]*\] )?")
#: exception lines that only point elsewhere
WRAPPERS = ("See stack trace", "EngineDeadError", "WARNING")
#: llama.cpp's error-level log lines (``0.00.278.101 E llama_model_load: error loading model: ...``)
GGML_ERROR = re.compile(r"^\d+\.\d+\.\d+\.\d+ E (.+)$")


def found_error(path: Path) -> str | None:
    """The engine's own error in its log, None when it names none: the first Python exception line (the root
    cause; later ones are its consequences), else llama.cpp's first error-level line, else the first line that
    names an error (an argparse ``error:``, llama.cpp's in-process ``error loading model: ...``)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    causes = [line for line in lines if EXCEPTION.search(line) and not any(w in line for w in WRAPPERS)]
    if causes:
        return PREFIX.sub("", causes[0])[:500]
    ggml = [m.group(1) for m in map(GGML_ERROR.match, lines) if m]
    if ggml:
        return ggml[0][:500]
    marked = [line for line in lines if ERROR_MARKS.search(line) and "WARNING" not in line
              and not line.startswith(("File \"", "Traceback"))]
    return PREFIX.sub("", marked[0])[:500] if marked else None


def error_line(path: Path) -> str:
    """The engine's own error in its log (``found_error``), else its last line."""
    found = found_error(path)
    if found is not None:
        return found
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return (lines or ["(empty log)"])[-1][:500]


def oom_kills() -> int | None:
    """The kernel's OOM-kill count for this cgroup (v2 memory.events, v1 memory.oom_control), None if unreadable."""
    for path, key in (("/sys/fs/cgroup/memory.events", "oom_kill"),
                      ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill")):
        try:
            for line in Path(path).read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def exit_cause(code: int, ooms_before: int | None, logged_error: bool) -> str:
    """`code 2`, or the signal: `killed by the kernel's OOM killer` when the cgroup's OOM count rose, `out of
    memory?` for a SIGKILL that neither the kernel's counters nor the engine's own log explain."""
    if code >= 0:
        return f"code {code}"
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
    after = oom_kills()
    if -code == signal.SIGKILL and ooms_before is not None and after is not None and after > ooms_before:
        return f"{name}: killed by the kernel's OOM killer (out of memory)"
    if -code == signal.SIGKILL and not logged_error:
        return f"{name} (killed; out of memory?)"
    return name


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
    ooms_at_start: int | None = None

    def died(self, when: str = "") -> str | None:
        """One sentence when the engine has exited: how (and ``when``), and its own last error line; None while
        it runs."""
        code = self.process.poll()
        if code is None:
            return None
        cause = exit_cause(code, self.ooms_at_start, found_error(self.log_path) is not None)
        return (f"engine exited with {cause}{' ' + when if when else ''}: {error_line(self.log_path)} "
                f"(command: {shlex.join(self.argv)}; log: {self.log_path})")

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
        died = server.died("during start-up")
        if died is not None:
            raise CapbenchError(died)
        if any(_ready(server.base_url + p, 2.0) for p in health_paths):
            return
        time.sleep(0.25)
    raise CapbenchError(
        f"engine did not become ready within {timeout_s:.0f} s (polled {', '.join(health_paths)}); its last log "
        f"line: {error_line(server.log_path)} (command: {shlex.join(server.argv)}; log: {server.log_path})")


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
                                       preexec_fn=die_with_parent if sys.platform == "linux" else None)
        except OSError as exc:
            raise CapbenchError(f"cannot start {shlex.join(argv)}: {exc.strerror}") from None
    server = Server(list(argv), process, base_url, log_path, oom_kills())
    try:
        with progress.waiting(f"{label}: starting the engine (log: {log_path})"):
            wait_ready(server, health_paths, timeout_s)
        yield server
    finally:
        stop(server)

"""Helpers for tests that drive real engines: find their processes, run capbench in the background,
wait for what it prints (events, never fixed sleeps), and interrupt it."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from capbench_core.contract import engine_env
from tests.conftest import CAPBENCH, SESSION_VAR, default_sigint, missing

# What an engine process looks like in /proc/PID/cmdline: its launch command, or the titles its workers set.
ENGINE_MARKS = (b"vllm.entrypoints", b"VLLM::", b"sglang.launch_server", b"sglang::", b"llama-server",
                b"llama_cpp.server")


def engine_pids() -> dict[int, str]:
    """Engine processes started by this test session: marked by their command line (or run from an engine
    environment) and carrying the session's CAPBENCH_TEST_SESSION in their environment, so an engine or an
    install running beside the tests is never taken for one of ours."""
    home = str(engine_env.engines_dir()).encode()
    mark = f"{SESSION_VAR}={os.environ[SESSION_VAR]}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip()
            if not cmd or not (any(m in cmd for m in ENGINE_MARKS) or cmd.startswith(home)):
                continue
            if mark not in (proc / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        found[int(proc.name)] = cmd.decode(errors="replace")[:200]
    return found


def wait_gone(before: dict[int, str], timeout_s: float = 60) -> dict[int, str]:
    """Wait until no engine process that was not there before remains; returns the ones left."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = {p: c for p, c in engine_pids().items() if p not in before}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def require_engine(name: str) -> None:
    """Skip here, fail under CI (where README command 2 installs every engine environment)."""
    if engine_env.installed(name) is None:
        missing(f"the {name} engine environment is not installed: run `capbench engines install {name}`")


class Background:
    """`capbench ARGS` running in the background; its stdout lines are read as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([CAPBENCH, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "COLUMNS": "200", **(env or {})}, preexec_fn=default_sigint)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout_s: float) -> str:
        """Block until a line containing ``text`` is printed (an event: a phase started, a row stored)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"capbench exited ({self.proc.wait()}) before printing {text!r}:\n"
                                     + "".join(self.lines))
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"capbench printed no {text!r} within {timeout_s:.0f} s:\n" + "".join(self.lines))

    def finish(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout=timeout_s)
        while (line := self._queue.get()) is not None:
            self.lines.append(line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def background(*args: str, env: dict[str, str] | None = None) -> Iterator[Background]:
    """Run capbench in the background; it is killed (with its engines, by the launcher's death signal)
    when the block ends, also when the test fails."""
    run = Background(*args, env=env)
    try:
        yield run
    finally:
        run.kill()


def stored(db_url: str) -> list[dict[str, Any]]:
    """Every run in the database, full JSON, oldest first."""
    from sqlalchemy import create_engine, text

    with create_engine(db_url).connect() as conn:
        rows = conn.execute(text("select result_json from runs order by started_at")).scalars().all()
    return [json.loads(r) for r in rows]

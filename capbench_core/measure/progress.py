"""What long work tells the user while it runs.

A :class:`Reporter` receives phases — counted (a bar: requests of a load level)
or open-ended (a line with elapsed time: an engine starting, a package
installing) — and notes. The CLI installs a :class:`TerminalReporter`; code deep
in the stack (the launcher, the engine installer) reaches the current one with
:func:`current`, so plugins need no reporter argument.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any


class Reporter:
    """Silent by default (library use, tests); the CLI's reporter draws."""

    def phase(self, label: str, total: int | None = None) -> Callable[[], None]:
        """Start a phase of ``total`` items (None: open-ended); returns the function that ticks one item."""
        return lambda: None

    def end_phase(self, failed: bool = False) -> None:
        """End the current phase; ``failed`` when it ended by an error or an interrupt."""

    def note(self, text: str) -> None:
        pass


_current: ContextVar[Reporter | None] = ContextVar("capbench_reporter", default=None)
_SILENT = Reporter()


def current() -> Reporter:
    return _current.get() or _SILENT


@contextmanager
def using(reporter: Reporter) -> Iterator[Reporter]:
    """Make ``reporter`` the current one for the block."""
    token = _current.set(reporter)
    try:
        yield reporter
    finally:
        _current.reset(token)


@contextmanager
def waiting(label: str) -> Iterator[None]:
    """An open-ended phase around a block (an engine starting, a build)."""
    reporter = current()
    reporter.phase(label)
    try:
        yield
    except BaseException:
        reporter.end_phase(failed=True)
        raise
    reporter.end_phase()


PLAIN_EVERY_S = 10.0  # in a pipe, a long phase prints its count this often


class TerminalReporter(Reporter):
    """On a terminal: one transient live line (bar or spinner, elapsed time). In a pipe or a CI log:
    a plain line when a phase starts (and when a counted one ends), no colour codes, no redraw residue."""

    def __init__(self, console: Any):
        self.console = console
        self._progress: Any = None
        self._label = ""
        self._started = 0.0
        self._done = 0
        self._total: int | None = None
        self._last_line = 0.0

    def phase(self, label: str, total: int | None = None) -> Callable[[], None]:
        self.end_phase()
        self._label, self._started, self._done, self._total = label, time.monotonic(), 0, total
        self._last_line = self._started
        if not self.console.is_terminal:
            self._plain(f"{label}…" if total is None else f"{label} (0/{total})…")
            return self._count
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = ([TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()] if total is not None
                   else [SpinnerColumn(), TextColumn("{task.description}")])
        self._progress = Progress(*columns, TimeElapsedColumn(), console=self.console, transient=True)
        self._progress.start()
        task = self._progress.add_task(label, total=total)
        progress = self._progress

        def tick() -> None:
            self._done += 1
            progress.advance(task)

        return tick

    def _count(self) -> None:
        """In a pipe: a `done/total` line when a phase has run PLAIN_EVERY_S since the last one (a CI log
        shows a long phase moving; a short one prints only its start and end)."""
        self._done += 1
        now = time.monotonic()
        if self._total and now - self._last_line >= PLAIN_EVERY_S and self._done < self._total:
            self._last_line = now
            self._plain(f"{self._label}: {self._done}/{self._total}")

    def end_phase(self, failed: bool = False) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        elif self._label and not self.console.is_terminal and (self._done or self._total is None or failed):
            took = time.monotonic() - self._started
            if self._total is not None:
                self._plain(f"{self._label}: {self._done}/{self._total} done, stopped after {took:.1f} s" if failed
                            else f"{self._label}: {self._done} done in {took:.1f} s")
            else:
                label = self._label.split(" (")[0].rstrip("…")
                self._plain(f"{label}: failed after {took:.1f} s" if failed else f"{label}: done in {took:.1f} s")
        self._label, self._done = "", 0

    def note(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text(text, style="yellow"))

    def _plain(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text(text, style="dim"))

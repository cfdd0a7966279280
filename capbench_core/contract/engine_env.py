"""The engine-environment contract: how a plugin describes installing its engine (``Recipe``, its
``Step``s, the ``Context`` they run in) and where installed environments live (``home``, ``installed``).

capbench installs each serving engine into its own virtualenv (or build) under
the user data directory, ``engines/NAME/``, never into capbench's own
environment; ``capbench_core.serving.environments`` runs the recipes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from capbench_core.errors import CapbenchError

EngineDevice = Literal["cpu", "cuda"]
MARKER = "engine.json"
#: The CPU build of torch every CPU engine environment is held to (pip finds it on PyPI or a local wheel).
TORCH_CPU_PIN = "torch==2.13.0"


def engines_dir() -> Path:
    """``<user data dir>/engines`` (``CAPBENCH_ENGINES_DIR`` overrides it, e.g. for a shared cache)."""
    override = os.environ.get("CAPBENCH_ENGINES_DIR")
    if override:
        return Path(override)
    from platformdirs import user_data_dir

    return Path(user_data_dir("capbench")) / "engines"


@dataclass(frozen=True)
class Installed:
    """What ``engine.json`` records about an installed environment."""

    name: str
    package: str
    version: str
    executable: str
    device: EngineDevice
    variant: str
    installed_at: str
    install_s: float
    details: dict[str, Any] = field(default_factory=dict)


class StepFailed(CapbenchError):
    """A step of a recipe failed; the message carries the command and its last output lines."""


@dataclass
class Context:
    """What a recipe's steps work with: the environment directory, its log, and helpers to run commands."""

    home: Path
    log: Path
    device: EngineDevice
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def python(self) -> Path:
        return self.home / "bin" / "python"

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None,
            with_stderr: bool = False) -> str:
        """Run a command with its output appended to the install log; its stdout (and, with
        ``with_stderr``, its stderr) is returned."""
        with open(self.log, "a") as log:
            log.write(f"\n$ {shlex.join(argv)}\n")
            log.flush()
            try:
                proc = subprocess.run(list(argv), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT if with_stderr else log, stdin=subprocess.DEVNULL,
                                      text=True, cwd=cwd, env={**os.environ, **(env or {})})
            except OSError as exc:
                raise StepFailed(f"cannot run `{shlex.join(argv)}`: {exc.strerror}") from None
            log.write(proc.stdout)
        if proc.returncode != 0:
            raise StepFailed(f"`{shlex.join(argv)}` exited with code {proc.returncode}; last lines of "
                             f"{self.log}:\n{_tail(self.log, 15)}")
        return proc.stdout

    def pip(self, *args: str, env: Mapping[str, str] | None = None, python: str | None = None) -> str:
        """pip of this environment (or of ``python``: e.g. capbench's own, only to download a source)."""
        return self.run([python or str(self.python), "-m", "pip", "--disable-pip-version-check", *args], env=env)

    def venv(self) -> None:
        self.run([_base_python(), "-m", "venv", str(self.home)])


@dataclass(frozen=True)
class Step:
    """One part of a recipe: a label, the time it took on 2 cores with a cold pip cache, and the work."""

    label: str
    estimate_s: float
    run: Callable[[Context], object]


def venv_steps(device: EngineDevice) -> list[Step]:
    """The first steps of every Python engine: its virtualenv and, for CPU builds, the CPU torch pin
    installed first (so nothing the engine asks for pulls a CUDA build)."""
    steps = [Step("create the virtualenv", 5, lambda c: c.venv())]
    if device == "cpu":
        steps.append(Step(f"install {TORCH_CPU_PIN} (CPU build)", 40, lambda c: c.pip("install", TORCH_CPU_PIN)))
    return steps


class Recipe:
    """How to install one engine for a device, and how to tell what got installed.

    Subclasses give ``name``, the packages per device, ``steps(device)`` and
    ``check(ctx)`` (returns (package, version, variant) of what now runs).
    """

    name: str = ""
    description: str = ""
    #: Environment variable that points at a user's own interpreter (or binary) instead of this environment.
    override_env: str = ""
    #: The backend option that does the same for one run.
    override_option: str = "python"
    packages: dict[EngineDevice, str] = {}

    def steps(self, device: EngineDevice) -> list[Step]:
        raise NotImplementedError

    def check(self, ctx: Context) -> tuple[str, str, str]:
        raise NotImplementedError

    def executable(self, home: Path) -> Path:
        """What the backend launches from an installed environment (default: its Python)."""
        return home / "bin" / "python"

    def estimate_s(self, device: EngineDevice) -> float:
        return sum(s.estimate_s for s in self.steps(device))


def _base_python() -> str:
    """The interpreter new virtualenvs are made from: capbench's own Python's base installation."""
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def home(name: str) -> Path:
    return engines_dir() / name.replace("/", "_")


def installed(name: str) -> Installed | None:
    """The marker of an installed environment, or None (missing, half-installed, or unreadable)."""
    marker = home(name) / MARKER
    try:
        data = json.loads(marker.read_text())
        return Installed(**data)
    except (OSError, ValueError, TypeError):
        return None


def log_path(name: str) -> Path:
    return engines_dir() / f"{name.replace('/', '_')}.install.log"



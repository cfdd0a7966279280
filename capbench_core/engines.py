"""Engine environments: each serving engine in its own virtualenv (or build), never in capbench's.

Engines pin their own stacks (vLLM's CPU build pins transformers, setuptools
and numba; SGLang would replace torch with a CUDA build), so capbench installs
each one under the user data directory, ``engines/NAME/``, launches it with
that environment's Python (or binaries), and records in every result which
package, version, variant and interpreter served the run.

An environment counts as installed only once its recipe ran to the end and
the engine answered a check: then ``engine.json`` is written. A failed or
interrupted install removes the directory, so nothing half-installed is ever
taken for installed. Recipes live with their backends (``capbench_vllm``,
``capbench_sglang``, ``capbench_llamacpp``); this module runs them.

A user's own installation is used instead with ``--backend-option
NAME:python=/path/to/bin/python`` or the environment variable the recipe
names (``CAPBENCH_VLLM_PYTHON``...).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from capbench_core.errors import CapbenchError

Device = Literal["cpu", "cuda"]
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


def this_device() -> Device:
    """cuda when NVML sees an NVIDIA GPU, else cpu: what `install` builds for."""
    from capbench_hw.nvidia import probe_nvidia

    return "cuda" if probe_nvidia() else "cpu"


@dataclass(frozen=True)
class Installed:
    """What ``engine.json`` records about an installed environment."""

    name: str
    package: str
    version: str
    executable: str
    device: Device
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
    device: Device
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


def venv_steps(device: Device) -> list[Step]:
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
    packages: dict[Device, str] = {}

    def steps(self, device: Device) -> list[Step]:
        raise NotImplementedError

    def check(self, ctx: Context) -> tuple[str, str, str]:
        raise NotImplementedError

    def executable(self, home: Path) -> Path:
        """What the backend launches from an installed environment (default: its Python)."""
        return home / "bin" / "python"

    def estimate_s(self, device: Device) -> float:
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


Progress = Callable[[int, int, Step], Any]


def install(recipe: Recipe, device: Device, on_step: Progress | None = None, force: bool = False) -> Installed:
    """Run ``recipe`` into ``engines/NAME``; on any failure or interrupt the directory is removed.

    ``on_step(index, total, step)`` is called before each step (a progress display).
    """
    target = home(recipe.name)
    if installed(recipe.name) and not force:
        found = installed(recipe.name)
        assert found is not None
        return found
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    log = log_path(recipe.name)
    log.write_text(f"capbench engines install {recipe.name} ({device}) at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    ctx = Context(target, log, device)
    steps = recipe.steps(device)
    t0 = time.monotonic()
    try:
        for i, step in enumerate(steps):
            if on_step is not None:
                on_step(i, len(steps), step)
            step.run(ctx)
        package, version, variant = recipe.check(ctx)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    record = Installed(name=recipe.name, package=package, version=version,
                       executable=str(recipe.executable(target)), device=device,
                       variant=variant, installed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       install_s=round(time.monotonic() - t0, 1), details=ctx.details)
    (target / MARKER).write_text(json.dumps(asdict(record), indent=2))
    return record


def remove(name: str) -> bool:
    """Delete an environment (installed or half-installed); False when there was none."""
    target = home(name)
    if not target.exists():
        return False
    shutil.rmtree(target)
    return True


@dataclass(frozen=True)
class Resolved:
    """Where an engine will be launched from, and what it is."""

    executable: str
    package: str
    version: str
    device: Device
    variant: str
    origin: str   # "environment", "option python=", "$CAPBENCH_..."

    def record(self) -> dict[str, str]:
        """The fields every result keeps about the engine's installation."""
        return {"executable": self.executable, "package": self.package, "package_version": self.version,
                "engine_device": self.device, "variant": self.variant, "installed_from": self.origin}


def resolve(recipe: Recipe, options: Mapping[str, Any], probe: Callable[[str], Resolved | str]) -> Resolved | str:
    """The engine to launch: ``python=`` option, then the recipe's environment variable, then the
    installed environment. A string is the one-sentence reason there is none (or it is unusable)."""
    explicit = str(options.get("python") or "")
    origin = "option python="
    if not explicit and recipe.override_env and os.environ.get(recipe.override_env):
        explicit, origin = os.environ[recipe.override_env], f"${recipe.override_env}"
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            return f"{origin}{explicit} is not an executable file"
        found = probe(explicit)
        return found if isinstance(found, str) else Resolved(**{**asdict(found), "origin": origin + explicit})
    record = installed(recipe.name)
    if record is None:
        return (f"{recipe.name}'s environment is not installed: run `capbench engines install {recipe.name}` "
                f"(or point {recipe.override_env} at your own)")
    return Resolved(str(recipe.executable(home(recipe.name))), record.package, record.version, record.device,
                    record.variant, f"environment {home(recipe.name)}")


def python_package(python: str, distributions: Sequence[str]) -> tuple[str, str] | None:
    """(distribution, version) of the first of ``distributions`` installed for ``python``, or None."""
    code = ("import importlib.metadata as m, sys\n"
            f"for d in {list(distributions)!r}:\n"
            "    try:\n        print(d, m.version(d)); sys.exit(0)\n"
            "    except m.PackageNotFoundError:\n        pass\n")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.stdout.split()
    return (words[0], words[1]) if out.returncode == 0 and len(words) == 2 else None


@dataclass
class Row:
    """One line of `capbench engines list`."""

    name: str
    description: str
    package: str
    device: Device
    installed: bool
    version: str | None
    executable: str | None
    variant: str | None
    home: str
    estimate_min: float


def listing(recipes: Sequence[Recipe], device: Device) -> Iterator[Row]:
    for recipe in recipes:
        record = installed(recipe.name)
        dev = record.device if record else device
        yield Row(recipe.name, recipe.description, record.package if record else recipe.packages.get(device, "—"),
                  dev, record is not None, record.version if record else None,
                  str(recipe.executable(home(recipe.name))) if record else None,
                  record.variant if record else None, str(home(recipe.name)),
                  round(recipe.estimate_s(device) / 60, 1))

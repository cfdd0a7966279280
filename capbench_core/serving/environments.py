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
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from capbench_core.contract.engine_env import (
    MARKER,
    Context,
    EngineDevice,
    Installed,
    Recipe,
    Step,
    home,
    installed,
    log_path,
)
from capbench_core.errors import CapbenchError


def this_device() -> EngineDevice:
    """cuda when NVML sees an NVIDIA GPU, else cpu: what `install` builds for."""
    from capbench_core.measure.nvml import probe_nvidia

    return "cuda" if probe_nvidia() else "cpu"


Progress = Callable[[int, int, Step], Any]


def install(recipe: Recipe, device: EngineDevice, on_step: Progress | None = None, force: bool = False) -> Installed:
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
    device: EngineDevice
    variant: str
    origin: str   # "environment", "option python=", "$CAPBENCH_..."

    def record(self) -> dict[str, str]:
        """The fields every result keeps about the engine's installation."""
        return {"executable": self.executable, "package": self.package, "package_version": self.version,
                "engine_device": self.device, "variant": self.variant, "installed_from": self.origin}


class EngineUnavailable(CapbenchError):
    """The engine cannot be launched from here; the message says why in one sentence, and what to do."""


def resolve(recipe: Recipe, options: Mapping[str, Any], probe: Callable[[str], Resolved]) -> Resolved:
    """The engine to launch: the recipe's override option (``python=``, or llama.cpp's ``server_binary=``),
    then its environment variable, then the installed environment. EngineUnavailable says why there is
    none, or why the one named is unusable."""
    explicit = str(options.get(recipe.override_option) or "")
    origin = f"option {recipe.override_option}="
    if not explicit and recipe.override_env and os.environ.get(recipe.override_env):
        explicit, origin = os.environ[recipe.override_env], f"${recipe.override_env}"
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise EngineUnavailable(f"{origin}{explicit} is not an executable file")
        found = probe(explicit)
        return Resolved(**{**asdict(found), "origin": origin + explicit})
    record = installed(recipe.name)
    if record is None:
        raise EngineUnavailable(f"{recipe.name}'s environment is not installed: run `capbench engines install "
                                f"{recipe.name}` (or point {recipe.override_env} at your own)")
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
    device: EngineDevice
    installed: bool
    version: str | None
    executable: str | None
    variant: str | None
    home: str
    estimate_min: float


def listing(recipes: Sequence[Recipe], device: EngineDevice) -> Iterator[Row]:
    for recipe in recipes:
        record = installed(recipe.name)
        dev = record.device if record else device
        yield Row(recipe.name, recipe.description, record.package if record else recipe.packages.get(device, "—"),
                  dev, record is not None, record.version if record else None,
                  str(recipe.executable(home(recipe.name))) if record else None,
                  record.variant if record else None, str(home(recipe.name)),
                  round(recipe.estimate_s(device) / 60, 1))

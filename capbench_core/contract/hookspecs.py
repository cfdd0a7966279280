"""Every capbench hook, in one place. The docstring of each hook is its spec.

A plugin is a module (or object) with functions marked `@hookimpl` whose names
match the specs below, registered under the entry point group ``capbench``::

    # pyproject.toml of capbench-foo
    [project.entry-points.capbench]
    foo = "capbench_foo"

    # capbench_foo/__init__.py
    from capbench_core import hookimpl

    @hookimpl
    def register_backends(register):
        register.add_backend(FooBackend())

Built-in plugins (``plugins/``) use exactly this mechanism.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from capbench_core.contract.records import RunResult
    from capbench_core.contract.registries import (
        BackendRegistry,
        EngineRegistry,
        HardwareRegistry,
        ModelRegistry,
        TaskRegistry,
    )

PROJECT = "capbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: BackendRegistry) -> None:
    """Add serving backends.

    Call ``register.add_backend(backend)`` once per backend. ``backend`` follows
    the :class:`capbench_core.contract.backend.Backend` protocol: a unique ``name``,
    ``available()`` (cheap; imports nothing heavy at module level) and
    ``start(model, hardware, options)`` returning a context manager that
    yields a :class:`~capbench_core.contract.backend.Session`.
    Called once when the plugin manager loads; a name already registered by
    another plugin is an error naming both plugins.
    """


@hookspec
def register_engines(register: EngineRegistry) -> None:
    """Add engine environments: how to install an engine in its own virtualenv (or build).

    Call ``register.add_engine(recipe)`` with a subclass of
    :class:`capbench_core.contract.engine_env.Recipe`: a unique ``name`` (what a user types in
    ``capbench engines install NAME``), the package per device, the install
    ``steps(device)`` and ``check(ctx)``, which proves the engine runs and says
    what was installed. A backend that launches from it names it in
    ``Backend.engine_env``.
    """


@hookspec
def register_hardware_probes(register: HardwareRegistry) -> None:
    """Add probes that detect devices on this machine.

    Call ``register.add_probe(name, probe)`` where ``probe()`` returns a list of
    :class:`capbench_core.measure.hardware.Device` (empty when its kind of device is
    absent). Probes must not raise for a missing driver: return ``[]``.
    """


@hookspec
def register_tasks(register: TaskRegistry) -> None:
    """Add workloads and accuracy tasks.

    Call ``register.add_task(task)`` with an object following
    :class:`capbench_core.contract.task.Task`: a unique ``name``, a one-line
    ``description``, and ``build(model, options)`` returning a
    :class:`~capbench_core.contract.task.Workload` (requests plus an optional scorer).
    """


@hookspec
def register_models(register: ModelRegistry) -> None:
    """Add named models, such as the embedded tiny MoE.

    Call ``register.add_model(ModelRef(...))``. Names registered here can be
    passed to ``capbench run --model`` and ``capbench model inspect``.
    ``register.add_builder(builder)`` adds a random-init checkpoint builder,
    ``builder(config, out_dir) -> checkpoint dir`` (seeded random weights for
    the given ``config.json`` fields): the sparsity study builds its members
    with the first one registered.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add CLI subcommands.

    ``cli`` is a ``CommandRegistry`` over the root group: call
    ``cli.add_command(command)``, or ``cli.add_command(command, group="model")``
    to add to one of its groups (an unknown group is an error naming the
    groups). Import heavy modules inside the command body so ``capbench
    --help`` stays fast.
    """


@hookspec
def run_started(run: dict[str, Any]) -> None:
    """Observe the start of one run (one backend x model x task x concurrency).

    ``run`` holds ``run_id``, ``backend``, ``model``, ``task``,
    ``concurrency`` and ``rate_rps`` (None for a closed-loop level).
    Exceptions raised here are reported and ignored.
    """


@hookspec
def run_finished(result: RunResult) -> None:
    """Observe a finished run (complete, partial or failed) after it is stored.

    Use it for exporters and notifiers. Exceptions raised here are reported and
    ignored; they never change the stored result.
    """

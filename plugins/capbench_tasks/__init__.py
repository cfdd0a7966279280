"""Built-in tasks: `arith` (the tiny MoE's scored task) and `random` (synthetic lengths)."""

from __future__ import annotations

from capbench_core import hookimpl
from capbench_core.plugins import TaskRegistry


@hookimpl
def register_tasks(register: TaskRegistry) -> None:
    from capbench_tasks.tasks import ArithTask, RandomTask

    register.add_task(ArithTask())
    register.add_task(RandomTask())

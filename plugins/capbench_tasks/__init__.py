"""Built-in tasks: `arith` (the tiny MoE's task), `random` (synthetic lengths), and the
file-based accuracy tasks `gsm8k` and `mmlu` (`--task gsm8k --data FILE`), and
`lm-eval:<task>`, lm-evaluation-harness run against the measured server; `trace` (a replayed Mooncake
trace) and `chat-sessions` (multi-turn conversations)."""

from __future__ import annotations

from capbench_core import hookimpl
from capbench_core.contract.registry import TaskRegistry


@hookimpl
def register_tasks(register: TaskRegistry) -> None:
    from capbench_tasks.files import GSM8KTask, MMLUTask
    from capbench_tasks.lm_eval_bridge import LmEvalTask
    from capbench_tasks.tasks import ArithTask, RandomTask
    from capbench_tasks.workloads import ChatSessionsTask, TraceTask

    for task in (ArithTask(), RandomTask(), GSM8KTask(), MMLUTask(), LmEvalTask(), TraceTask(), ChatSessionsTask()):
        register.add_task(task)

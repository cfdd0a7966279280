"""Workloads (request sets) and tasks (a workload plus an optional scorer)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from capbench_core.contract.backend import ModelRef, Request
from capbench_core.errors import CapbenchError


@dataclass(frozen=True)
class Scored:
    """How a task scores: the primary metric and its judge (text, expected) -> correct, plus
    any further metrics reported beside it (GSM8K's flexible extract next to its strict match)."""

    metric: str
    judge: Callable[[str, str], bool]
    extra: dict[str, Callable[[str, str], bool]] = field(default_factory=dict)


@dataclass
class Workload:
    """Requests in order, with the expected answer of each when the task is scored."""

    task: str
    requests: list[Request]
    expected: dict[str, str] = field(default_factory=dict)
    scoring: Scored | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def hash(self) -> str:
        """sha256 over prompts, lengths and sampling: equal hashes mean the same workload."""
        items = [{"prompt": r.prompt, "max_tokens": r.max_tokens, "ignore_eos": r.ignore_eos,
                  "sampling": asdict(r.sampling), **({"chat": True} if r.chat else {}),
                  **({"at_s": r.at_s} if r.at_s is not None else {}),
                  **({"session": r.session, "turn": r.turn} if r.session else {})} for r in self.requests]
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]

    def score(self, request_id: str, text: str) -> dict[str, bool] | None:
        """Every metric's verdict for one output, the primary metric first."""
        if self.scoring is None or request_id not in self.expected:
            return None
        expected = self.expected[request_id]
        verdicts = {self.scoring.metric: self.scoring.judge(text, expected)}
        verdicts.update((name, judge(text, expected)) for name, judge in self.scoring.extra.items())
        return verdicts


class Task:
    """Base class of every task: a workload builder, optionally with an outside scorer.

    Subclasses set ``name`` and ``description`` and implement ``build``. The
    other members are optional capabilities (docs/plugins.md lists them).
    """

    name: str = ""
    description: str = ""
    #: Scored by an outside harness against the served endpoint (``evaluate``), not per request.
    scores_externally: bool = False
    #: Its prompts read as user messages: ``--chat`` (task option ``chat=true``) sends them through the model's
    #: chat template.
    supports_chat: bool = False

    def build(self, model: ModelRef, num_requests: int, options: Mapping[str, Any]) -> Workload:
        """Make ``num_requests`` requests; options come from ``--task-option k=v``."""
        raise NotImplementedError

    def warmup_requests(self, model: ModelRef, count: int, options: Mapping[str, Any]) -> list[Request] | None:
        """Warm-up requests that share nothing with the measured ones (so they cannot warm a prefix cache
        for them); None: the first ``count`` requests ``build`` makes are the warm-up (their prompts are
        distinct from the rest already)."""
        return None

    def variant(self, name: str) -> Task:
        """The task ``family:name`` (``lm-eval:gsm8k``) for a task family; plain tasks have none."""
        raise CapbenchError(f"task '{self.name}' has no variants, so '{self.name}:{name}' does not exist")

    def evaluate(self, base_url: str, served_model: str, model: ModelRef,
                 options: Mapping[str, Any]) -> tuple[dict[str, float], int]:
        """With ``scores_externally``: score the server at ``base_url``; (metric -> score, samples scored)."""
        raise NotImplementedError



def build_workload(task: Task, model: ModelRef, num_requests: int, warmup: int,
                   options: Mapping[str, Any]) -> Workload:
    """The warm-up requests then the measured ones: the task's own warm-up set when it has one (a trace or
    conversations, whose measured prompts share prefixes), else the first of what it builds. The runner and
    the verifier build a run's workload this one way."""
    warm = task.warmup_requests(model, warmup, options) if warmup else None
    if warm is None:
        return task.build(model, num_requests + warmup, options)
    workload = task.build(model, num_requests, options)
    workload.requests = [*warm[:warmup], *workload.requests]
    return workload

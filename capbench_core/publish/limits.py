"""What a bundle file may be before anything in it is believed: its size and run count, how deep its JSON
nests, how large its integers are, that every number is finite and every name printable text.

Each limit refuses in one line, with the path of the offending value where there is one. The two caps are
the maintainer's to raise: ``CAPBENCH_MAX_BUNDLE_MB`` and ``CAPBENCH_MAX_BUNDLE_RUNS``, or ``--max-bundle-mb``
and ``--max-runs`` on `capbench verify` and `capbench db import` (docs/leaderboard.md).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capbench_core.errors import CapbenchError

MAX_BUNDLE_MB = 256.0
MAX_RUNS = 1000
#: A result nests about 10 levels (a model config's sub-dicts included); a bundle adds 3.
MAX_DEPTH = 64
INT64_MAX = 2**63 - 1
#: Longer digit strings are refused while parsing, before Python builds the number.
MAX_INT_DIGITS = 40
#: Text an engine or a model produced: anything goes (it is stored and shown as JSON, never in a table).
RAW_TEXT = ("output_text", "error")
#: Free-form settings and configs: any sign (a llama.cpp ``n_gpu_layers`` of -1, a vLLM ``top_k`` of -1).
FREE_FORM = ("model.config", "config", "engine.launch_args", "hardware.devices.*.details", "workload.params",
             "workload.sampling")
#: Explanations, which may run over lines: newlines and tabs, no other control character.
PROSE = ("status_reason", "note", "notes", "analytics_note", "mem_method", "cost_model", "method", "forced",
         "expert_activation_method", "source", "detail", "unverified", "variant")
#: Why a negative value cannot be, where a field says more than "must not be negative".
NEGATIVE_MEANS = {"chunk_offsets_ns": "a chunk arrived before its request was sent",
                  "sent_ns": "a request sent before the run's clock started", "step_ns": "a step that took no time",
                  "prompt_tokens": "a count", "output_tokens": "a count", "chunk_tokens": "a count"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class Limits:
    """How large a bundle may be, in bytes and in runs."""

    max_bytes: int
    max_runs: int

    @classmethod
    def of(cls, max_mb: float | None = None, max_runs: int | None = None) -> Limits:
        """The caps given, else ``CAPBENCH_MAX_BUNDLE_MB`` / ``CAPBENCH_MAX_BUNDLE_RUNS``, else 256 MB and 1000."""
        mb = max_mb if max_mb is not None else _env("CAPBENCH_MAX_BUNDLE_MB", MAX_BUNDLE_MB)
        runs = max_runs if max_runs is not None else max(1, int(_env("CAPBENCH_MAX_BUNDLE_RUNS", MAX_RUNS)))
        return cls(int(mb * 1e6), runs)


def _env(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise CapbenchError(f"{name}={text!r} must be a number above 0")
    return value


class Refused(ValueError):
    """A value no bundle may hold: where it is (a dotted path, '' for the file) and why."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}" if where else reason)
        self.where, self.reason = where, reason


def read_text(path: Path, limits: Limits) -> str:
    """The file's text, refused before it is read whole when it is larger than the cap or not a regular file
    (a FIFO or /dev/zero would never end)."""
    if not path.exists():
        raise Refused("", "no such file")
    if not path.is_file():
        raise Refused("", "not a regular file")
    try:
        with path.open("rb") as handle:
            data = handle.read(limits.max_bytes + 1)
    except OSError as exc:
        raise Refused("", f"cannot read it: {exc.strerror}") from None
    if len(data) > limits.max_bytes:
        raise Refused("", f"larger than {limits.max_bytes / 1e6:g} MB, the most a bundle may be (a maintainer "
                          f"raises it with --max-bundle-mb or CAPBENCH_MAX_BUNDLE_MB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused("", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise Refused("", f"an integer of {len(digits.lstrip('-'))} digits; the store takes 64-bit integers")
    return int(digits)


def load_json(text: str) -> Any:
    """Parse bundle JSON: one line for what is not JSON, nests too deep, or holds an oversized integer. NaN and
    Infinity parse, as Python's reader does, and are refused with their path by ``scan``."""
    try:
        doc = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise Refused("", f"JSON nested deeper than the reader takes; a bundle nests at most {MAX_DEPTH} "
                          f"levels") from None
    except json.JSONDecodeError as exc:
        raise Refused("", f"not valid JSON (truncated?): {exc.msg} at line {exc.lineno} column {exc.colno}") \
            from None
    if _depth(doc) > MAX_DEPTH:
        raise Refused("", f"JSON nested more than {MAX_DEPTH} levels deep; a bundle nests at most {MAX_DEPTH}")
    return doc


def _depth(doc: Any) -> int:
    """Nesting depth, without recursion (the document is not trusted yet); stops counting past ``MAX_DEPTH``."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _matches(path: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """Whether ``path`` (list indices removed) lies under one of the dotted patterns (``*``: any key)."""
    for pattern in patterns:
        parts = pattern.split(".")
        if len(path) >= len(parts) and all(p in ("*", q) for p, q in zip(parts, path)):
            return True
    return False


def scan(result: Any) -> Iterator[Refused]:
    """Every value of one result (JSON-level or a ``model_dump()``) that no run can hold: a non-finite
    number, an integer beyond 64 bits, a negative number outside the free-form settings, a name (a key, or a
    label shown in tables) that is not printable text, control characters in an explanation. Iterative."""
    stack: list[tuple[Any, tuple[str, ...], tuple[str | int, ...]]] = [(result, (), ())]
    while stack:
        node, keys, where = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if not str(key).isprintable():
                    yield Refused(_show(where), f"key {str(key)!r} is not printable text")
                stack.append((child, (*keys, str(key)), (*where, key)))
        elif isinstance(node, list):
            stack.extend((child, keys, (*where, i)) for i, child in enumerate(node))
        else:
            problem = _problem(node, keys)
            if problem:
                yield Refused(_show(where), problem)


def _problem(value: Any, keys: tuple[str, ...]) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"a number must be finite, not {value}"
    if isinstance(value, int) and abs(value) > INT64_MAX:
        return f"{value} does not fit in 64 bits"
    if isinstance(value, (int, float)) and value < 0 and not _matches(keys, FREE_FORM):
        means = NEGATIVE_MEANS.get(keys[-1] if keys else "")
        return f"must not be negative ({value})" + (f": {means}" if means else "")
    if isinstance(value, str):
        return _text_problem(value, keys)
    return None


def _text_problem(value: str, keys: tuple[str, ...]) -> str | None:
    if keys and keys[-1] in RAW_TEXT:
        return None
    if keys and (keys[-1] in PROSE or _matches(keys, FREE_FORM) or (len(keys) > 1 and keys[-2] in PROSE)):
        bad = _CONTROL.search(value)
        return f"control character {bad.group()!r} in text" if bad else None
    return None if value.isprintable() else f"{value[:60]!r} is not printable text (a name is one line, no " \
                                                   f"control characters)"


def _show(where: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in where) or "(top level)"

"""What the verifier reports: one ``Finding`` per field of a run that does not hold, and how two figures are
compared (equal up to float rounding)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from capbench_core.contract.records import Metrics

REL_TOL = 1e-9
ABS_TOL = 1e-9


@dataclass(frozen=True)
class Finding:
    """One field of one run that does not hold: what the run states and what it should be."""

    field: str
    stated: Any
    expected: Any
    reason: str = ""

    def line(self, run_index: int) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"runs.{run_index}.{self.field}: stated {show(self.stated)}, recomputed {show(self.expected)}{why}"


def show(value: Any) -> str:
    """A value as a finding prints it: floats to 9 digits, everything else as its repr (control characters
    escaped, so a forged name cannot draw on the terminal)."""
    text = f"{value:.9g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 200 else f"{text[:200]}…"


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def compare(prefix: str, stated: Metrics, derived: Metrics, fields: tuple[str, ...],
            reason: str = "") -> Iterator[Finding]:
    """A finding for each of ``fields`` that the two records do not share."""
    for name in fields:
        a, b = getattr(stated, name), getattr(derived, name)
        if not same(a, b):
            yield Finding(f"{prefix}.{name}", a, b, reason)

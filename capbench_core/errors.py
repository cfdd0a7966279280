"""One error family for everything a user can act on."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CapbenchError(Exception):
    """An error with a message that says what was wrong and what to do.

    The CLI prints it as one line (no traceback unless --debug).
    """


def unknown_name(kind: str, name: str, known: Iterable[str]) -> CapbenchError:
    """`unknown backend 'vlm' — did you mean 'vllm'? Available: a, b`."""
    choices = sorted(known)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    listing = ", ".join(choices) if choices else "(none)"
    return CapbenchError(f"unknown {kind} '{name}'{hint} Available: {listing}")

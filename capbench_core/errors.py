"""One error family for everything a user can act on."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CapbenchError(Exception):
    """An error with a message that says what was wrong and what to do.

    The CLI prints it as one line (no traceback unless --debug).
    """


def printable(text: str) -> str:
    """``text`` with every character that is not printable escaped (``\\x1b``, ``\\n``): a name read from a
    file or a database cannot move the cursor or draw a fake line on the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def unknown_name(kind: str, name: str, known: Iterable[str], candidates: Iterable[str] = ()) -> CapbenchError:
    """`unknown backend 'vlm' — did you mean 'vllm'? Available: a, b` (``candidates``: the ones to suggest)."""
    choices = sorted(known)
    close = list(candidates) or difflib.get_close_matches(name, choices, n=3)
    hint = f" — did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    listing = ", ".join(choices) if choices else "(none)"
    return CapbenchError(f"unknown {kind} '{name}'{hint} Available: {listing}")


def _folded(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _parts(choice: str) -> tuple[str, ...]:
    """What a typed prefix may start: the whole name, or the part after a `source:` qualifier
    (`h100` for `runpod:h100-sxm`)."""
    return (choice, choice.rsplit(":", 1)[-1]) if ":" in choice else (choice,)


def find_name(kind: str, name: str, known: Iterable[str]) -> str:
    """The known name a user meant: exact, else the same ignoring case, spaces and punctuation, else the
    only one it is a prefix of, whole or after a `source:` qualifier (`h100 sxm`, `torch`, `tiny`, `b200`).
    Several prefixes, or none: an error that suggests the candidates."""
    choices = list(known)
    if name in choices:
        return name
    folded = _folded(name)
    same = [c for c in choices if _folded(c) == folded]
    if len(same) == 1:
        return same[0]
    prefixed = [c for c in choices if folded and any(_folded(part).startswith(folded) for part in _parts(c))]
    if len(prefixed) == 1:
        return prefixed[0]
    raise unknown_name(kind, name, choices, sorted(prefixed))

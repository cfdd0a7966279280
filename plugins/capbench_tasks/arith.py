"""Multi-digit addition: the embedded tiny MoE's own task.

Problems are `a+b=` with 0 <= a, b <= 999 and the answer is the decimal sum.
A fixed hash splits every (a, b) pair into train (90 %) and held-out (10 %),
so training never sees a problem the task scores on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


def is_held_out(a: int, b: int) -> bool:
    """Deterministic 10 % split that does not depend on any RNG state."""
    return ((a * 1_000_003 + b) * 2_654_435_761) % 2**32 % 10 == 0


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer(a: int, b: int) -> str:
    return str(a + b)


def _operand(rng: random.Random) -> int:
    digits = rng.randint(1, 3)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def problems(seed: int, held_out: bool) -> Iterator[tuple[int, int]]:
    """An endless, seeded stream of (a, b) pairs from one side of the split."""
    rng = random.Random(seed)
    while True:
        a, b = _operand(rng), _operand(rng)
        if is_held_out(a, b) == held_out:
            yield a, b

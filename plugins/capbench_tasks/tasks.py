"""Task objects: build a Workload for a model."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from capbench_core.contract.backend import ModelRef, Request, SamplingParams
from capbench_core.contract.task import Scored, Task, Workload
from capbench_core.errors import CapbenchError
from capbench_tasks import arith


def _int_option(options: Mapping[str, Any], key: str, default: int, minimum: int = 0) -> int:
    raw = options.get(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise CapbenchError(f"task option {key}={raw!r} must be an integer") from None
    if value < minimum:
        raise CapbenchError(f"task option {key}={value} must be >= {minimum}")
    return value


def exact_match(text: str, expected: str) -> bool:
    return text.strip() == expected.strip()


class ArithTask(Task):
    """Held-out multi-digit addition (`a+b=`), greedy, scored by exact match."""

    name = "arith"
    description = "multi-digit addition on held-out problems, exact match (the tiny MoE's task)"

    def build(self, model: ModelRef, num_requests: int, options: Mapping[str, Any]) -> Workload:
        seed = _int_option(options, "seed", 0)
        max_tokens = _int_option(options, "max_tokens", 8, 1)
        pairs = [p for p, _ in zip(arith.problems(10_000 + seed, held_out=True), range(num_requests))]
        requests, expected = [], {}
        for i, (a, b) in enumerate(pairs):
            rid = f"arith-{i}"
            requests.append(Request(id=rid, prompt=arith.prompt(a, b), max_tokens=max_tokens,
                                    sampling=SamplingParams()))
            expected[rid] = arith.answer(a, b)
        return Workload(self.name, requests, expected, Scored("exact_match", exact_match),
                        {"seed": seed, "max_tokens": max_tokens})


class RandomTask(Task):
    """Synthetic prompts of random digits (one token per digit on digit-splitting tokenizers);
    output length forced with ignore_eos. Lengths are uniform in [len*(1-range), len*(1+range)]."""

    name = "random"
    description = "synthetic random prompts, seeded; input/output lengths set by task options"
    supports_chat = True

    def build(self, model: ModelRef, num_requests: int, options: Mapping[str, Any]) -> Workload:
        seed = _int_option(options, "seed", 0)
        input_len = _int_option(options, "input_len", 16, 1)
        output_len = _int_option(options, "output_len", 32, 1)
        spread = float(options.get("range_ratio", 0.0))
        if not 0.0 <= spread < 1.0:
            raise CapbenchError(f"task option range_ratio={spread} must be in [0, 1)")
        rng = random.Random(seed)

        def length(center: int) -> int:
            return max(1, rng.randint(int(center * (1 - spread)), int(center * (1 + spread))))

        requests = [
            Request(id=f"random-{i}", prompt="".join(rng.choice("0123456789") for _ in range(length(input_len))),
                    max_tokens=length(output_len), ignore_eos=True, sampling=SamplingParams())
            for i in range(num_requests)]
        return Workload(self.name, requests, params={"seed": seed, "input_len": input_len,
                                                     "output_len": output_len, "range_ratio": spread})

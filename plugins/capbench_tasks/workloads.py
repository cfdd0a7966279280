"""Workloads shaped like production traffic: a replayed request trace (Mooncake's JSONL format) and
multi-turn conversations whose turns reuse the conversation's prefix.

Mooncake's trace format (one JSON object per line): ``timestamp`` (ms since the trace's start),
``input_length`` and ``output_length`` (tokens) and ``hash_ids``: one id per block of ``block_tokens``
prompt tokens (512 in Mooncake's traces; a trace may say its own in a ``block_tokens`` field on each line, as
the generator here does), equal ids meaning an identical block — so two requests whose
``hash_ids`` start alike share that prefix. Prompts are built from the ids deterministically (one digit per
token on digit-splitting tokenizers), so shared blocks are identical text.

    python -m capbench_tasks.workloads --out trace.jsonl --requests 200 --rate 4   # write a trace
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capbench_core.contract.backend import ModelRef, Request, SamplingParams
from capbench_core.contract.task import Task, Workload
from capbench_core.errors import CapbenchError
from capbench_tasks.files import read_rows
from capbench_tasks.tasks import _int_option

#: Mooncake's block size: tokens per hash id
MOONCAKE_BLOCK_TOKENS = 512
#: the shipped sample's block size (prompts of 12-40 tokens: a few blocks each, so prefixes share partly)
SAMPLE_BLOCK_TOKENS = 8
#: the trace shipped with capbench (written by ``generate_trace``, sized for the tiny MoE's 64-token context)
SAMPLE_TRACE = Path(__file__).parent / "data" / "trace-sample.jsonl"
TRACE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def _float_option(options: Mapping[str, Any], key: str, default: float) -> float:
    raw = options.get(key, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise CapbenchError(f"task option {key}={raw!r} must be a number") from None
    if not math.isfinite(value) or value <= 0:
        raise CapbenchError(f"task option {key}={raw!r} must be a finite number > 0")
    return value


def block_text(hash_id: int, tokens: int) -> str:
    """The text of one block: ``tokens`` digits, the same for the same id."""
    rng = random.Random(f"capbench-block-{hash_id}")
    return "".join(rng.choice("0123456789") for _ in range(tokens))


def trace_prompt(hash_ids: Sequence[int], length: int, block_tokens: int) -> str:
    """``length`` tokens made of the blocks named by ``hash_ids`` in order (the last one cut short)."""
    text = "".join(block_text(h, block_tokens) for h in hash_ids)
    if len(text) < length:
        raise CapbenchError(f"a trace line asks for {length} prompt tokens but its {len(hash_ids)} hash ids cover "
                            f"only {len(text)} at block_tokens={block_tokens}")
    return text[:length]


def shared_prefixes(rows: Sequence[Mapping[str, Any]], block_tokens: int) -> list[int]:
    """For each row, the most prompt tokens it shares with an earlier row: leading hash ids in common, at most
    either prompt's length (the prefix cache's ceiling, counted in whole and last partial blocks)."""
    out = []
    for i, row in enumerate(rows):
        best = 0
        for earlier in rows[:i]:
            common = 0
            for a, b in zip(row["hash_ids"], earlier["hash_ids"]):
                if a != b:
                    break
                common += 1
            best = max(best, min(common * block_tokens, int(row["input_length"]), int(earlier["input_length"])))
        out.append(best)
    return out


class TraceTask(Task):
    """Replays a trace at its own times: Mooncake JSONL (``--data FILE``; the shipped sample without it)."""

    name = "trace"
    description = ("replay a request trace at its timestamps (Mooncake JSONL: timestamp, input_length, "
                   "output_length, hash_ids; options speedup, block_tokens)")

    def build(self, model: ModelRef, num_requests: int, options: Mapping[str, Any]) -> Workload:
        path = Path(str(options.get("data") or SAMPLE_TRACE))
        speedup = _float_option(options, "speedup", 1.0)
        rows = sorted(read_rows(path, TRACE_FIELDS, self.name), key=lambda r: float(r["timestamp"]))[:num_requests]
        stated = {int(r["block_tokens"]) for r in rows if "block_tokens" in r}
        if len(stated) > 1:
            raise CapbenchError(f"trace: {path} states several block sizes ({sorted(stated)}); one per trace")
        block = _int_option(options, "block_tokens", stated.pop() if stated else MOONCAKE_BLOCK_TOKENS, 1)
        for i, row in enumerate(rows):
            if not isinstance(row["hash_ids"], list) or int(row["input_length"]) < 1 or int(row["output_length"]) < 1:
                raise CapbenchError(f"trace: {path} line {i + 1}: hash_ids must be a list and the lengths >= 1")
        shared = shared_prefixes(rows, block)
        start = float(rows[0]["timestamp"]) if rows else 0.0
        requests = [Request(id=f"trace-{i}", prompt=trace_prompt(row["hash_ids"], int(row["input_length"]), block),
                            max_tokens=int(row["output_length"]), ignore_eos=True, sampling=SamplingParams(),
                            at_s=(float(row["timestamp"]) - start) / 1000 / speedup, shared_prefix_tokens=n)
                    for i, (row, n) in enumerate(zip(rows, shared))]
        return Workload(self.name, requests, params={"data": str(path), "block_tokens": block, "speedup": speedup,
                                                     "rows": len(rows)})

    def warmup_requests(self, model: ModelRef, count: int, options: Mapping[str, Any]) -> list[Request]:
        return distinct_warmup(count, 16, 8)


def distinct_warmup(count: int, prompt_len: int, output_len: int) -> list[Request]:
    """Warm-up requests that share no prefix with any workload's prompts (they start with a letter)."""
    rng = random.Random("capbench-warmup")
    return [Request(id=f"warmup-{i}", prompt="w" + "".join(rng.choice("0123456789") for _ in range(prompt_len - 1)),
                    max_tokens=output_len, ignore_eos=True, sampling=SamplingParams()) for i in range(count)]


class ChatSessionsTask(Task):
    """Conversations of several turns; turn k+1 sends turns 1..k with the model's real replies, then its own
    message. From ``--data FILE`` (JSONL: ``{"turns": ["message", ...]}``) or generated (options sessions,
    turns, message_len, output_len, seed)."""

    name = "chat-sessions"
    description = ("multi-turn conversations, each turn sent with the history and the model's real replies "
                   "(--data FILE of {\"turns\": [...]}, or generated)")

    def build(self, model: ModelRef, num_requests: int, options: Mapping[str, Any]) -> Workload:
        output_len = _int_option(options, "output_len", 6, 1)
        talks = self._conversations(num_requests, options)
        requests: list[Request] = []
        for s, turns in enumerate(talks):
            for k, message in enumerate(turns, start=1):
                if len(requests) == num_requests:
                    break
                requests.append(Request(id=f"chat-{s}-t{k}", prompt=message, max_tokens=output_len,
                                        ignore_eos=True, sampling=SamplingParams(), session=f"chat-{s}", turn=k))
        return Workload(self.name, requests, params={"output_len": output_len, "sessions": len(talks),
                                                     **({"data": str(options["data"])} if options.get("data")
                                                        else {"turns": _int_option(options, "turns", 3, 1)})})

    @staticmethod
    def _conversations(num_requests: int, options: Mapping[str, Any]) -> list[list[str]]:
        if options.get("data"):
            rows = read_rows(Path(str(options["data"])), ("turns",), "chat-sessions")
            bad = next((i for i, r in enumerate(rows) if not isinstance(r["turns"], list) or not r["turns"]), None)
            if bad is not None:
                raise CapbenchError(f"chat-sessions: {options['data']} row {bad + 1}: turns must be a non-empty "
                                    f"list of messages")
            return [[str(t) for t in r["turns"]] for r in rows]
        turns = _int_option(options, "turns", 3, 1)
        length = _int_option(options, "message_len", 6, 1)
        rng = random.Random(_int_option(options, "seed", 0))
        sessions = math.ceil(num_requests / turns)
        return [["".join(rng.choice("0123456789") for _ in range(length)) for _ in range(turns)]
                for _ in range(sessions)]

    def warmup_requests(self, model: ModelRef, count: int, options: Mapping[str, Any]) -> list[Request]:
        return distinct_warmup(count, 8, _int_option(options, "output_len", 6, 1))


def generate_trace(requests: int, rate_rps: float, input_len: int, output_len: int, block_tokens: int,
                   prefixes: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """A trace in Mooncake's format: Poisson arrivals at ``rate_rps``; each request starts with one of
    ``prefixes`` shared prefixes (half its blocks, like a system prompt or a document asked about again),
    then blocks of its own; lengths uniform in [input_len/2, 3 input_len/2]."""
    rng = random.Random(seed)
    t, rows, fresh = 0.0, [], prefixes * 1000
    shared = [[p * 1000 + b for b in range(64)] for p in range(prefixes)]
    for _ in range(requests):
        length = rng.randint(max(1, input_len // 2), input_len * 3 // 2)
        blocks = math.ceil(length / block_tokens)
        own = blocks - blocks // 2
        ids = shared[rng.randrange(prefixes)][:blocks // 2] + list(range(fresh, fresh + own))
        fresh += own
        rows.append({"timestamp": round(t * 1000), "input_length": length, "output_length": output_len,
                     "hash_ids": ids, "block_tokens": block_tokens})
        t += rng.expovariate(rate_rps)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capbench_tasks.workloads",
                                     description="Write a request trace in Mooncake's JSONL format.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second")
    parser.add_argument("--input-len", type=int, default=24)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--block-tokens", type=int, default=SAMPLE_BLOCK_TOKENS,
                        help="tokens per hash id (replay with --task-option block_tokens=N)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = generate_trace(args.requests, args.rate, args.input_len, args.output_len, args.block_tokens, seed=args.seed)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()

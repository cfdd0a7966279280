"""Accuracy tasks on local files, scored the way lm-evaluation-harness scores them.

`gsm8k`: rows with `question` and `answer` (the answer ends with `#### N`, as in
GSM8K). Prompt `Question: ...\\nAnswer:`; few-shot examples are the file's own
`train` rows (a `split` field), `num_fewshot` of them (default 5, or as many
train rows as the file has). Metrics: `strict_match` (the number after `#### ` in the output)
and `flexible_extract` (the last number in the output), both compared after
removing `,`, `$` and a trailing `.` — lm-eval's gsm8k filters.

`mmlu`: rows with `question`, `choices` (4 strings, or fields `A`..`D`) and
`answer` (index 0-3 or a letter); optional `subject`. Prompt in lm-eval's MMLU
form ending in `Answer:`; the metric `letter_choice` takes the first A-D letter
the model writes.

Files are JSONL, JSON (a list) or Parquet (needs pyarrow); rows without a
`split`, or with `split: test`, are the evaluation set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capbench_core.contract.backend import ModelRef, Request, SamplingParams
from capbench_core.contract.task import Scored, Task, Workload
from capbench_core.errors import CapbenchError

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LETTERS = "ABCD"


def read_rows(path: Path, required: tuple[str, ...], task: str) -> list[dict[str, Any]]:
    """Rows of a JSONL/JSON/Parquet file, with errors naming the file and the expected fields."""
    if not path.is_file():
        raise CapbenchError(f"{task}: data file {path} does not exist (give it with --data FILE)")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CapbenchError(f"{task}: reading {path} needs pyarrow (pip install pyarrow), or use JSONL") from None
        rows: list[Any] = pq.read_table(str(path)).to_pylist()
    else:
        text = path.read_text()
        try:
            rows = json.loads(text) if path.suffix == ".json" else [
                json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise CapbenchError(f"{task}: {path} is not valid JSON lines ({exc.msg}, line {exc.lineno})") from None
    if not rows:
        raise CapbenchError(f"{task}: {path} has no rows; expected fields: {', '.join(required)}")
    for i, row in enumerate(rows):
        missing = [f for f in required if not isinstance(row, dict) or f not in row]
        if missing:
            raise CapbenchError(f"{task}: {path} row {i + 1} lacks {', '.join(missing)}; "
                                f"expected fields: {', '.join(required)}")
    return rows


def split(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train = [r for r in rows if r.get("split") == "train"]
    test = [r for r in rows if r.get("split", "test") != "train"]
    return train, test


def _normalise(number: str) -> str:
    return re.sub(r"\.$", "", number.replace(",", "").replace("$", "").strip())


def gsm8k_target(answer: str) -> str:
    match = STRICT.search(answer)
    return _normalise(match.group(1)) if match else _normalise(answer)


def strict_match(text: str, expected: str) -> bool:
    match = STRICT.search(text)
    return bool(match) and _normalise(match.group(1)) == expected  # type: ignore[union-attr]


def flexible_extract(text: str, expected: str) -> bool:
    found = FLEXIBLE.findall(text)
    if not found:
        return False
    last = found[-1][0] or found[-1][1]
    return _normalise(last) == expected


def _options(options: Mapping[str, Any], train: list[dict[str, Any]]) -> tuple[int, int]:
    shots = int(options.get("num_fewshot", min(5, len(train))))
    if shots > len(train):
        raise CapbenchError(f"num_fewshot={shots} but the file has {len(train)} train rows")
    return shots, int(options.get("max_tokens", 256))


def _data(options: Mapping[str, Any], task: str) -> Path:
    if not options.get("data"):
        raise CapbenchError(f"the {task} task reads a local file: pass --data FILE (JSONL, JSON or Parquet)")
    return Path(str(options["data"]))


class GSM8KTask(Task):
    name = "gsm8k"
    supports_chat = True
    description = "GSM8K-format JSONL (question, answer '#### N'): strict and flexible exact match, few-shot"

    def build(self, model: ModelRef, num_requests: int, options: Mapping[str, Any]) -> Workload:
        path = _data(options, self.name)
        train, test = split(read_rows(path, ("question", "answer"), self.name))
        shots, max_tokens = _options(options, train)
        prefix = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in train[:shots])
        requests, expected = [], {}
        for i, row in enumerate(test[:num_requests]):
            rid = f"gsm8k-{i}"
            requests.append(Request(id=rid, prompt=f"{prefix}Question: {row['question']}\nAnswer:",
                                    max_tokens=max_tokens, sampling=SamplingParams(),
                                    stop=("Question:", "</s>", "<|im_end|>")))
            expected[rid] = gsm8k_target(str(row["answer"]))
        return Workload(self.name, requests, expected,
                        Scored("strict_match", strict_match, {"flexible_extract": flexible_extract}),
                        {"data": str(path), "num_fewshot": shots, "max_tokens": max_tokens, "rows": len(test)})


def _choices(row: dict[str, Any]) -> list[str]:
    if "choices" in row:
        return [str(c) for c in row["choices"]]
    return [str(row[k]) for k in LETTERS if k in row]


def _letter(answer: Any) -> str:
    if isinstance(answer, int) or (isinstance(answer, str) and answer.isdigit()):
        return LETTERS[int(answer)]
    return str(answer).strip().upper()[:1]


def letter_choice(text: str, expected: str) -> bool:
    match = re.search(r"\b([ABCD])\b", text.strip()) or re.search(r"([ABCD])", text.strip())
    return bool(match) and match.group(1) == expected  # type: ignore[union-attr]


def _mmlu_block(row: dict[str, Any], with_answer: bool) -> str:
    choices = "".join(f"{letter}. {text}\n" for letter, text in zip(LETTERS, _choices(row)))
    answer = f" {_letter(row['answer'])}\n\n" if with_answer else ""
    return f"{row['question'].strip()}\n{choices}Answer:{answer}"


class MMLUTask(Task):
    name = "mmlu"
    supports_chat = True
    description = "MMLU-format JSONL (question, choices or A-D, answer): letter choice, few-shot"

    def build(self, model: ModelRef, num_requests: int, options: Mapping[str, Any]) -> Workload:
        path = _data(options, self.name)
        rows = read_rows(path, ("question", "answer"), self.name)
        for i, row in enumerate(rows):
            if len(_choices(row)) != 4:
                raise CapbenchError(f"mmlu: {path} row {i + 1} needs 4 choices ('choices' list or fields A-D)")
        train, test = split(rows)
        shots, _ = _options(options, train)
        requests, expected = [], {}
        for i, row in enumerate(test[:num_requests]):
            subject = str(row.get("subject", "")).replace("_", " ")
            header = f"The following are multiple choice questions (with answers) about {subject}.\n\n".replace(
                " about .", ".")
            shots_text = "".join(_mmlu_block(r, True) for r in train[:shots])
            rid = f"mmlu-{i}"
            requests.append(Request(id=rid, prompt=header + shots_text + _mmlu_block(row, False),
                                    max_tokens=int(options.get("max_tokens", 2)), sampling=SamplingParams()))
            expected[rid] = _letter(row["answer"])
        return Workload(self.name, requests, expected, Scored("letter_choice", letter_choice),
                        {"data": str(path), "num_fewshot": shots, "rows": len(test)})

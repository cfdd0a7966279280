"""GSM8K- and MMLU-format tasks on files the tests write, scored as lm-evaluation-harness does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capbench_core.contract.backend import ModelRef
from capbench_core.errors import CapbenchError
from capbench_core.testing import Timing, reference_server
from capbench_tasks.files import GSM8KTask, MMLUTask, flexible_extract, gsm8k_target, letter_choice, strict_match
from tests.conftest import run_cli

MODEL = ModelRef("m", Path("."))


def write_jsonl(path: Path, rows: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GSM = [
    {"split": "train", "question": "Tom has 3 apples and buys 2. How many?", "answer": "3+2=5\n#### 5"},
    {"split": "train", "question": "A box holds 1,200 pens; 200 are sold. Left?", "answer": "1,000 pens.\n#### 1,000"},
    {"question": "Sam earns $12 an hour for 3 hours. Pay?", "answer": "12*3=36\n#### 36"},
    {"question": "What is 10 minus 12?", "answer": "#### -2"},
]


@pytest.mark.parametrize("text,strict,flexible", [
    ("He earns 12*3 = 36 dollars.\n#### 36", True, True),
    ("The answer is $36.", False, True),
    ("#### 36.\nThen 7 more", True, False),  # flexible takes the *last* number
    ("It is 35, no wait, 36", False, True),
    ("#### 1,000", False, False),
])
def test_gsm8k_strict_and_flexible_like_lm_eval(text: str, strict: bool, flexible: bool) -> None:
    assert strict_match(text, "36") is strict
    assert flexible_extract(text, "36") is flexible
    assert gsm8k_target("1,000 pens.\n#### 1,000") == "1000" and strict_match("#### 1,000", "1000")


def test_gsm8k_prompt_uses_the_files_train_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gsm.jsonl", GSM)
    w = GSM8KTask().build(MODEL, 10, {"data": str(path)})
    assert len(w.requests) == 2  # the train rows are examples, not questions
    first = w.requests[0]
    assert first.prompt.startswith("Question: Tom has 3 apples")
    assert first.prompt.endswith("Question: Sam earns $12 an hour for 3 hours. Pay?\nAnswer:")
    assert "Question:" in first.stop and w.params["num_fewshot"] == 2
    assert w.expected == {"gsm8k-0": "36", "gsm8k-1": "-2"}
    assert w.score("gsm8k-0", " 12*3 = 36\n#### 36") == {"strict_match": True, "flexible_extract": True}
    zero = GSM8KTask().build(MODEL, 10, {"data": str(path), "num_fewshot": "0"})
    assert zero.requests[0].prompt == "Question: Sam earns $12 an hour for 3 hours. Pay?\nAnswer:"


def test_mmlu_prompt_and_letter_scoring(tmp_path: Path) -> None:
    rows = [{"split": "train", "subject": "high_school_math", "question": "2+2?", "choices": ["3", "4", "5", "6"],
             "answer": 1},
            {"subject": "high_school_math", "question": "3*3?", "A": "6", "B": "8", "C": "9", "D": "12",
             "answer": "C"}]
    w = MMLUTask().build(MODEL, 5, {"data": str(write_jsonl(tmp_path / "m.jsonl", rows))})
    [req] = w.requests
    assert req.prompt == ("The following are multiple choice questions (with answers) about high school math.\n\n"
                          "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n3*3?\nA. 6\nB. 8\nC. 9\nD. 12\nAnswer:")
    assert w.expected == {"mmlu-0": "C"}
    assert letter_choice(" C", "C") and letter_choice("C. 9", "C") and not letter_choice(" B", "C")


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("", "has no rows; expected fields: question, answer"),
    ('{"question": "q"}\n', "row 1 lacks answer; expected fields: question, answer"),
    ("{not json\n", "is not valid JSON lines"),
])
def test_bad_files_name_the_file_and_fields(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CapbenchError, match=message):
        GSM8KTask().build(MODEL, 5, {"data": str(path)})
    with pytest.raises(CapbenchError, match="pass --data FILE"):
        GSM8KTask().build(MODEL, 5, {})


def test_gsm8k_run_end_to_end_reports_both_metrics(tmp_path: Path, db_url: str) -> None:
    path = write_jsonl(tmp_path / "gsm.jsonl", GSM)
    with reference_server(Timing(ttft_ms=2, tpot_ms=1)) as url:
        run_cli("run", "--backend", "openai", "--endpoint", url, "--task", "gsm8k", "--data", str(path),
                "--num-requests", "2", "--warmup", "0", "--concurrency", "1", "--task-option", "max_tokens=8",
                "--db", db_url, check=True)
    [row] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert row["accuracy_metric"] == "strict_match" and row["accuracy_n"] == 2
    assert set(row["accuracy_by_metric"]) == {"strict_match", "flexible_extract"}
    assert row["accuracy"] == 0.0 and row["accuracy_ci95_high"] > 0.5

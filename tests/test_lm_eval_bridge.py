"""lm-eval bridge: lm-evaluation-harness scores the llama.cpp server that the load then measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capbench_tasks import arith
from tests.conftest import run_cli
from tests.engines import require_engine

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'capbench[lmeval]')")

TASK_YAML = """task: capbench_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", " "]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _write_task(tmp_path: Path, n: int) -> Path:
    """An lm-eval task over the tiny MoE's held-out addition problems, in a local JSONL."""
    data = tmp_path / "arith.jsonl"
    with data.open("w") as f:
        for (a, b), _ in zip(arith.problems(77, held_out=True), range(n)):
            f.write(json.dumps({"question": arith.prompt(a, b), "answer": arith.answer(a, b)}) + "\n")
    (tmp_path / "capbench_arith.yaml").write_text(TASK_YAML.format(data=data))
    return tmp_path


def test_lm_eval_scores_the_measured_server_and_in_process_backends_say_why_not(tmp_path: Path,
                                                                                 db_url: str) -> None:
    require_engine("llama.cpp")
    include = _write_task(tmp_path, 20)
    out = tmp_path / "runs.json"
    proc = run_cli("run", "--backend", "llamacpp_server,torch_moe", "--task", "lm-eval:capbench_arith",
                   "--task-option", f"include_path={include}", "--task-option", "output_len=4",
                   "--num-requests", "8", "--warmup", "1", "--concurrency", "1", "--db", db_url,
                   "--json", str(out), check=True)
    assert "scoring http://127.0.0.1" in proc.stdout
    runs = {r["backend"]: r for r in json.loads(out.read_text())}
    server = runs["llamacpp_server"]["metrics"]
    assert server["accuracy_metric"] == "exact_match,none" and server["accuracy_n"] == 20
    assert 0.8 <= server["accuracy"] <= 1.0  # the tiny MoE scores 0.98 on held-out problems
    assert server["accuracy_ci95_low"] < server["accuracy"] <= server["accuracy_ci95_high"]
    assert server["output_tokens_total"] == 8 * 4 and runs["llamacpp_server"]["status"] == "complete"
    assert runs["llamacpp_server"]["workload"]["params"]["lm_eval_task"] == "capbench_arith"
    local = runs["torch_moe"]["metrics"]
    assert local["accuracy"] is None and "needs a backend with an OpenAI-compatible endpoint" in \
        local["notes"]["accuracy"]


def test_an_unknown_lm_eval_task_is_a_null_accuracy_with_lm_evals_reason(tmp_path: Path, db_url: str) -> None:
    require_engine("llama.cpp")
    out = tmp_path / "runs.json"
    run_cli("run", "--backend", "llamacpp_server", "--task", "lm-eval:no_such_task_xyz", "--num-requests", "2",
            "--warmup", "0", "--concurrency", "1", "--task-option", "output_len=2", "--db", db_url,
            "--json", str(out), check=True)
    [run] = json.loads(out.read_text())
    assert run["status"] == "complete" and run["metrics"]["accuracy"] is None
    assert "lm-eval no_such_task_xyz failed" in run["metrics"]["notes"]["accuracy"]
    assert "no_such_task_xyz" in run["metrics"]["notes"]["accuracy"].split("failed:", 1)[1]


def test_lm_eval_without_a_task_name_is_refused(db_url: str) -> None:
    proc = run_cli("run", "--backend", "torch_moe", "--task", "lm-eval", "--db", db_url)
    assert proc.returncode == 1 and "name the lm-eval task: --task lm-eval:<task>" in proc.stderr

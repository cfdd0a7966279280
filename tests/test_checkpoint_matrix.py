"""Five real MoE architectures (small random checkpoints, tests/checkpoints.py) through every engine that runs
here: each cell is measured, or the row states the engine's limit in one sentence.

The greedy outputs of the backends that measured the same checkpoint are compared and the agreement is
printed (and written to $CAPBENCH_MATRIX_OUT when set): random weights give flat logits, so bf16 engines part
ways after a few tokens; agreement is reported, not asserted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests import checkpoints
from tests.conftest import run_cli
from tests.engines import require_engine

BACKENDS = ("torch_moe", "llamacpp", "llamacpp_server", "vllm", "sglang")
MEASURED = "measured"
#: What each cell does on this CPU today: measured, or the engine limit its row must state.
EXPECTED: dict[tuple[str, str], str] = {
    **{(arch, backend): MEASURED for arch in checkpoints.ARCHS for backend in BACKENDS},
    # SGLang 0.5.23's torch-native MLA on CPU multiplies the latent (kv_lora_rank + rope = 576) where it expects
    # the per-head query size (192)
    ("deepseek_v2", "sglang"): "Expected size for first two dimensions of batch2 tensor",
}


def _sentence(reason: str) -> bool:
    """One line, the engine's own words, no traceback."""
    return "\n" not in reason and "Traceback" not in reason and len(reason) < 1200


@pytest.fixture(scope="module", params=sorted(checkpoints.ARCHS))
def rows(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    for engine in ("vllm", "sglang", "llama.cpp"):
        require_engine(engine)
    arch = request.param
    model = checkpoints.build(arch)
    out = tmp_path_factory.mktemp(arch) / "rows.json"
    db = f"sqlite:///{out.parent / 'runs.db'}"
    run_cli("run", "--model", str(model), "--backend", ",".join(BACKENDS), "--task", "random", "--num-requests",
            "4", "--warmup", "0", "--concurrency", "2", "--task-option", "input_len=16", "--task-option",
            "output_len=8", "--db", db, "--json", str(out), timeout=1800)
    return arch, {r["backend"]: r for r in json.loads(out.read_text())}


def test_every_cell_measures_or_states_the_engine_limit(rows: tuple[str, dict[str, Any]]) -> None:
    arch, by_backend = rows
    assert set(by_backend) == set(BACKENDS)
    for backend, r in by_backend.items():
        expected = EXPECTED[(arch, backend)]
        if expected == MEASURED:
            assert r["status"] == "complete", f"{arch} x {backend}: {r['status_reason']}"
            assert r["metrics"]["output_tokens_total"] == 32 and r["model"]["dtype"] == "bfloat16"
            assert r["metrics"]["s_mbu"] is not None or r["metrics"]["notes"].get("s_mbu"), (arch, backend)
        else:
            assert r["status"] == "failed" and expected in r["status_reason"], f"{arch} x {backend}: " \
                                                                               f"{r['status_reason']}"
            assert _sentence(r["status_reason"]), r["status_reason"]
    _report_agreement(arch, by_backend)


def test_routing_is_stored_where_measured_and_lends_its_shape_elsewhere(rows: tuple[str, dict[str, Any]]) -> None:
    """torch_moe (and SGLang where its recorder runs) store per-expert loads; every other batching row's A is
    estimated from torch_moe's measured routing, and says so (in-process llama.cpp decodes one sequence at a
    time: exactly top_k)."""
    arch, by_backend = rows
    reference = by_backend["torch_moe"]
    experts, top_k = reference["model"]["num_experts"], reference["model"]["top_k"]
    layers = len(reference["routing"]["tokens"])
    for backend, r in by_backend.items():
        if r["status"] != "complete":
            continue
        if r["routing"] is None:
            assert backend not in ("torch_moe",) and not (arch == "qwen3_moe" and backend == "sglang"), backend
            method = r["metrics"]["expert_activation_method"]
            if backend == "llamacpp":
                assert method.startswith("batch of 1"), method
                continue
            assert "estimated from torch_moe's measured routing" in method, (arch, backend, method)
            continue
        tokens = r["routing"]["tokens"]
        totals = {sum(layer) for layer in tokens}
        assert len(tokens) == layers and {len(layer) for layer in tokens} == {experts}, (arch, backend)
        assert len(totals) == 1 and totals.pop() % top_k == 0, (arch, backend, tokens)
        assert r["metrics"]["routing_imbalance_max"] >= r["metrics"]["routing_imbalance_mean"] >= 1.0


def _report_agreement(arch: str, by_backend: dict[str, Any]) -> None:
    outputs = {b: [q["output_text"] for q in sorted(r["requests"], key=lambda q: q["id"])]
               for b, r in by_backend.items() if r["status"] == "complete"}
    if not outputs:
        return
    reference = "torch_moe" if "torch_moe" in outputs else sorted(outputs)[0]
    agreement = {b: sum(a == c for a, c in zip(texts, outputs[reference])) / len(texts)
                 for b, texts in outputs.items()}
    line = {"arch": arch, "reference": reference, "agreement": agreement,
            "limits": {b: r["status_reason"][:300] for b, r in by_backend.items() if r["status"] != "complete"}}
    print(json.dumps(line))
    target = os.environ.get("CAPBENCH_MATRIX_OUT")
    if target:
        with Path(target).open("a") as f:
            f.write(json.dumps(line) + "\n")

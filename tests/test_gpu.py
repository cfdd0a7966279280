"""The real vLLM and SGLang on a CUDA GPU (skipped elsewhere, with the reason).

They serve the embedded tiny MoE (Qwen3-MoE layout, shipped in the repository),
so nothing is downloaded; set CAPBENCH_GPU_MODEL to a local Hugging Face
directory to run a bigger public MoE instead (docs/gpu.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.gpu
MODEL = os.environ.get("CAPBENCH_GPU_MODEL", "tiny-moe")


def _run(tmp_path: Path, backend: str, *extra: str) -> list[dict]:  # type: ignore[type-arg]
    out = tmp_path / f"{backend}.json"
    run_cli("run", "--backend", backend, "--model", MODEL, "--num-requests", "64", "--concurrency", "1,16",
            "--db", f"sqlite:///{tmp_path / 'gpu.db'}", "--json", str(out), *extra, timeout=1800, check=True)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_real_engine_serves_the_model(tmp_path: Path, backend: str) -> None:
    rows = _run(tmp_path, backend, "--backend-option", "dtype=float32" if MODEL == "tiny-moe" else "dtype=auto")
    for r in rows:
        m = r["metrics"]
        assert r["status"] == "complete", r["status_reason"]
        assert r["engine"]["version"].startswith(backend)
        assert m["server_ttft_ms_mean"] is not None and m["server_tpot_ms_mean"] is not None
        assert m["ttft_ms_p50"] >= m["server_ttft_ms_mean"] * 0.5
        if MODEL == "tiny-moe":
            assert m["accuracy"] >= 0.9
    assert rows[-1]["metrics"]["expert_activation_source"] == "measured"  # SGLang's recorder, vLLM's routed experts
    assert rows[-1]["engine"]["package"] == backend and rows[-1]["engine"]["variant"] == "cuda"

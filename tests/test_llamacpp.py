"""llama.cpp (the real one, through llama-cpp-python) on the exported tiny MoE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from capbench_core.errors import CapbenchError
from capbench_torch_moe.commands import tiny_model_dir
from capbench_torch_moe.loading import load_hf
from tests.conftest import run_cli
from tests.engines import require_engine

llama_cpp = pytest.importorskip("llama_cpp")
from capbench_llamacpp.backend import no_repack_when, repack_setting  # noqa: E402
from capbench_llamacpp.convert import ensure_gguf  # noqa: E402

PROMPTS = ["123+456=", "7+8=", "905+17=", "The sum of", "40+404="]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def load(path: Path) -> object:
    """As the backend loads it (weight repacking as ``repack=auto`` sets it for this CPU)."""
    with no_repack_when(not repack_setting("auto")[0]):
        return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, type_k=0, type_v=0, verbose=False)


def llama_logits(llm, text: str) -> tuple[list[int], np.ndarray]:  # type: ignore[no-untyped-def]
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    return ids, np.array(llm.scores[: len(ids)])


def test_f32_gguf_logits_match_torch_moe(gguf_dir: Path) -> None:
    llm = load(ensure_gguf(tiny_model_dir(), "f32", gguf_dir))
    model = load_hf(tiny_model_dir())
    for text in PROMPTS:
        ids, got = llama_logits(llm, text)
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0].numpy()
        assert np.abs(got - ref).max() <= 1e-4, text


def test_f32_greedy_continuations_are_identical_over_32_tokens(gguf_dir: Path) -> None:
    llm = load(ensure_gguf(tiny_model_dir(), "f32", gguf_dir))
    model = load_hf(tiny_model_dir())
    eos = int(llm.token_eos())
    for text in PROMPTS[:3]:
        out = llm.create_completion(text, max_tokens=32, temperature=0, repeat_penalty=1.0,
                                    logit_bias={eos: -1e9})
        theirs = llm.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=False)
        seq = llm.tokenize(text.encode(), add_bos=False, special=False)
        mine: list[int] = []
        with torch.no_grad():
            for _ in range(32):
                logits = model(torch.tensor([seq + mine]))[0, -1]
                logits[eos] = -1e9
                mine.append(int(logits.argmax()))
        assert theirs == mine, text


def test_q8_0_keeps_top1_agreement(gguf_dir: Path) -> None:
    f32 = load(ensure_gguf(tiny_model_dir(), "f32", gguf_dir))
    q8 = load(ensure_gguf(tiny_model_dir(), "q8_0", gguf_dir))
    agree = total = 0
    for a in range(0, 1000, 37):
        text = f"{a}+{(a * 7) % 1000}=" + str(a + (a * 7) % 1000)
        _, x = llama_logits(f32, text)
        _, y = llama_logits(q8, text)
        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
        total += len(x)
    assert agree / total >= 0.95, agree / total


def test_q4_k_m_is_made_by_llama_cpp_and_loads(gguf_dir: Path) -> None:
    path = ensure_gguf(tiny_model_dir(), "q4_k_m", gguf_dir)
    assert path.stat().st_size < ensure_gguf(tiny_model_dir(), "q8_0", gguf_dir).stat().st_size
    llm = load(path)
    assert llm.create_completion("2+2=", max_tokens=4, temperature=0)["choices"][0]["text"]


def test_bad_gguf_options_name_the_problem(gguf_dir: Path) -> None:
    with pytest.raises(CapbenchError, match="unsupported GGUF type 'q2_x'; supported: f32, bf16, f16, q8_0, q4_k_m"):
        ensure_gguf(tiny_model_dir(), "q2_x", gguf_dir)


def test_gguf_metadata_feeds_the_analytics(gguf_dir: Path) -> None:
    data = json.loads(run_cli("model", "inspect", str(ensure_gguf(tiny_model_dir(), "f32", gguf_dir)), "--json",
                              check=True).stdout)
    ref = json.loads(run_cli("model", "inspect", "tiny-moe", "--json", check=True).stdout)
    for key in ("total_params", "active_params", "num_experts", "top_k", "sparsity", "kv_bytes_per_token"):
        assert data[key] == ref[key], key


def test_default_run_has_every_local_backend(tmp_path: Path, db_url: str) -> None:
    """The default backend choice, on the quick backends (vLLM and SGLang: test_real_engines.py)."""
    require_engine("llama.cpp")
    out = tmp_path / "r.json"
    proc = run_cli("run", "--num-requests", "24", "--warmup", "2", "--concurrency", "2", "--db", db_url,
                   "--json", str(out), env={"CAPBENCH_DISABLE_PLUGINS": "vllm,sglang"}, check=True)
    rows = {r["backend"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"torch_moe", "llamacpp", "llamacpp_server"}, proc.stdout
    for name, r in rows.items():
        m = r["metrics"]
        assert r["status"] == "complete", (name, r["status_reason"])
        assert m["accuracy"] >= 0.9, name
        assert m["experts_activated_per_layer_mean"] is not None and m["s_mbu"] is not None, name
        assert r["workload"]["sampling"] == rows["torch_moe"]["workload"]["sampling"]
    assert rows["llamacpp"]["metrics"]["expert_activation_source"] == "estimated"
    # dtype auto: every engine serves the tiny MoE in the dtype it is stored in
    assert {r["model"]["dtype"] for r in rows.values()} == {"bfloat16"}
    # Both llama.cpp rows name their llama.cpp revision: setup builds them from one source.
    server_commit = rows["llamacpp_server"]["engine"]["version"].split("commit ")[1].rstrip(")")
    assert f"llama.cpp {server_commit}" in rows["llamacpp"]["engine"]["variant"], rows["llamacpp"]["engine"]


def test_quantised_row_reports_its_own_accuracy(db_url: str) -> None:
    run_cli("run", "--backend", "llamacpp", "--backend-option", "gguf_type=q8_0", "--num-requests", "40",
            "--warmup", "0", "--concurrency", "1", "--db", db_url, check=True)
    [row] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert row["accuracy"] >= 0.9 and row["accuracy_n"] == 40


def test_missing_gguf_file_is_named(db_url: str) -> None:
    proc = run_cli("run", "--backend", "llamacpp", "--backend-option", "gguf=/nope/model.gguf",
                   "--num-requests", "2", "--db", db_url)
    assert proc.returncode == 3 and "GGUF file /nope/model.gguf does not exist" in proc.stdout


def test_max_tokens_holds_when_the_model_emits_partial_utf8(tmp_path: Path) -> None:
    """A random-init model emits lone bytes >= 0x80 that decode to nothing until a sequence completes;
    every token still counts against max_tokens (llama-cpp-python's streaming completion did not, and ran
    until the KV cache was full)."""
    import asyncio
    from dataclasses import replace

    from capbench_core.contract.backend import ModelRef, SamplingParams
    from capbench_core.contract.registry import PluginManager
    from capbench_core.measure.hardware import detect_hardware
    from capbench_torch_moe.random_init import make_checkpoint

    pm = PluginManager().collect()
    path = make_checkpoint({"hidden_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 512}, tmp_path)
    model = ModelRef("random", path)
    workload = pm.tasks.get("random").build(model, 12, {"input_len": 8, "output_len": 48})
    workload.requests = [replace(r, sampling=SamplingParams(temperature=1.0, seed=i))  # sampled: any byte
                         for i, r in enumerate(workload.requests)]

    async def all_requests(session) -> list[tuple[int, str, str | None]]:  # type: ignore[no-untyped-def]
        out = []
        for request in workload.requests:
            chunks = [c async for c in session.stream(request)]
            out.append((sum(c.num_tokens for c in chunks), "".join(c.text for c in chunks),
                        next(c.finish_reason for c in chunks if c.finish_reason)))
        return out

    with pm.backends.get("llamacpp").start(model, detect_hardware(pm), {}) as session:
        outputs = asyncio.run(all_requests(session))
    assert [(n, finish) for n, _, finish in outputs] == [(48, "length")] * 12
    assert any("\ufffd" in text or any(ord(ch) > 127 for ch in text) for _, text, _ in outputs)

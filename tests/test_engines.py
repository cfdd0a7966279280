"""vLLM and SGLang plugins where the real engines cannot show it: GPU flags and parallelism argv,
availability without an engine environment, and engine reports that are malformed (stand-ins that
speak each engine's documented API with injected faults). The real engines run in test_real_engines.py."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from capbench_core.contract.backend import ModelRef
from capbench_core.serving.environments import Resolved
from capbench_core.serving.scrape import ScrapeError, parse, window
from capbench_core.testing import Timing, reference_server
from capbench_sglang import SGLangBackend
from capbench_vllm import METRICS as VLLM_METRICS
from capbench_vllm import VLLMBackend
from tests.conftest import run_cli

MODEL = ModelRef("tiny-moe", Path("/models/tiny-moe"))


def test_vllm_argv_passes_parallelism_and_quantisation_through() -> None:
    b = VLLMBackend()
    opts = b.parse({"tp": "2", "dp": "4", "enable_expert_parallel": "true", "quantization": "fp8",
                    "max_model_len": "8192", "gpu_memory_utilization": "0.85",
                    "extra_args": "--enable-eplb --eplb-config '{\"window_size\": 1000}'"})
    argv = b.argv("/envs/vllm/bin/python", MODEL, 8123, opts)
    assert argv[:5] == ["/envs/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                        "/models/tiny-moe"]
    line = shlex.join(argv)
    for part in ("--host 127.0.0.1", "--port 8123", "--served-model-name tiny-moe", "--tensor-parallel-size 2",
                 "--data-parallel-size 4", "--quantization fp8", "--max-model-len 8192",
                 "--gpu-memory-utilization 0.85", "--seed 0"):
        assert part in line, part
    assert "--enable-expert-parallel" in argv
    assert argv[-3:] == ["--enable-eplb", "--eplb-config", '{"window_size": 1000}']
    no_ep = b.argv("python", MODEL, 1, b.parse({"enable_expert_parallel": "false"}))
    assert "--enable-expert-parallel" not in no_ep


def test_sglang_argv_enables_metrics_and_the_expert_recorder() -> None:
    b = SGLangBackend()
    argv = b.argv("python", MODEL, 30001, b.parse({"tp": "8", "ep": "8", "dp": "2", "mem_fraction_static": "0.8",
                                                    "quantization": "fp8", "extra_args": "--disable-cuda-graph"}))
    line = shlex.join(argv)
    assert argv[1:3] == ["-m", "sglang.launch_server"] and "--device" not in argv  # CUDA: SGLang's default
    for part in ("--model-path /models/tiny-moe", "--port 30001", "--enable-metrics", "--tp-size 8",
                 "--ep-size 8", "--dp-size 2", "--mem-fraction-static 0.8", "--quantization fp8",
                 "--expert-distribution-recorder-mode per_token", "--random-seed 0"):
        assert part in line, part
    assert argv[-1] == "--disable-cuda-graph"
    cuda = Resolved("python", "sglang", "0.5.23", "cuda", "cuda", "test")
    assert b.env({}, Path("/run"), cuda) == {"SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": "/run/experts"}
    cpu = Resolved("python", "sglang", "0.5.23", "cpu", "cpu", "test")
    assert b.env({}, Path("/run"), cpu)["SGLANG_USE_CPU_ENGINE"] == "1"
    cpu_argv = b.argv("python", MODEL, 1, {**b.parse({}), "device": "cpu"})
    assert "--device cpu --disable-cuda-graph --disable-overlap-schedule" in shlex.join(cpu_argv)


def test_unknown_engine_option_is_named() -> None:
    with pytest.raises(Exception, match="vllm does not know option.*tensor_parallel"):
        VLLMBackend().parse({"tensor_parallel": "2"})


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_without_its_environment_each_engine_says_what_to_run(backend: str, db_url: str, tmp_path: Path) -> None:
    env = {"CAPBENCH_ENGINES_DIR": str(tmp_path / "no-engines")}
    proc = run_cli("run", "--backend", backend, "--db", db_url, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {backend} cannot run here: {backend}'s environment is not installed: run "
                     f"`capbench engines install {backend}` (or point CAPBENCH_{backend.upper()}_PYTHON at your own)"]
    data = json.loads(run_cli("plugins", "--json", env=env, check=True).stdout)["backends"][backend]
    assert data["available"] is False and f"capbench engines install {backend}" in data["reason"]


def _run(backend: str, url: str, db_url: str, *extra: str) -> dict:  # type: ignore[type-arg]
    run_cli("run", "--backend", backend, "--endpoint", url, "--task", "random", "--num-requests", "12",
            "--warmup", "2", "--concurrency", "4", "--task-option", "output_len=10", "--db", db_url, *extra,
            check=True)
    [row] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    return row  # type: ignore[no-any-return]


@pytest.mark.parametrize("fault,key,reason", [
    ("bad_metrics", "engine.engine_metrics", "malformed Prometheus text"),
    ("bad_dump", "engine.experts", "cannot read recorder dump"),
])
def test_bad_engine_reports_are_null_with_reason(fault: str, key: str, reason: str, tmp_path: Path,
                                                 db_url: str) -> None:
    rec = tmp_path / "recorder"
    with reference_server(Timing(ttft_ms=2, tpot_ms=1, flavor="sglang", model="tiny-moe", experts_per_layer="2,2,2",
                                 recorder_dir=str(rec), fault=fault)) as url:
        row = _run("sglang", url, db_url, "--backend-option", f"recorder_dir={rec}")
    assert row["status"] == "complete"
    assert reason in row["notes"][key]
    assert row["output_tokens_total"] == 120


def test_metrics_window_math() -> None:
    before = parse("# TYPE vllm:prompt_tokens counter\nvllm:prompt_tokens_total{model_name=\"m\",engine=\"0\"} 10\n"
                   "vllm:prompt_tokens_total{model_name=\"m\",engine=\"1\"} 5\n"
                   "# TYPE vllm:time_to_first_token_seconds histogram\n"
                   "vllm:time_to_first_token_seconds_sum{engine=\"0\"} 1.0\n"
                   "vllm:time_to_first_token_seconds_count{engine=\"0\"} 10\n")
    after = {**before, "vllm:prompt_tokens_total": 45.0, "vllm:time_to_first_token_seconds_sum": 3.0,
             "vllm:time_to_first_token_seconds_count": 30.0}
    values, notes = window(before, after, VLLM_METRICS)
    assert values["prompt_tokens"] == 30.0  # summed over both engines, then delta
    assert values["server_ttft_ms_mean"] == pytest.approx(100.0)
    assert values["server_tpot_ms_mean"] is None and "inter-token" not in notes.get("server_tpot_ms_mean", "x")
    with pytest.raises(ScrapeError):
        parse("not { prometheus")


def test_vllm_routed_experts_give_distinct_experts_per_rebuilt_step() -> None:
    """What a CUDA build returns with --enable-return-routed-experts ([tokens, layers, top_k] ids, as lists or a
    base64 .npy), counted per step: the tokens at one position across each group of `concurrency` requests."""
    import base64
    import io

    import numpy as np

    from capbench_vllm import decode_routed, distinct_per_step, expert_loads

    a = [[[0, 1], [2, 3]], [[0, 1], [2, 4]]]           # 2 tokens, 2 layers, top-2
    b = np.array([[[1, 5], [3, 6]], [[6, 7], [3, 4]], [[0, 1], [2, 3]]], dtype=np.int16)  # 3 tokens
    buf = io.BytesIO()
    np.save(buf, b)
    routed = [decode_routed(a), decode_routed(base64.b64encode(buf.getvalue()).decode())]
    assert decode_routed(None) is None and routed[1].shape == (3, 2, 2)
    # together (c=2): step 0 layer 0 {0,1,5} = 3, layer 1 {2,3,6} = 3; step 1 {0,1,6,7} = 4, {2,3,4} = 3;
    # step 2 (b alone) {0,1} = 2, {2,3} = 2 -> layer means (3+4+2)/3, (3+3+2)/3
    assert distinct_per_step(routed, 2) == pytest.approx([3.0, 8 / 3])
    # one at a time (c=1): every step is one token, exactly top-k
    assert distinct_per_step(routed, 1) == [2.0, 2.0]
    # per-expert loads over all 5 tokens: layer 0 ids 0,1 | 0,1 | 1,5 | 6,7 | 0,1; layer 1 2,3 | 2,4 | 3,6 | 3,4 | 2,3
    assert expert_loads(routed) == [[3, 4, 0, 0, 0, 1, 1, 1], [0, 0, 3, 4, 2, 0, 1, 0]]


def test_llama_server_placement_options_are_validated_passed_and_kept() -> None:
    from capbench_core.contract.backend import LoadShape
    from capbench_llamacpp.server import LlamaCppServerBackend

    b = LlamaCppServerBackend()
    opts = b.parse({"n_cpu_moe": "2", "override_tensor": "exps=CPU", "n_gpu_layers": "all", "cache_type_k": "q8_0",
                    "flash_attn": "on", "ubatch_size": "256"})
    argv = b.argv(Path("/bin/llama-server"), Path("/m.gguf"), 8080, opts, "tiny-moe", LoadShape(4, 40))
    line = shlex.join(argv)
    for part in ("--n-cpu-moe 2", "--override-tensor exps=CPU", "--n-gpu-layers all", "--cache-type-k q8_0",
                 "--cache-type-v f32", "--flash-attn on", "--ubatch-size 256", "--parallel 4",
                 "--ctx-size 256",  # 4 slots x (40 tokens + 16 headroom, rounded up to 16)
                 "--metrics"):
        assert part in line, part
    for bad, message in (({"n_cpu_moe": "some"}, "n_cpu_moe='some' is not valid"),
                         ({"cache_type_v": "q3"}, "cache_type_v='q3' is not valid"),
                         ({"flash_attn": "yes"}, "flash_attn='yes' is not valid")):
        with pytest.raises(Exception, match=message):
            b.parse(bad)


def test_llama_cpp_weight_repacking_follows_the_cpu_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's AMX kernels crash on quantized weights (ggml-org/llama.cpp#20824): ``repack=auto`` turns
    repacking off on an AMX CPU only, says why, and an explicit setting wins either way."""
    from capbench_core.contract.backend import LoadShape
    from capbench_llamacpp import backend as llamacpp
    from capbench_llamacpp.server import LlamaCppServerBackend

    b = LlamaCppServerBackend()

    def argv(**options: str) -> list[str]:
        return b.argv(Path("/bin/llama-server"), Path("/m.gguf"), 8080, b.parse(options), "tiny-moe",
                      LoadShape(1, 40))

    for amx, repacked in ((True, False), (False, True)):
        monkeypatch.setattr(llamacpp, "cpu_has_amx", lambda amx=amx: amx)
        assert ("--no-repack" not in argv()) is repacked
        assert llamacpp.repack_setting("auto")[0] is repacked
        assert "--no-repack" in argv(repack="off") and "--no-repack" not in argv(repack="on")
        assert ("llama.cpp#20824" in llamacpp.repack_setting("auto")[1]) is amx
    with pytest.raises(Exception, match="repack='maybe': use auto, on or off"):
        b.parse({"repack": "maybe"})

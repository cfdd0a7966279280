"""Your checkpoint through every engine: model intake (paths, GGUF, the offline Hugging Face cache), configs as
any transformers version writes them, the bytes really served, sizing from the workload, chat requests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from capbench_models import PUBLISHED_CONFIGS

from capbench_core.analytics.checkpoint import hub_snapshot, normalize
from capbench_core.analytics.model_spec import spec_from_config
from capbench_core.analytics.weights import DTYPE_BYTES, WeightBytes, from_gguf, from_quantization
from capbench_core.errors import CapbenchError
from tests import checkpoints
from tests.conftest import ROOT, run_cli

CONFIGS = PUBLISHED_CONFIGS


def _hub(cache: Path, repo_id: str, source: Path, commit: str = "0123abcd") -> Path:
    """A Hugging Face cache entry laid out as huggingface_hub lays it out."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            shutil.copy(file, snapshot / file.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hugging_face_id_resolves_offline_from_the_local_cache(tmp_path: Path, db_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    from capbench_torch_moe.commands import tiny_model_dir

    snapshot = _hub(cache, "capbench/tiny-moe-copy", tiny_model_dir())
    env = {"HF_HUB_CACHE": str(cache)}
    inspected = json.loads(run_cli("model", "inspect", "capbench/tiny-moe-copy", "--json", env=env,
                                   check=True).stdout)
    assert inspected["name"] == "capbench/tiny-moe-copy" and inspected["num_experts"] == 8
    run_cli("run", "--model", "capbench/tiny-moe-copy", "--backend", "torch_moe", "--num-requests", "4",
            "--warmup", "0", "--concurrency", "2", "--db", db_url, env=env, check=True)
    [row] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert row["model"] == "capbench/tiny-moe-copy" and row["status"] == "complete"  # the id, never the hash
    missing = run_cli("model", "inspect", "capbench/not-there", env=env)
    assert missing.returncode == 1 and "not in the local Hugging Face cache" in missing.stderr
    assert str(cache) in missing.stderr and "downloads nothing" in missing.stderr
    wrong = run_cli("model", "inspect", "capbench/tiny-moe-copy", "--revision", "v9", env=env)
    assert wrong.returncode == 1 and "not at revision 'v9'" in wrong.stderr and "refs there: main" in wrong.stderr
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert hub_snapshot("capbench/tiny-moe-copy", "0123abcd") == snapshot  # a commit as the revision


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.json")))
def test_configs_read_the_same_whichever_transformers_wrote_them(name: str) -> None:
    """The published configs (transformers 4.x names) and the same configs as the installed transformers saves
    them (5.x: num_local_experts, rope_parameters, dtype) give identical analytics."""
    from transformers import CONFIG_MAPPING

    published: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    cls = CONFIG_MAPPING[published["model_type"]]
    saved = cls(**{k: v for k, v in published.items() if k not in ("model_type", "architectures", "auto_map")})
    rewritten = {**saved.to_dict(), "model_type": published["model_type"]}
    assert spec_from_config(published, name).summary() == spec_from_config(rewritten, name).summary()


def test_transformers_5_names_are_read_through_the_alias_table() -> None:
    v5 = {"model_type": "qwen3_moe", "num_local_experts": 128, "dtype": "bfloat16",
          "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}}
    config = normalize(v5)
    assert (config["num_experts"], config["torch_dtype"], config["rope_theta"]) == (128, "bfloat16", 1e6)
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}
    assert normalize({"model_type": "mixtral", "num_experts": 8})["num_local_experts"] == 8


def test_quantized_checkpoints_count_their_real_bytes() -> None:
    fp8 = from_quantization({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
                            "bfloat16")
    assert fp8 is not None and fp8.expert == pytest.approx(1 + 4 / 16384) and fp8.embedding == 2.0
    mxfp4 = from_quantization({"quantization_config": {"quant_method": "mxfp4"}}, "bfloat16")
    assert mxfp4 is not None and (mxfp4.expert, mxfp4.dense) == (4.25 / 8, 2.0)
    gptq = from_quantization({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}},
                             "float16")
    assert gptq is not None and gptq.dense == pytest.approx(0.5 + 2.5 / 128)
    assert from_quantization({}, "bfloat16") is None
    with pytest.raises(CapbenchError, match="quant_method 'bitnet' is not one capbench counts"):
        from_quantization({"quantization_config": {"quant_method": "bitnet"}}, "bfloat16")
    # A decode step of gpt-oss-20b reads its experts in MXFP4, not in bf16:
    from capbench_core.analytics.metrics import decode_step_cost
    from capbench_core.contract.backend import DecodeStep

    config = json.loads((CONFIGS / "gpt-oss-20b.json").read_text())
    spec = spec_from_config(config, "gpt-oss-20b")
    step = DecodeStep(1, 1, 100, [float(spec.top_k)] * spec.moe_layers)
    as_bf16 = decode_step_cost(spec, step, "bfloat16", "bfloat16").bytes
    served = from_quantization(config, "bfloat16")
    assert served is not None
    as_served = decode_step_cost(spec, step, "bfloat16", "bfloat16", served).bytes
    experts = spec.moe_layers * spec.top_k * spec.expert_params
    assert as_bf16 - as_served == pytest.approx(experts * (2 - 4.25 / 8))


def test_a_user_gguf_is_counted_in_its_own_tensor_types(tmp_path: Path, db_url: str) -> None:
    """A Q8_0 GGUF keeps its norms in F32 and its weights in Q8_0: the row says q8_0 and counts each class in
    the bytes of its own tensors, not in gguf_type's default."""
    from capbench_llamacpp.backend import gguf_cache
    from capbench_llamacpp.convert import ensure_gguf
    from capbench_torch_moe.commands import tiny_model_dir

    gguf = ensure_gguf(tiny_model_dir(), "q8_0", gguf_cache())
    wb = from_gguf(gguf)
    assert wb.expert == pytest.approx(DTYPE_BYTES["q8_0"]) and DTYPE_BYTES["q8_0"] < wb.dense < 1.2
    run_cli("run", "--backend", "llamacpp", "--backend-option", f"gguf={gguf}", "--num-requests", "4",
            "--warmup", "0", "--concurrency", "1", "--db", db_url, check=True)
    from capbench_core.store import Store

    [result] = Store(db_url).runs()
    assert result.model.dtype == "q8_0" and result.engine is not None
    assert result.decode_steps is not None and result.decode_steps.weight_bytes == wb.record()
    assert WeightBytes.from_record(result.decode_steps.weight_bytes, "q8_0") == wb


def test_dtype_auto_serves_and_counts_the_checkpoints_own(db_url: str) -> None:
    """A bf16 checkpoint runs in bf16 on torch_moe and llama.cpp by default (no float32 upcast), and its bytes
    per step are bf16 bytes."""
    model = checkpoints.build("mixtral")
    run_cli("run", "--model", str(model), "--backend", "torch_moe,llamacpp", "--task", "random", "--num-requests",
            "2", "--warmup", "0", "--concurrency", "1", "--task-option", "output_len=4", "--db", db_url,
            check=True)
    from capbench_core.store import Store

    for result in Store(db_url).runs():
        assert result.model.dtype == "bfloat16", result.backend
        assert result.decode_steps is not None and result.decode_steps.dtype == "bfloat16"
        steps_wb = WeightBytes.from_record(result.decode_steps.weight_bytes, "bfloat16")
        assert steps_wb.dense == pytest.approx(2.0, rel=0.1)  # llama.cpp's F32 norms add a little
    ctx = {r.backend: r.engine.launch_args for r in Store(db_url).runs() if r.engine}
    assert ctx["torch_moe"]["max_model_len"] <= 64 and ctx["llamacpp"]["n_ctx"] <= 64  # sized from the run


def test_a_backend_that_cannot_fit_is_refused_with_the_numbers_and_the_others_run(db_url: str) -> None:
    model = checkpoints.build("qwen3_moe")
    # 200,000 sequences of ~3,000 tokens: ~300 GB of KV cache for torch_moe; llama.cpp holds one sequence
    proc = run_cli("run", "--model", str(model), "--backend", "torch_moe,llamacpp", "--task", "random",
                   "--num-requests", "2", "--warmup", "0", "--concurrency", "200000", "--task-option",
                   "input_len=3000", "--task-option", "output_len=4", "--db", db_url)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    rows = {r["backend"]: r for r in json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)}
    assert rows["llamacpp"]["status"] == "complete"  # one request at a time: its KV cache is one sequence's
    from capbench_core.store import Store

    refused = Store(db_url).get(rows["torch_moe"]["run_id"])
    assert refused is not None and refused.status == "failed"
    assert "was not started: the model needs at least" in refused.status_reason
    assert "sequence(s) of" in refused.status_reason and "GB of host memory is free" in refused.status_reason


def test_an_architecture_the_analytics_do_not_know_still_runs(tmp_path: Path, db_url: str) -> None:
    """A dense Phi-3 checkpoint: llama.cpp serves it; capbench cannot count it, so S-MBU/S-MFU are null with why."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from capbench_llamacpp.convert import vocab_gguf

    out = tmp_path / "phi3-small-random"
    torch.manual_seed(0)
    Phi3ForCausalLM(Phi3Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                               intermediate_size=128, vocab_size=32064, max_position_embeddings=512,
                               original_max_position_embeddings=512, pad_token_id=32000)).save_pretrained(out)
    vocab = vocab_gguf("phi-3")
    AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name).save_pretrained(out)
    checkpoints._sentencepiece_model(vocab, out / "tokenizer.model")
    run_cli("run", "--model", str(out), "--backend", "llamacpp", "--task", "random", "--num-requests", "2",
            "--warmup", "0", "--concurrency", "1", "--task-option", "output_len=4", "--db", db_url, check=True)
    [row] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert row["status"] == "complete" and row["output_tok_per_s"] > 0
    assert row["s_mbu"] is None and "analytics cannot count this model" in row["notes"]["s_mbu"]


def test_chat_requests_go_through_the_models_chat_template(db_url: str) -> None:
    """Servers get /v1/chat/completions; in-process engines render the same template; the row records it."""
    model = checkpoints.build("qwen3_moe")
    run_cli("run", "--model", str(model), "--backend", "torch_moe,llamacpp_server", "--task", "random", "--chat",
            "--num-requests", "2", "--warmup", "0", "--concurrency", "1", "--task-option", "output_len=4",
            "--db", db_url, check=True)
    from capbench_core.store import Store

    runs = {r.backend: r for r in Store(db_url).runs()}
    for name, result in runs.items():
        assert result.status == "complete" and result.workload.params["chat"] is True, name
        assert result.config is not None and result.config["chat"] is True
        # the template's own tokens are in the prompt the engine counted: more than the 16 digits
        assert all((r.prompt_tokens or 0) > 16 for r in result.requests), name
    tiny = run_cli("run", "--backend", "torch_moe", "--task", "random", "--chat", "--db", db_url)
    assert tiny.returncode == 1 and "has no chat template" in tiny.stderr
    arith = run_cli("run", "--backend", "torch_moe", "--task", "arith", "--chat", "--db", db_url)
    assert arith.returncode == 1 and "task 'arith' has no chat form" in arith.stderr


def test_the_sweeps_doc_example_plans_as_written(tmp_path: Path) -> None:
    """docs/sweeps.md's example names a Hugging Face id: with it in the local cache the file plans."""
    doc = (ROOT / "docs" / "sweeps.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "sweep.yaml").write_text(example)
    source = tmp_path / "qwen3"
    source.mkdir()
    shutil.copy(CONFIGS / "qwen3-30b-a3b.json", source / "config.json")
    _hub(tmp_path / "hub", "Qwen/Qwen3-30B-A3B", source)
    plan = json.loads(run_cli("sweep", "plan", str(tmp_path / "sweep.yaml"), "--json",
                              env={"HF_HUB_CACHE": str(tmp_path / "hub")}, check=True).stdout)
    assert len(plan["cells"]) == 2 * 4 * 2 * 2
    assert all(c["weights_gb_bf16"] > 60 and c["num_gpus"] == 2 for c in plan["cells"])

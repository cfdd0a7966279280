"""Model analytics against published parameter counts of real models.

Each config file under plugins/capbench_models/configs is the model's published config.json
(see its SOURCES.md). A published figure like "12.9B" stands for
the interval [12.85B, 12.95B); the bar is <= 1 % error beyond that interval.
"""

from __future__ import annotations

import json
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from capbench_models import PUBLISHED_CONFIGS

from capbench_core.analytics.model_spec import spec_from_config, spec_from_path
from capbench_core.errors import CapbenchError
from tests.conftest import run_cli

CONFIGS = PUBLISHED_CONFIGS

# file, published total, published active, does the vendor's active figure include the input embedding?
PUBLISHED = [
    ("mixtral-8x7b", "46.7", "12.9", True),
    ("deepseek-v2-lite", "15.7", "2.4", False),
    ("qwen3-30b-a3b", "30.5", "3.3", True),
    ("olmoe-1b-7b-0924", "6.9", "1.3", True),
    ("deepseek-v3", "671", "37", False),
    ("gpt-oss-120b", "116.8", "5.1", False),
    ("gpt-oss-20b", "20.9", "3.6", False),
    ("dbrx-base", "132", "36", True),
    ("phi-3.5-moe-instruct", "41.9", "6.6", True),
    ("qwen1.5-moe-a2.7b", "14.3", "2.7", True),
    ("llama-3-8b", "8.03", "8.03", True),
]


def error_beyond_rounding(value: float, published: str) -> float:
    """Relative distance from `value` to the interval a rounded figure stands for."""
    d = Decimal(published)
    half = Decimal(1).scaleb(d.as_tuple().exponent) / 2
    low, high = float(d - half) * 1e9, float(d + half) * 1e9
    outside = max(low - value, value - high, 0.0)
    return outside / (float(d) * 1e9)


@pytest.mark.parametrize("name,total,active,with_embed", PUBLISHED)
def test_counts_match_published_figures(name: str, total: str, active: str, with_embed: bool) -> None:
    spec = spec_from_path(CONFIGS / f"{name}.json")
    assert error_beyond_rounding(spec.total_params, total) <= 0.01, spec.total_params
    measured = spec.active_params if with_embed else spec.active_params_no_embed
    assert error_beyond_rounding(measured, active) <= 0.01, measured


def test_rounding_interval_rejects_a_wrong_count() -> None:
    assert error_beyond_rounding(12.9e9, "12.9") == 0
    assert error_beyond_rounding(13.2e9, "12.9") > 0.01


def test_mixtral_exact_breakdown() -> None:
    s = spec_from_path(CONFIGS / "mixtral-8x7b.json")
    expert = 3 * 4096 * 14336
    assert s.components["routed_experts"].total == 32 * 8 * expert
    assert s.components["routed_experts"].active == 32 * 2 * expert
    assert s.components["attention"].total == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
    assert s.num_experts == 8 and s.top_k == 2 and s.sparsity == 0.75
    assert s.kv_bytes_per_token("bfloat16") == 32 * 2 * 8 * 128 * 2
    norms = 32 * 2 * 4096 + 4096  # elementwise: no matmul FLOPs
    assert s.flops_per_token(0) == 2 * (s.active_params_no_embed - norms)
    assert s.flops_per_token(1000) - s.flops_per_token(0) == 2 * 32 * (4096 + 4096) * 1000
    assert s.sliding_window == 0 and s.kv_bytes_at_context(1000) == 1000 * s.kv_bytes_per_token()


@pytest.mark.parametrize("name,layers,sliding", [("gpt-oss-20b", 24, 12), ("gpt-oss-120b", 36, 18)])
def test_gpt_oss_sliding_layers_keep_and_read_at_most_the_window(name: str, layers: int, sliding: int) -> None:
    """Hand counts: KV per token per layer = 2 x 8 KV heads x 64 = 1024 elements; half the layers
    (layer_types) attend to the last 128 tokens only."""
    s = spec_from_path(CONFIGS / f"{name}.json")
    assert (s.num_layers, s.sliding_layers, s.sliding_window) == (layers, sliding, 128)
    full = layers - sliding
    assert s.kv_bytes_per_token("bfloat16") == layers * 1024 * 2  # per token, every layer: unchanged meaning
    for context in (64, 128, 1024, 8192):
        held = full * context + sliding * min(context, 128)
        assert s.kv_bytes_at_context(context, "bfloat16") == held * 1024 * 2
        score_value = 64 * 64 + 64 * 64
        assert s.flops_per_token(context) - s.flops_per_token(0) == 2 * score_value * held
    data = json.loads(run_cli("model", "inspect", str(CONFIGS / f"{name}.json"), "--context-len", "8192", "--json",
                              check=True).stdout)
    assert data["kv_bytes_at_context"] == (full * 8192 + sliding * 128) * 1024 * 2
    assert data["sliding_window"] == 128 and data["sliding_layers"] == sliding


def test_a_model_without_a_window_keeps_the_full_count_in_inspect() -> None:
    data = json.loads(run_cli("model", "inspect", str(CONFIGS / "qwen3-30b-a3b.json"), "--context-len", "8192",
                              "--json", check=True).stdout)
    assert data["kv_bytes_at_context"] == 8192 * data["kv_bytes_per_token"] and data["sliding_window"] is None


def test_qwen_window_applies_from_max_window_layers_on() -> None:
    cfg = json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=4096, max_window_layers=28)
    s = spec_from_config(cfg)
    assert (s.sliding_window, s.sliding_layers) == (4096, 48 - 28)
    cfg["use_sliding_window"] = False
    assert spec_from_config(cfg).sliding_layers == 0


def test_deepseek_mla_flops_in_both_forms() -> None:
    """Materialised (capbench's flops_per_token): q.k over 128 heads x (128 + 64) and p.v over 128 x 128 per
    cached token; absorbed (what decode kernels run): against the 512-dim latent (+64 RoPE dims) per head."""
    s = spec_from_path(CONFIGS / "deepseek-v3.json")
    per_token = s.flops_per_token(1) - s.flops_per_token(0)
    assert per_token == 2 * 61 * (128 * 192 + 128 * 128)
    absorbed = s.flops_per_token_mla_absorbed(1) - s.flops_per_token_mla_absorbed(0)  # type: ignore[operator]
    assert absorbed == 2 * 61 * 128 * ((512 + 64) + 512)
    assert s.flops_per_token_mla_absorbed(0) == s.flops_per_token(0)
    assert spec_from_path(CONFIGS / "mixtral-8x7b.json").flops_per_token_mla_absorbed(100) is None


def test_deepseek_mla_kv_and_dense_layers() -> None:
    s = spec_from_path(CONFIGS / "deepseek-v3.json")
    assert s.moe_layers == 58 and s.num_layers == 61
    assert s.shared_experts == 1
    assert s.kv_bytes_per_token("bfloat16") == 61 * (512 + 64) * 2
    lite = spec_from_path(CONFIGS / "deepseek-v2-lite.json")
    assert lite.moe_layers == 26 and lite.shared_experts == 2


def test_dense_model_is_the_e1_case() -> None:
    s = spec_from_path(CONFIGS / "llama-3-8b.json")
    assert s.num_experts == 1 and s.sparsity == 0.0 and s.total_params == s.active_params


def test_unknown_architecture_names_the_supported_ones() -> None:
    with pytest.raises(CapbenchError, match="unsupported architecture.*mixtral.*qwen3_moe"):
        spec_from_config({"model_type": "mamba"})


def test_missing_field_names_it() -> None:
    cfg = json.loads((CONFIGS / "mixtral-8x7b.json").read_text())
    del cfg["num_local_experts"]
    with pytest.raises(CapbenchError, match="num_local_experts"):
        spec_from_config(cfg, "broken")


def test_inspect_json_contract_keys() -> None:
    proc = run_cli("model", "inspect", str(CONFIGS / "qwen3-30b-a3b.json"), "--json", check=True)
    data = json.loads(proc.stdout)
    for key in ("total_params", "active_params", "num_experts", "top_k", "sparsity", "flops_per_token",
                "kv_bytes_per_token"):
        assert key in data
    assert data["num_experts"] == 128 and data["top_k"] == 8
    assert data["name"] == "qwen3-30b-a3b"


def test_inspect_human_view_shows_components() -> None:
    proc = run_cli("model", "inspect", "tiny-moe", check=True)
    assert "routed_experts" in proc.stdout and "attention" in proc.stdout


def test_inspect_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    proc = run_cli("model", "inspect", str(bad))
    assert proc.returncode == 1
    assert "is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("model", "inspect", "tiny-mox")
    assert "did you mean 'tiny-moe'" in proc.stderr


def test_cli_help_does_not_import_engines() -> None:
    code = ("import sys; from capbench_core import cli; "
            "print([m for m in ('torch', 'vllm', 'sglang', 'llama_cpp', 'transformers') if m in sys.modules])")
    out = subprocess.run(["python", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""torch_moe against transformers' own implementation of every MoE family it runs.

Each family (and the variants that exercise RoPE scaling, sliding windows and grouped routing) is a random
float32 checkpoint built by transformers from the published config, shrunk; every parameter (biases, sinks,
correction biases included) is perturbed so no path hides behind a zero. torch_moe must give the same logits
(max |difference| <= 1e-4), the same greedy tokens over batched decode from its KV cache, and the same
per-expert routing on every decode step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from capbench_core.errors import CapbenchError
from capbench_torch_moe.arch import FAMILIES, MoEConfig
from capbench_torch_moe.loading import load_hf
from capbench_torch_moe.model import ForwardStats, KVCache
from tests.checkpoints import CONFIGS, cache_root
from tests.conftest import ROOT

RECIPE = 1  # bump when the shrinking below changes
PUBLISHED = {"qwen3_moe": "qwen3-30b-a3b.json", "qwen2_moe": "qwen1.5-moe-a2.7b.json", "mixtral": "mixtral-8x7b.json",
             "olmoe": "olmoe-1b-7b-0924.json", "deepseek_v2": "deepseek-v2-lite.json",
             "deepseek_v3": "deepseek-v3.json", "gpt_oss": "gpt-oss-20b.json", "phimoe": "phi-3.5-moe-instruct.json"}
#: variant -> (family, config changes on top of the shrunk published config)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-yarn": ("qwen3_moe", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32768}}),
    "qwen2_moe-sliding": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    "mixtral-sliding": ("mixtral", {"sliding_window": 8}),
    "mixtral-llama3": ("mixtral", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192}}),
    "olmoe-clip": ("olmoe", {"clip_qkv": 0.5}),
    "deepseek_v2-yarn": ("deepseek_v2", {"rope_scaling": {
        "type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096}}),
    "deepseek_v2-grouped": ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3,
                                            "routed_scaling_factor": 16.0}),
    "deepseek_v3": ("deepseek_v3", {}),
    "gpt_oss-sliding": ("gpt_oss", {"sliding_window": 8}),
    "phimoe-longrope": ("phimoe", {"rope_scaling": {
        "type": "longrope", "short_factor": [1.0 + i / 16 for i in range(16)],
        "long_factor": [2.0 + i for i in range(16)], "short_mscale": 1.1, "long_mscale": 1.2,
        "original_max_position_embeddings": 4096}}),
}


def shrunk(family: str, changes: dict[str, Any]) -> dict[str, Any]:
    """The published config, 3 layers of width 128, vocab 512, MLA and expert widths cut; routing kept."""
    c: dict[str, Any] = json.loads((CONFIGS / PUBLISHED[family]).read_text())
    c.update(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=512)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "quantization_config", "num_nextn_predict_layers"):
        c.pop(key, None)
    if "head_dim" in c:
        c["head_dim"] = 32
    if "moe_intermediate_size" in c:
        c["moe_intermediate_size"] = 32
    if "shared_expert_intermediate_size" in c:
        c["shared_expert_intermediate_size"] = 48
    if family.startswith("deepseek"):
        c.update(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
                 num_key_value_heads=4)
        if c.get("q_lora_rank"):
            c["q_lora_rank"] = 48
    if "layer_types" in c:
        c["layer_types"] = c["layer_types"][:3]
    c.update(changes)
    return c


def reference(variant: str) -> Path:
    """The variant's float32 checkpoint, built once per (recipe, transformers version)."""
    family, changes = VARIANTS[variant]
    out = cache_root() / f"exact-{variant}-r{RECIPE}-tf{transformers.__version__}"
    if (out / "done").is_file():
        return out
    config = shrunk(family, changes)
    hf_config = transformers.CONFIG_MAPPING[config["model_type"]](
        **{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        for p in [*model.parameters(), *(b for n, b in model.named_buffers() if "correction" in n)]:
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    (out / "done").write_text("ok")
    return out


def _transformers(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _decode(model: Any, prompts: list[list[int]], steps: int, stats: list[ForwardStats] | None = None) -> list[Any]:
    """Greedy decode of all prompts together from torch_moe's KV cache -> per prompt (tokens, logits [steps, V])."""
    device = model.device
    cache = KVCache(model.cfg, len(prompts), 64, torch.float32, device)
    tokens: list[list[int]] = []
    logits: list[list[Any]] = []
    with torch.no_grad():
        for slot, prompt in enumerate(prompts):
            kv: list[tuple[Any, Any]] = []
            last = model(torch.tensor([prompt], device=device), kv_out=kv)[0, -1]
            cache.store_prefill(slot, kv)
            tokens.append([int(last.argmax())])
            logits.append([last])
        for step in range(steps - 1):
            step_stats = ForwardStats()
            out = model.decode(torch.tensor([t[-1] for t in tokens], device=device),
                               torch.tensor([len(p) + step for p in prompts], device=device), cache, step_stats)
            if stats is not None:
                stats.append(step_stats)
            for i, row in enumerate(out):
                tokens[i].append(int(row.argmax()))
                logits[i].append(row)
    return [(t, torch.stack(lg)) for t, lg in zip(tokens, logits)]


PROMPTS = [[int(t) for t in torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1))],
           [int(t) for t in torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(2))]]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_family_matches_transformers(variant: str) -> None:
    path = reference(variant)
    ref, ours = _transformers(path), load_hf(path)
    ids = torch.tensor([PROMPTS[0], PROMPTS[1] + PROMPTS[0][:7]])
    with torch.no_grad():
        prefill = (ref(ids).logits - ours(ids)).abs().max().item()
    decoded = _decode(ours, PROMPTS, steps=10)
    worst = prefill
    for prompt, (tokens, logits) in zip(PROMPTS, decoded):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                    pad_token_id=0)[0, len(prompt):].tolist()
            full = ref(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
        assert tokens == expected, variant
        worst = max(worst, (full - logits).abs().max().item())
    _record("logits_max_abs_diff", variant, worst)
    assert worst <= 1e-4, (variant, worst)


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen2_moe-sliding", "mixtral-sliding", "olmoe-clip",
                                     "deepseek_v2-grouped", "deepseek_v3", "gpt_oss-sliding", "phimoe-longrope"])
def test_router_counts_match_transformers_per_decode_step(variant: str) -> None:
    """The tokens per (layer, expert) torch_moe counts on each decode step are the experts transformers' own
    router picks on that step (grouped, biased and sparsemixer routers included; dense layers have none)."""
    path = reference(variant)
    ref, ours = _transformers(path), load_hf(path)
    picked: list[list[int]] = []
    for module in ref.modules():
        if type(module).__name__.lower().endswith("router"):
            module.register_forward_hook(lambda _m, args, out: picked.append(out[-1].reshape(-1).tolist())
                                         if args[0].reshape(-1, args[0].shape[-1]).shape[0] == 1 else None)
    with torch.no_grad():
        ref.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                     pad_token_id=0)
    steps: list[ForwardStats] = []
    _decode(ours, PROMPTS[:1], steps=10, stats=steps)
    layers = ours.cfg.num_moe_layers
    assert len(picked) == len(steps) * layers == 9 * layers
    for step, stats in enumerate(steps):
        for layer in range(layers):
            counts = [0] * ours.cfg.num_experts
            for expert in picked[step * layers + layer]:
                counts[expert] += 1
            assert stats.expert_tokens[layer] == counts, (variant, step, layer)
            assert stats.distinct_experts[layer] == ours.cfg.top_k


def test_gpt_oss_mxfp4_experts_dequantise_as_transformers_does(tmp_path: Path) -> None:
    """A gpt-oss checkpoint with MXFP4 experts (quantized here, laid out as the published ones) loads to the
    same logits as transformers' own dequantization of it."""
    pytest.importorskip("accelerate")  # transformers' MXFP4 loader needs it
    from safetensors.torch import load_file, save_file

    src = reference("gpt_oss-sliding")
    weights = load_file(src / "model.safetensors")
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _mxfp4(weights.pop(name).transpose(1, 2).contiguous())
        weights[name + "_blocks"], weights[name + "_scales"] = blocks, scales
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        diff = (_transformers(tmp_path)(ids).logits - load_hf(tmp_path)(ids)).abs().max().item()
    _record("logits_max_abs_diff", "gpt_oss-mxfp4", diff)
    assert diff <= 1e-4


def _mxfp4(w: Any) -> tuple[Any, Any]:
    """Round [.., K] to MXFP4: 32-value blocks sharing a power-of-two scale, two 4-bit codes per byte."""
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    exponent = torch.floor(torch.log2(blocks.abs().amax(-1).clamp(min=2.0 ** -100))) - 2
    codes = (blocks / torch.exp2(exponent).unsqueeze(-1)).unsqueeze(-1).sub(values).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def _record(key: str, variant: str, value: float) -> None:
    """Figures for the closing notes, when asked for ($CAPBENCH_FAMILIES_OUT: a JSON-lines file)."""
    out = os.environ.get("CAPBENCH_FAMILIES_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"variant": variant, key: value}) + "\n")


# --- strictness -----------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path, **config: Any) -> Path:
    import shutil

    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    data.update(config)
    (dst / "config.json").write_text(json.dumps(data))
    return dst


def test_unimplemented_rope_scaling_is_refused_by_name(tmp_path: Path) -> None:
    path = _copy(reference("qwen3_moe"), tmp_path / "m", rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                 rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6})
    with pytest.raises(CapbenchError, match="rope_scaling type 'dynamic'"):
        load_hf(path)


def test_unknown_config_field_is_refused_by_name(tmp_path: Path) -> None:
    path = _copy(reference("mixtral-sliding"), tmp_path / "m", attention_logit_softcapping=30.0)
    with pytest.raises(CapbenchError, match="attention_logit_softcapping"):
        load_hf(path)


def test_stray_and_missing_tensors_are_refused_by_name(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = _copy(reference("qwen3_moe"), tmp_path / "stray")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.mlp.extra_router.weight"] = torch.zeros(4, 4)
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CapbenchError, match=r"tensor 'model\.layers\.0\.mlp\.extra_router\.weight'"):
        load_hf(path)
    path = _copy(reference("qwen3_moe"), tmp_path / "missing")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_norm.weight"]
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CapbenchError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight missing"):
        load_hf(path)


def test_quantized_checkpoints_other_than_gpt_oss_mxfp4_are_refused(tmp_path: Path) -> None:
    path = _copy(reference("deepseek_v3"), tmp_path / "m",
                 quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(CapbenchError, match=r"quantized \(fp8\)"):
        load_hf(path)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_every_published_config_is_read_or_refused_with_the_reason(name: str) -> None:
    from capbench_core.analytics.checkpoint import read_config

    config = read_config(CONFIGS / name)
    if config["model_type"] in FAMILIES:
        cfg = MoEConfig.from_hf(config)
        assert cfg.num_experts > 1 and cfg.num_moe_layers >= 1
    else:
        with pytest.raises(CapbenchError, match=f"cannot run model_type '{config['model_type']}'"):
            MoEConfig.from_hf(config)


def test_latent_attention_caches_the_compressed_latent() -> None:
    cfg = MoEConfig.from_hf(json.loads((reference("deepseek_v3") / "config.json").read_text()))
    assert cfg.mla is not None
    cache = KVCache(cfg, slots=3, max_len=40, dtype=torch.bfloat16)
    per_token = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim  # not heads x (nope + rope + v)
    assert cache.nbytes == cfg.num_layers * 3 * 40 * per_token * 2


# --- loading memory -------------------------------------------------------------------------------------

PEAK = """
import json, sys, torch
from capbench_torch_moe.loading import load_hf
def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key))) * 1024
before = status("VmRSS:")
model = load_hf(__import__("pathlib").Path(sys.argv[1]), getattr(torch, sys.argv[2]))
print(json.dumps({"before": before, "peak": status("VmHWM:"),
                  "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def test_loading_peak_memory_stays_under_twice_the_checkpoint(tmp_path: Path) -> None:
    """A ~500 MB single-file checkpoint: the load adds the model and at most one tensor, not a second copy."""
    from capbench_torch_moe.random_init import make_checkpoint

    path = make_checkpoint({"hidden_size": 512, "num_hidden_layers": 4, "num_experts": 40,
                            "moe_intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
                            "head_dim": 64}, tmp_path / "big")
    size = (path / "model.safetensors").stat().st_size
    assert size > 450e6
    proc = subprocess.run([sys.executable, "-c", PEAK, str(path), "float32"], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    got = json.loads(proc.stdout)
    added = got["peak"] - got["before"]
    _record("load_peak_over_checkpoint", f"qwen3_moe {size / 1e6:.0f} MB float32", added / size)
    assert added < 2 * size, (added, size)


# --- CUDA -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3", "gpt_oss-sliding"])
def test_cuda_matches_cpu(variant: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    path = reference(variant)
    cpu, gpu = load_hf(path), load_hf(path, device="cuda")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        diff = (cpu(ids) - gpu(ids.cuda()).cpu()).abs().max().item()
    assert diff <= 1e-3, diff
    assert _decode(gpu, PROMPTS, 6)[0][0] == _decode(cpu, PROMPTS, 6)[0][0]

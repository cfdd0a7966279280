"""Published MoE configs as analytics-only models: ``capbench model inspect Qwen3-30B-A3B-config``,
``capbench study placement --model DeepSeek-V3-config``. Each is the config.json its authors published on the
Hugging Face Hub (configs/SOURCES.md): enough to count parameters, bytes and FLOPs, not to run — there are no
weights."""

from __future__ import annotations

from pathlib import Path

from capbench_core import hookimpl
from capbench_core.contract.backend import ModelRef
from capbench_core.contract.registry import ModelRegistry

PUBLISHED_CONFIGS = Path(__file__).resolve().parent / "configs"
#: model name -> (config file, Hub repository)
PUBLISHED = {
    "Qwen3-30B-A3B-config": ("qwen3-30b-a3b.json", "Qwen/Qwen3-30B-A3B"),
    "Qwen1.5-MoE-A2.7B-config": ("qwen1.5-moe-a2.7b.json", "Qwen/Qwen1.5-MoE-A2.7B"),
    "Mixtral-8x7B-config": ("mixtral-8x7b.json", "mistralai/Mixtral-8x7B-v0.1"),
    "DeepSeek-V2-Lite-config": ("deepseek-v2-lite.json", "deepseek-ai/DeepSeek-V2-Lite"),
    "DeepSeek-V3-config": ("deepseek-v3.json", "deepseek-ai/DeepSeek-V3"),
    "OLMoE-1B-7B-config": ("olmoe-1b-7b-0924.json", "allenai/OLMoE-1B-7B-0924"),
    "gpt-oss-20b-config": ("gpt-oss-20b.json", "openai/gpt-oss-20b"),
    "gpt-oss-120b-config": ("gpt-oss-120b.json", "openai/gpt-oss-120b"),
    "Phi-3.5-MoE-config": ("phi-3.5-moe-instruct.json", "microsoft/Phi-3.5-MoE-instruct"),
    "DBRX-config": ("dbrx-base.json", "databricks/dbrx-base"),
}


@hookimpl
def register_models(register: ModelRegistry) -> None:
    for name, (file, repo) in PUBLISHED.items():
        register.add_model(ModelRef(name=name, path=PUBLISHED_CONFIGS / file,
                                    description=f"{repo}'s published config.json (analytics only: no weights)"))

"""Random-init Qwen3-MoE checkpoints with the tiny model's tokenizer: models of any shape to measure
serving speed on (the sparsity study, the decode benchmark). Their outputs are noise; their bytes and
FLOPs are those of a real model of that shape."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capbench_torch_moe.commands import tiny_model_dir


def tiny_config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads((tiny_model_dir() / "config.json").read_text())
    return config


def make_checkpoint(config: Mapping[str, Any], out: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors (seeded random weights) and the tiny tokenizer to ``out``;
    an existing complete checkpoint with the same config is kept."""
    from safetensors.torch import save_file

    from capbench_torch_moe.loading import to_hf_state_dict
    from capbench_torch_moe.model import MoEConfig, MoETransformer, init_weights

    full = {**tiny_config(), **config}
    if (out / "model.safetensors").exists() and (out / "config.json").exists() and \
            json.loads((out / "config.json").read_text()) == full:
        return out
    model = MoETransformer(MoEConfig.from_hf(full))
    init_weights(model, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), str(out / "model.safetensors"))
    src = tiny_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, out / name)
    (out / "config.json").write_text(json.dumps(full))  # last: its presence marks a complete checkpoint
    return out

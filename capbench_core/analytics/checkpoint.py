"""Model intake: what `--model` names (a registered model, a checkpoint directory, a config.json or a GGUF
file) and the one reader of a checkpoint's config.json, used by the analytics and by every backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from capbench_core.contract.backend import ModelRef
from capbench_core.contract.registry import PluginManager
from capbench_core.errors import CapbenchError


def model_ref(pm: PluginManager, name: str) -> ModelRef:
    """A model directory, config file or GGUF when the path exists, else a registered model (forgivingly)."""
    path = Path(name)
    if name not in pm.models.names() and path.exists():
        directory = path.parent if path.is_file() and path.suffix != ".gguf" else path
        label = path.stem if path.is_file() and path.stem != "config" else directory.resolve().name
        return ModelRef(name=label, path=directory.resolve())
    return pm.models.get(name)


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a model directory (or the file itself), with errors naming the file."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CapbenchError(f"{file} is missing: pass a model name, a model directory (with its config.json) or a "
                            f"config.json")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CapbenchError(f"{file} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise CapbenchError(f"{file} must contain a JSON object")
    return data

"""The JSON Schemas committed under ``schemas/``: results, and sweep matrix files. Generated from the models
(``python -m capbench_core.publish.schemas [DIR]``); a test fails when the committed files drift."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from capbench_core.contract.records import RunResult
from capbench_core.studies.sweep import SweepFile

SCHEMAS: dict[str, type[BaseModel]] = {"run_result": RunResult, "sweep": SweepFile}


def schema_texts() -> dict[str, str]:
    """File name -> JSON Schema text, as committed under schemas/."""
    return {f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
            for name, model in SCHEMAS.items()}


def write_schemas(directory: Path) -> list[Path]:
    written = []
    for name, text in schema_texts().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    from capbench_schemas import SCHEMA_DIR

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR
    for p in write_schemas(target):
        print(p)

"""capbench_schemas: JSON Schemas generated from capbench_core.results (do not edit by hand).

Regenerate with ``python -m capbench_core.publish.schemas``.
"""

from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent

"""Every field a bundle carries has a row in docs/leaderboard.md saying how the verifier treats it (re-derived,
bounded or reported): a new field in the result schema cannot slip in unverified (issue 32)."""

from __future__ import annotations

import json
import re
from typing import Any

from capbench_core.publish.verify import REPORTED_ONLY
from capbench_schemas import SCHEMA_DIR
from tests.conftest import ROOT

KINDS = {"re-derived", "bounded", "reported"}


def schema_fields() -> set[str]:
    """Dotted paths of every property of the result schema, nested records included (`[]`: list items,
    `*`: map values)."""
    schema = json.loads((SCHEMA_DIR / "run_result.schema.json").read_text())
    found: set[str] = set()

    def walk(node: dict[str, Any], prefix: str) -> None:
        if "$ref" in node:
            walk(schema["$defs"][node["$ref"].rsplit("/", 1)[1]], prefix)
        for key in ("anyOf", "allOf", "oneOf"):
            for sub in node.get(key, []):
                walk(sub, prefix)
        for name, sub in node.get("properties", {}).items():
            path = f"{prefix}.{name}" if prefix else name
            found.add(path)
            walk(sub, path)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{prefix}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{prefix}.*")

    walk(schema, "")
    return found


def documented() -> dict[str, str]:
    """field -> kind, from the table under "Every field of a bundle"."""
    text = (ROOT / "docs" / "leaderboard.md").read_text()
    table = text.split("#### Every field of a bundle", 1)[1].split("\n\n| field |", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] in KINDS, line
        for name in re.findall(r"`([^`]+)`", cells[0]):
            assert name not in rows, f"{name} has two rows"
            rows[name] = cells[1]
    return rows


def test_the_walk_sees_the_nested_records() -> None:
    fields = schema_fields()
    assert {"requests[].chunk_offsets_ns", "hardware.peak_flops_tflops.*.value", "placement.weights.*.tier",
            "decode_steps.distinct_experts", "metrics.unverified"} <= fields


def test_every_field_of_the_result_schema_has_a_row() -> None:
    missing = sorted(schema_fields() - set(documented()))
    assert not missing, f"fields without a row in docs/leaderboard.md's table (re-derived / bounded / reported): " \
                        f"{missing}"


def test_the_table_names_only_fields_that_exist() -> None:
    assert not sorted(set(documented()) - schema_fields())


def test_what_the_verifier_labels_reported_the_table_calls_reported() -> None:
    rows = documented()
    assert all(rows[f"metrics.{name}"] == "reported" for name in REPORTED_ONLY)


def test_a_figure_the_verifier_does_not_know_is_labelled_not_trusted(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A field added to Metrics without a rule in the verifier is stored as reported, not verified."""
    from capbench_core.publish import verify
    from tests.test_store_schema import make_result

    monkeypatch.setattr(verify, "CHECKED_METRICS", verify.CHECKED_METRICS - {"slo_attainment"})
    labels = verify.unverified(make_result(slo_attainment=0.5))
    assert labels["metrics.slo_attainment"].startswith("not checked")
    assert "metrics.ttft_ms_p50" not in verify.unverified(make_result(ttft_ms_p50=1.0))

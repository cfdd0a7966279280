"""Results schema drift and the SQLite store (real file, alembic migrations)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
from sqlalchemy import create_engine, inspect, text

from capbench_core.errors import CapbenchError
from capbench_core.results import (
    SCHEMA_VERSION,
    HardwareSpec,
    Metrics,
    ModelRecord,
    Peak,
    RunResult,
    WorkloadRecord,
    schema_texts,
)
from capbench_core.store import Store
from capbench_schemas import SCHEMA_DIR


def make_result(run_id: str = "00000000-0000-0000-0000-000000000001", **metrics: float) -> RunResult:
    return RunResult(
        run_id=run_id, started_at=datetime(2026, 1, 1, tzinfo=timezone.utc), status="complete",
        capbench_version="0.1.0", backend="torch_moe",
        model=ModelRecord(name="m", path="/m", architecture="qwen3_moe", total_params=10, active_params=5,
                          active_params_no_embed=4, num_experts=8, top_k=2, sparsity=0.75, dtype="float32"),
        hardware=HardwareSpec(devices=[], cpu_model="cpu", cpu_cores=2, host_memory_bytes=1, fingerprint="fp",
                              peak_mem_bw_gbps=Peak(value=10.0, source="measured")),
        workload=WorkloadRecord(task="arith", hash="h", num_requests=1, warmup_requests=0, concurrency=1,
                                sampling={"temperature": 0.0}),
        metrics=Metrics(**metrics))


def test_committed_schemas_match_the_models() -> None:
    for name, expected in schema_texts().items():
        committed = (SCHEMA_DIR / name).read_text()
        assert committed == expected, f"schemas/{name} is stale: run python -m capbench_core.results"


def test_a_result_validates_against_the_committed_schema() -> None:
    schema = json.loads((SCHEMA_DIR / "run_result.schema.json").read_text())
    doc = make_result(ttft_ms_p50=1.5).model_dump(mode="json")
    jsonschema.validate(doc, schema)
    doc["metrics"]["ttft_ms_p50"] = "fast"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)
    assert doc["schema_version"] == SCHEMA_VERSION


def test_store_roundtrip_and_idempotence(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    result = make_result(ttft_ms_p50=12.5, accuracy=0.9)
    assert store.save(result) is True
    assert store.save(result) is False
    again = Store(url)  # reopening migrates nothing and keeps the data
    [back] = again.runs()
    assert back == result and again.get(result.run_id) == result
    with create_engine(url).connect() as conn:
        row = conn.execute(text("select ttft_ms_p50, accuracy, s_mbu, status from runs")).one()
        version = conn.execute(text("select version_num from alembic_version")).scalar()
    assert tuple(row) == (12.5, 0.9, None, "complete")
    assert version == "0001"


def test_partial_result_can_be_completed_under_the_same_id(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    partial = make_result()
    partial.status = "partial"
    store.save(partial)
    partial.status = "complete"
    store.save(partial)
    assert [r.status for r in store.runs()] == ["complete"]


def test_filters(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    store.save(make_result("00000000-0000-0000-0000-000000000001"))
    other = make_result("00000000-0000-0000-0000-000000000002")
    other.backend = "llamacpp"
    store.save(other)
    assert [r.backend for r in store.runs(backend="llamacpp")] == ["llamacpp"]
    assert store.runs(model="nope") == []


def test_schema_has_indexed_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    Store(url)
    indexes = {i["name"] for i in inspect(create_engine(url)).get_indexes("runs")}
    assert {"ix_runs_group", "ix_runs_started_at"} <= indexes


def test_bad_urls_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CapbenchError, match="cannot open database"):
        Store("nosuchdb://x")
    with pytest.raises(CapbenchError, match="cannot open database"):
        Store(f"sqlite:///{tmp_path / 'missing-dir' / 'r.db'}")

"""Results schema drift and the SQLite store (real file, alembic migrations)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
from sqlalchemy import create_engine, inspect, text

from capbench_core.contract.records import (
    SCHEMA_VERSION,
    HardwareSpec,
    Metrics,
    ModelRecord,
    Peak,
    RunResult,
    WorkloadRecord,
)
from capbench_core.errors import CapbenchError
from capbench_core.publish.schemas import schema_texts
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
        assert committed == expected, f"schemas/{name} is stale: run python -m capbench_core.publish.schemas"


def test_a_result_validates_against_the_committed_schema() -> None:
    schema = json.loads((SCHEMA_DIR / "run_result.schema.json").read_text())
    doc = make_result(ttft_ms_p50=1.5).model_dump(mode="json")
    jsonschema.validate(doc, schema)
    doc["metrics"]["ttft_ms_p50"] = "fast"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)
    assert doc["schema_version"] == SCHEMA_VERSION


def test_store_roundtrip_and_idempotence(store_url: str) -> None:
    store = Store(store_url)
    result = make_result(ttft_ms_p50=12.5, accuracy=0.9)
    assert store.save(result) is True
    assert store.save(result) is False
    again = Store(store_url)  # reopening migrates nothing and keeps the data
    [back] = again.runs()
    assert back == result and again.get(result.run_id) == result
    engine = create_engine(store_url)
    with engine.connect() as conn:
        row = conn.execute(text("select ttft_ms_p50, accuracy, s_mbu, status, origin from runs")).one()
        version = conn.execute(text("select version_num from alembic_version")).scalar()
    engine.dispose()
    assert tuple(row) == (12.5, 0.9, None, "complete", "local")
    assert version == HEAD


def test_partial_result_can_be_completed_under_the_same_id(store_url: str) -> None:
    store = Store(store_url)
    partial = make_result()
    partial.status = "partial"
    assert store.save(partial)
    partial.status = "complete"
    assert store.save(partial)
    assert [r.status for r in store.runs()] == ["complete"] and store.count() == 1


def test_filters(store_url: str) -> None:
    store = Store(store_url)
    store.save(make_result("00000000-0000-0000-0000-000000000001"))
    other = make_result("00000000-0000-0000-0000-000000000002")
    other.backend = "llamacpp"
    other.hardware.fingerprint = "ab%_cd"
    store.save(other)
    assert [r.backend for r in store.runs(backend="llamacpp")] == ["llamacpp"]
    assert store.runs(model="nope") == []
    assert [r.backend for r in store.runs(hardware="ab%")] == ["llamacpp"]
    assert store.runs(hardware="a%") == []  # a prefix, not a pattern


def test_imports_are_added_once_and_conflicts_keep_the_stored_run(store_url: str) -> None:
    store = Store(store_url)
    result = make_result(ttft_ms_p50=1.0)
    assert store.add_imported(result, "a.json") == "added"
    assert store.add_imported(result, "b.json") == "duplicate"
    changed = result.model_copy(deep=True)
    changed.metrics.ttft_ms_p50 = 2.0
    assert store.add_imported(changed, "c.json") == "conflict"
    assert store.count() == 1 and store.get(result.run_id) == result


def test_schema_has_indexed_columns(store_url: str) -> None:
    Store(store_url)
    engine = create_engine(store_url)
    indexes = {i["name"] for i in inspect(engine).get_indexes("runs")}
    engine.dispose()
    assert {"ix_runs_group", "ix_runs_started_at"} <= indexes


def _alembic(url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from capbench_core.store import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision) if revision != "base" else command.downgrade(cfg, revision)
    engine.dispose()


def _revisions() -> list[str]:
    from alembic.script import ScriptDirectory

    from capbench_core.store import MIGRATIONS

    return [s.revision for s in reversed(list(ScriptDirectory(str(MIGRATIONS)).walk_revisions()))]


HEAD = _revisions()[-1]


@pytest.mark.parametrize("start", _revisions()[:-1])
def test_migrates_from_every_revision_keeping_the_runs(store_url: str, start: str) -> None:
    """A database left at any earlier revision, holding a run, opens at head with the run intact."""
    _alembic(store_url, start)
    result = make_result(ttft_ms_p50=3.0)
    result.workload.rate_rps = 2.5
    engine = create_engine(store_url)
    columns = {"run_id": result.run_id, "content_hash": result.content_hash(), "schema_version": 1,
               "started_at": result.started_at, "status": "complete", "backend": "torch_moe", "model": "m",
               "task": "arith", "workload_hash": "h", "concurrency": 1, "hardware_fingerprint": "fp",
               "ttft_ms_p50": 3.0, "result_json": result.model_dump_json()}
    if start >= "0002":  # what that revision's code also wrote
        columns.update(capbench_version="0.1.0", rate_rps=2.5)
    with engine.begin() as conn:  # a row as the code of that revision wrote it
        conn.execute(text(f"insert into runs ({', '.join(columns)}) values ({', '.join(':' + c for c in columns)})"),
                     columns)
    engine.dispose()
    store = Store(store_url)
    assert store.runs() == [result]
    engine = create_engine(store_url)
    with engine.connect() as conn:
        row = conn.execute(text("select capbench_version, rate_rps, origin from runs")).one()
        version = conn.execute(text("select version_num from alembic_version")).scalar()
    engine.dispose()
    assert tuple(row) == ("0.1.0", 2.5, "local") and version == HEAD


def test_bad_urls_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CapbenchError, match="cannot open database"):
        Store("nosuchdb://x")
    with pytest.raises(CapbenchError, match="cannot open database"):
        Store(f"sqlite:///{tmp_path / 'missing-dir' / 'r.db'}")


def test_a_plain_path_is_a_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store("results.db")
    assert store.url == f"sqlite:///{tmp_path / 'results.db'}"
    assert store.runs() == [] and (tmp_path / "results.db").is_file()
    store.engine.dispose()

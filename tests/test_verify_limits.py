"""Hostile files and hostile paths (issue 32): each gives one line on stderr, exit 1 or 2, no traceback, and
writes nothing — no row, no database, no file. Replays (the same raw records under a fresh run id) are refused
within a bundle, across bundles and across imports."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from capbench_core.store import Store
from tests.conftest import run_cli
from tests.test_bundles import _bundle, _rehash, _run


def one_line_refusal(proc: Any, message: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and message in lines[0], proc.stderr


def _deep(path: Path, levels: int) -> Path:
    path.write_text('{"format": "capbench-results", "format_version": 1, "runs": ' + "[" * levels + "]" * levels
                    + "}")
    return path


def _renamed(doc: dict[str, Any]) -> None:
    _run(doc)["model"]["name"] = "tiny-moe\x1b[2K\r| vllm | 9999 tok/s |"


HOSTILE = [
    ("deep-recursion", lambda tmp, runs: _deep(tmp / "deep.json", 200_000), [],
     "JSON nested deeper than the reader takes"),
    ("deep", lambda tmp, runs: _deep(tmp / "deep.json", 500), [], "JSON nested more than 64 levels deep"),
    ("huge-integer", lambda tmp, runs: _bundle(tmp, "big.json", runs[:1], _rehash(
        lambda d: _run(d)["workload"].update(concurrency=2**70))), [],
     "runs.0.result.workload.concurrency: 1180591620717411303424 does not fit in 64 bits"),
    ("endless-integer", lambda tmp, runs: _write(tmp / "digits.json", '{"format": "capbench-results", "x": '
                                                                      + "9" * 5000 + "}"), [],
     "an integer of 5000 digits; the store takes 64-bit integers"),
    ("int32-column", lambda tmp, runs: _bundle(tmp, "wide.json", runs[:1], _rehash(
        lambda d: _run(d)["workload"].update(concurrency=2**40))), [],
     "runs.0.result.workload.concurrency: 1099511627776 does not fit the database"),
    ("size-cap", lambda tmp, runs: _bundle(tmp, "all.json", runs), ["--max-bundle-mb", "0.1"],
     "larger than 0.1 MB, the most a bundle may be"),
    ("run-cap", lambda tmp, runs: _bundle(tmp, "three.json", runs[:3]), ["--max-runs", "2"],
     "runs: 3 runs; a bundle holds at most 2"),
    ("control-characters", lambda tmp, runs: _bundle(tmp, "name.json", runs[:1], _rehash(_renamed)), [],
     "runs.0.result.model.name: 'tiny-moe\\x1b[2K\\r| vllm | 9999 tok/s |' is not printable text"),
    ("control-key", lambda tmp, runs: _bundle(tmp, "key.json", runs[:1], _rehash(
        lambda d: _run(d)["metrics"]["error_kinds"].update({"x\x07": 0}))), [], "is not printable text"),
    ("not-a-file", lambda tmp, runs: Path("/dev/null"), [], "/dev/null: not a regular file"),
    ("future-bundle", lambda tmp, runs: _bundle(tmp, "later.json", runs[:1], lambda d: d.update(
        created_at="2999-01-01T00:00:00+00:00")), [], "created_at: '2999-01-01T00:00:00+00:00' is not a date"),
    ("replay-within", lambda tmp, runs: _bundle(tmp, "twice.json", runs[:1] + [_fresh_id(runs[0])]), [],
     "runs.1: the same raw request records as runs.0 under another run id (a replay)"),
]


def _write(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


def _fresh_id(result: Any) -> Any:
    copy = result.model_copy(deep=True)
    copy.run_id = str(uuid.uuid4())
    return copy


@pytest.mark.parametrize("name,make,options,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_bundle_is_one_line_and_writes_nothing(name: str, make: Any, options: list[str], message: str,
                                                         tmp_path: Path, genuine_runs: list[Any]) -> None:
    path = make(tmp_path, genuine_runs)
    one_line_refusal(run_cli("verify", str(path), *options), message)
    db = tmp_path / "lb.db"
    one_line_refusal(run_cli("db", "import", str(path), "--db", str(db), "--create", *options), message)
    assert not db.exists()  # nothing passed: the database was never opened, let alone created


def test_the_caps_are_the_maintainers_to_raise(tmp_path: Path, genuine_runs: list[Any]) -> None:
    path = _bundle(tmp_path, "all.json", genuine_runs)
    one_line_refusal(run_cli("verify", str(path), env={"CAPBENCH_MAX_BUNDLE_MB": "0.1"}), "larger than 0.1 MB")
    run_cli("verify", str(path), "--max-bundle-mb", "50", env={"CAPBENCH_MAX_BUNDLE_MB": "0.1"}, check=True)
    one_line_refusal(run_cli("verify", str(path), env={"CAPBENCH_MAX_BUNDLE_RUNS": "5"}), "at most 5")
    one_line_refusal(run_cli("verify", str(path), env={"CAPBENCH_MAX_BUNDLE_RUNS": "lots"}),
                     "CAPBENCH_MAX_BUNDLE_RUNS='lots' must be a number above 0")


def test_a_refusal_quotes_no_raw_control_character(tmp_path: Path, genuine_runs: list[Any]) -> None:
    path = _bundle(tmp_path, "evil\x1b[31m.json", genuine_runs[:1], _rehash(_renamed))
    proc = run_cli("verify", str(path))
    assert proc.returncode == 1 and "\x1b" not in proc.stderr and "\\x1b[31m" in proc.stderr


def test_replays_are_refused_across_bundles_and_imports(tmp_path: Path, genuine_runs: list[Any]) -> None:
    db = f"sqlite:///{tmp_path / 'lb.db'}"
    first = _bundle(tmp_path, "first.json", genuine_runs[:2])
    replay = _bundle(tmp_path, "replay.json", [_fresh_id(genuine_runs[1])])
    both = run_cli("db", "import", str(first), str(replay), "--db", db, "--create")
    assert both.returncode == 1 and "a replay" in both.stderr and genuine_runs[1].run_id in both.stderr
    assert "1 file(s) accepted, 1 rejected; runs: 2 added" in both.stdout
    later = run_cli("db", "import", str(replay), "--db", db)
    one_line_refusal(later, f"runs.0: the same raw request records as stored run {genuine_runs[1].run_id}")
    shuffled = _fresh_id(genuine_runs[0])
    shuffled.requests = list(reversed(shuffled.requests))
    for q in shuffled.requests:
        q.sent_ns += 10**9  # a re-based clock and a new order are still the same records
    one_line_refusal(run_cli("db", "import", str(_bundle(tmp_path, "shuffled.json", [shuffled])), "--db", db),
                     "a replay")
    assert Store(db).count() == 2
    again = run_cli("db", "import", str(first), "--db", db, check=True)  # the same runs again: no replay
    assert "runs: 0 added, 2 already stored" in again.stdout


def test_a_run_exported_here_and_imported_back_is_already_stored(tmp_path: Path, genuine_runs: list[Any]) -> None:
    db = f"sqlite:///{tmp_path / 'local.db'}"
    Store(db).save(genuine_runs[0])
    out = tmp_path / "mine.json"
    run_cli("export", "--all", "-o", str(out), "--db", db, check=True)
    back = run_cli("db", "import", str(out), "--db", db, check=True)
    assert "runs: 0 added, 1 already stored, 0 conflicting" in back.stdout


def test_the_records_hash_is_a_column_back_filled_by_the_migration(tmp_path: Path, genuine_runs: list[Any]) -> None:
    from tests.test_store_schema import _alembic

    url = f"sqlite:///{tmp_path / 'old.db'}"
    _alembic(url, "0005")
    r = genuine_runs[0]
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("insert into runs (run_id, content_hash, schema_version, started_at, status, backend, model,"
                          " task, workload_hash, concurrency, hardware_fingerprint, result_json) values (:i, :h, 1, "
                          ":s, 'complete', 'torch_moe', 'm', 'arith', 'w', 1, 'fp', :j)"),
                     {"i": r.run_id, "h": r.content_hash(), "s": r.started_at, "j": r.model_dump_json()})
    engine.dispose()
    store = Store(url)
    assert store.replays([_fresh_id(r)]) and store.replays([r]) == {}
    store.engine.dispose()


# --- paths: nothing created where nothing was asked for ------------------------------------------------


def test_export_into_a_missing_directory(tmp_path: Path, genuine_runs: list[Any]) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    Store(db).save(genuine_runs[0])
    target = tmp_path / "no" / "such" / "dir" / "out.json"
    one_line_refusal(run_cli("export", "--all", "-o", str(target), "--db", db), "does not exist (create it first)")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("command", [["compare"], ["compare", "--json"], ["show", "x"], ["export", "--all", "-o"],
                                     ["db", "import"]])
def test_a_mistyped_database_path_creates_nothing(command: list[str], tmp_path: Path,
                                                  genuine_runs: list[Any]) -> None:
    bundle_file = _bundle(tmp_path, "b.json", genuine_runs[:1])
    args = [*command, str(tmp_path / "out.json")] if command[-1] == "-o" else \
        [*command, str(bundle_file)] if command[-1] == "import" else command
    mistyped = tmp_path / "resluts.db"
    proc = run_cli(*args, "--db", str(mistyped))
    one_line_refusal(proc, f"no database at {mistyped}: check --db (or CAPBENCH_DB), or create one with "
                           f"`capbench db init --db {mistyped}`")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_a_file_that_is_not_a_capbench_database(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n" * 100)
    one_line_refusal(run_cli("compare", "--db", str(notes)), "is not a capbench database")
    assert notes.read_text() == "my notes\n" * 100
    empty = tmp_path / "empty.db"
    empty.touch()
    one_line_refusal(run_cli("compare", "--db", f"sqlite:///{empty}"), "it has no runs table")
    assert empty.stat().st_size == 0


def test_a_database_is_created_when_asked(tmp_path: Path, genuine_runs: list[Any]) -> None:
    made = tmp_path / "made.db"
    run_cli("db", "init", "--db", str(made), check=True)
    assert json.loads(run_cli("compare", "--db", str(made), "--json", check=True).stdout) == []
    bundle_file = _bundle(tmp_path, "b.json", genuine_runs[:1])
    run_cli("db", "import", str(bundle_file), "--db", str(tmp_path / "new.db"), "--create", check=True)
    assert Store(str(tmp_path / "new.db")).count() == 1

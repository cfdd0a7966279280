"""Export and import of result bundles: validation, a hostile corpus, idempotence, concurrent writers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from capbench_core import bundle
from capbench_core.store import Store
from tests.conftest import CAPBENCH, run_cli
from tests.seed import result, seeded


def _bundle(tmp_path: Path, name: str, results: list, edit=None) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    bundle.write(results, path)
    if edit is not None:
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    return path


def _set(*keys: str | int, value: object):  # type: ignore[no-untyped-def]
    """An edit that sets doc["runs"][0]["result"][keys...] = value."""
    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        node = doc["runs"][0]["result"]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def _rehash(edit):  # type: ignore[no-untyped-def]
    """Apply an edit and fix the content hash, so that the check under test is not the hash check."""
    from capbench_core.results import RunResult

    def both(doc: dict) -> None:  # type: ignore[type-arg]
        edit(doc)
        doc["runs"][0]["content_hash"] = RunResult.model_validate(doc["runs"][0]["result"]).content_hash()
    return both


HOSTILE = [
    ("truncated", None, "not valid JSON (truncated?)"),
    ("not-a-bundle", lambda d: d.update(format="something-else"), "not a capbench result bundle"),
    ("empty-runs", lambda d: d.update(runs=[]), "runs: must be a non-empty list"),
    ("newer-schema", _set("schema_version", 99, value=None), None),
    ("wrong-type", _set("metrics", "ttft_ms_p50", value="fast"), "runs.0.result.metrics.ttft_ms_p50"),
    ("negative", _rehash(_set("metrics", "output_tok_per_s", value=-5.0)),
     "runs.0.result.metrics.output_tok_per_s: a metric must be a finite number >= 0, not -5.0"),
    ("nan", _rehash(_set("metrics", "ttft_ms_p50", value=float("nan"))),
     "runs.0.result.metrics.ttft_ms_p50: a metric must be a finite number >= 0, not nan"),
    ("infinite", _rehash(_set("metrics", "accuracy_by_metric", value={"em": float("inf")})),
     "metrics.accuracy_by_metric.em: a metric must be a finite number >= 0, not inf"),
    ("fingerprint", _rehash(_set("hardware", "fingerprint", value="0123456789abcdef")),
     "runs.0.result.hardware.fingerprint: '0123456789abcdef' does not match the hardware spec"),
    ("edited", _set("metrics", "output_tok_per_s", value=1e9), "runs.0.content_hash: does not match the result"),
    ("missing-field", _set("backend", value=None), "runs.0.result.backend"),
    ("long-model", _rehash(_set("model", "name", value="x" * 5000)),
     "runs.0.result (model): 5000 characters; at most 256 are stored"),
    ("not-object", lambda d: d.update(runs=[42]), "runs.0: each run must be an object"),
]


def _hostile_files(tmp_path: Path) -> list[tuple[Path, str]]:
    files = []
    for name, edit, message in HOSTILE:
        if name == "truncated":
            path = _bundle(tmp_path, f"{name}.json", [result("cpu", "torch_moe", 1)])
            path.write_text(path.read_text()[:500])
        elif name == "newer-schema":
            def newer(doc: dict) -> None:  # type: ignore[type-arg]
                doc["runs"][0]["result"]["schema_version"] = 99
            path = _bundle(tmp_path, f"{name}.json", [result("cpu", "torch_moe", 1)], newer)
            message = "runs.0.result.schema_version: schema version 99 is newer than this capbench reads (1)"
        else:
            path = _bundle(tmp_path, f"{name}.json", [result("cpu", "torch_moe", 1)], edit)
        files.append((path, message))
    return files


def test_every_hostile_file_is_rejected_with_file_field_and_reason(tmp_path: Path, store_url: str) -> None:
    store = Store(store_url)
    for path, message in _hostile_files(tmp_path):
        with pytest.raises(bundle.Rejected) as caught:
            bundle.read(path)
        assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), path.name
    report = bundle.import_files(store, [p for p, _ in _hostile_files(tmp_path)])
    assert len(report.rejected) == len(HOSTILE) and report.added == 0 and store.count() == 0


def test_a_file_with_one_bad_run_adds_none_of_its_runs(tmp_path: Path, store_url: str) -> None:
    store = Store(store_url)
    runs = seeded()[:3]
    bad = _bundle(tmp_path, "mixed.json", runs,
                  lambda d: d["runs"][2]["result"]["metrics"].update(ttft_ms_p50=-1.0))
    report = bundle.import_files(store, [bad])
    assert report.rejected and "runs.2." in str(report.rejected[0]) and store.count() == 0


def test_export_then_import_is_exact_and_idempotent(tmp_path: Path, db_url: str, store_url: str) -> None:
    source = Store(db_url)
    for r in seeded():
        source.save(r)
    out = tmp_path / "all.json"
    proc = run_cli("export", "--all", "-o", str(out), "--db", db_url, check=True)
    assert "wrote 12 run(s)" in proc.stdout
    one = tmp_path / "one.json"
    run_cli("export", seeded()[0].run_id, "-o", str(one), "--db", db_url, check=True)
    first = run_cli("db", "import", str(out), str(one), "--db", store_url, check=True)
    assert "2 file(s) accepted, 0 rejected; runs: 12 added, 1 already stored, 0 conflicting" in first.stdout
    again = run_cli("db", "import", str(out), "--db", store_url, check=True)
    assert "runs: 0 added, 12 already stored" in again.stdout
    target = Store(store_url)
    assert target.count() == 12
    assert {r.run_id: r for r in target.runs()} == {r.run_id: r for r in source.runs()}


def test_import_cli_reports_rejections_and_still_imports_good_files(tmp_path: Path, db_url: str) -> None:
    good = _bundle(tmp_path, "good.json", seeded()[:2])
    hostile = [str(p) for p, _ in _hostile_files(tmp_path)]
    proc = run_cli("db", "import", *hostile, str(good), "--db", db_url)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("rejected ") == len(HOSTILE)
    assert f"1 file(s) accepted, {len(HOSTILE)} rejected; runs: 2 added" in proc.stdout
    assert Store(db_url).count() == 2


@pytest.mark.parametrize("args,message", [
    ([], "name the runs to export (RUN_ID...) or pass --all"),
    (["nope"], "no run 'nope'"),
])
def test_export_errors(tmp_path: Path, db_url: str, args: list[str], message: str) -> None:
    Store(db_url).save(seeded()[0])
    proc = run_cli("export", *args, "-o", str(tmp_path / "x.json"), "--db", db_url)
    assert proc.returncode == 1 and message in proc.stderr


def test_concurrent_importers_lose_nothing_and_add_nothing_twice(tmp_path: Path, store_url: str) -> None:
    """Six importer processes at once, on a new database, each with overlapping bundles."""
    runs = seeded()
    files = [_bundle(tmp_path, f"b{i}.json", runs[i * 2:i * 2 + 6]) for i in range(4)]
    procs = [subprocess.Popen([CAPBENCH, "db", "import", *map(str, files[i % 4:] + files[:i % 4]), "--db",
                               store_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(6)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    added = sum(int(out.split("runs: ")[1].split(" added")[0]) for out, _ in outputs)
    assert added == len(runs) and Store(store_url).count() == len(runs)


def test_concurrent_runs_on_one_sqlite_file_lose_nothing(db_url: str) -> None:
    """Three `capbench run` processes start at once on a new SQLite file (WAL, migration lock)."""
    args = ["run", "--backend", "torch_moe", "--task", "random", "--task-option", "output_len=4",
            "--num-requests", "4", "--warmup", "0", "--concurrency", "1,2", "--db", db_url]
    procs = [subprocess.Popen([CAPBENCH, *args, "--seed", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    runs = Store(db_url).runs()
    assert len(runs) == 6 and all(r.status == "complete" for r in runs)


def test_a_run_id_that_is_not_an_id_is_rejected(tmp_path: Path) -> None:
    path = _bundle(tmp_path, "id.json", [result("cpu", "torch_moe", 1)], _rehash(_set("run_id", value="../../x")))
    with pytest.raises(bundle.Rejected, match=r"runs.0.result.run_id: must be letters, digits and '-'"):
        bundle.read(path)

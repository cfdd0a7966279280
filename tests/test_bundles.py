"""Export and import of result bundles: validation, a hostile corpus, idempotence, concurrent writers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from capbench_core.publish import bundle
from capbench_core.store import Store
from tests.conftest import CAPBENCH, run_cli
from tests.seed import result


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
    from capbench_core.contract.records import RunResult

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


def _hostile_files(tmp_path: Path, genuine: list) -> list[tuple[Path, str]]:  # type: ignore[type-arg]
    files = []
    for name, edit, message in HOSTILE:
        if name == "truncated":
            path = _bundle(tmp_path, f"{name}.json", genuine[:1])
            path.write_text(path.read_text()[:500])
        elif name == "newer-schema":
            def newer(doc: dict) -> None:  # type: ignore[type-arg]
                doc["runs"][0]["result"]["schema_version"] = 99
            path = _bundle(tmp_path, f"{name}.json", genuine[:1], newer)
            message = "runs.0.result.schema_version: schema version 99 is newer than this capbench reads (1)"
        else:
            path = _bundle(tmp_path, f"{name}.json", genuine[:1], edit)
        files.append((path, message))
    return files


def test_every_hostile_file_is_rejected_with_file_field_and_reason(tmp_path: Path, store_url: str,
                                                                   genuine_runs: list) -> None:  # type: ignore[type-arg]
    store = Store(store_url)
    for path, message in _hostile_files(tmp_path, genuine_runs):
        with pytest.raises(bundle.Rejected) as caught:
            bundle.read(path)
        assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), path.name
    report = bundle.import_files(store, [p for p, _ in _hostile_files(tmp_path, genuine_runs)])
    assert len(report.rejected) == len(HOSTILE) and report.added == 0 and store.count() == 0


def test_a_file_with_one_bad_run_adds_none_of_its_runs(tmp_path: Path, store_url: str,
                                                      genuine_runs: list) -> None:  # type: ignore[type-arg]
    store = Store(store_url)
    runs = genuine_runs[:3]
    bad = _bundle(tmp_path, "mixed.json", runs,
                  lambda d: d["runs"][2]["result"]["metrics"].update(ttft_ms_p50=-1.0))
    report = bundle.import_files(store, [bad])
    assert report.rejected and "runs.2." in str(report.rejected[0]) and store.count() == 0


def test_export_then_import_is_exact_and_idempotent(tmp_path: Path, db_url: str, store_url: str,
                                                     genuine_runs: list) -> None:  # type: ignore[type-arg]
    source = Store(db_url)
    for r in genuine_runs:
        source.save(r)
    out = tmp_path / "all.json"
    proc = run_cli("export", "--all", "-o", str(out), "--db", db_url, check=True)
    assert "wrote 12 run(s)" in proc.stdout
    one = tmp_path / "one.json"
    run_cli("export", genuine_runs[0].run_id, "-o", str(one), "--db", db_url, check=True)
    first = run_cli("db", "import", str(out), str(one), "--db", store_url, "--create", check=True)
    assert "2 file(s) accepted, 0 rejected; runs: 12 added, 1 already stored, 0 conflicting" in first.stdout
    again = run_cli("db", "import", str(out), "--db", store_url, check=True)
    assert "runs: 0 added, 12 already stored" in again.stdout
    target = Store(store_url)
    assert target.count() == 12
    imported = {r.run_id: r for r in target.runs()}
    assert all(r.metrics.unverified.get("hardware") for r in imported.values())  # the verifier's labels
    for r in imported.values():
        r.metrics.unverified = {}
    assert imported == {r.run_id: r for r in source.runs()}


def test_import_cli_reports_rejections_and_still_imports_good_files(tmp_path: Path, db_url: str,
                                                                   genuine_runs: list) -> None:  # type: ignore[type-arg]
    good = _bundle(tmp_path, "good.json", genuine_runs[:2])
    hostile = [str(p) for p, _ in _hostile_files(tmp_path, genuine_runs)]
    proc = run_cli("db", "import", *hostile, str(good), "--db", db_url, "--create")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("rejected ") == len(HOSTILE)
    assert f"1 file(s) accepted, {len(HOSTILE)} rejected; runs: 2 added" in proc.stdout
    assert Store(db_url).count() == 2


@pytest.mark.parametrize("args,message", [
    ([], "name the runs to export (RUN_ID...) or pass --all"),
    (["nope"], "no run 'nope'"),
])
def test_export_errors(tmp_path: Path, db_url: str, args: list[str], message: str) -> None:
    Store(db_url).save(result("cpu", "torch_moe", 1))
    proc = run_cli("export", *args, "-o", str(tmp_path / "x.json"), "--db", db_url)
    assert proc.returncode == 1 and message in proc.stderr


def test_concurrent_importers_lose_nothing_and_add_nothing_twice(tmp_path: Path, store_url: str,
                                                                  genuine_runs: list) -> None:  # type: ignore[type-arg]
    """Six importer processes at once, on a new database, each with overlapping bundles."""
    runs = genuine_runs
    files = [_bundle(tmp_path, f"b{i}.json", runs[i * 2:i * 2 + 6]) for i in range(4)]
    procs = [subprocess.Popen([CAPBENCH, "db", "import", *map(str, files[i % 4:] + files[:i % 4]), "--db",
                               store_url, "--create"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_a_run_id_that_is_not_an_id_is_rejected(tmp_path: Path, genuine_runs: list) -> None:  # type: ignore[type-arg]
    path = _bundle(tmp_path, "id.json", genuine_runs[:1], _rehash(_set("run_id", value="../../x")))
    with pytest.raises(bundle.Rejected, match=r"runs.0.result.run_id: must be letters, digits and '-'"):
        bundle.read(path)


# --- a leaderboard that cannot be lied to: forgeries built from genuine bundles, re-hashed -----------


def _run(doc: dict, i: int = 0) -> dict:  # type: ignore[type-arg]
    return doc["runs"][i]["result"]  # type: ignore[no-any-return]


def _scale(field: str, factor: float):  # type: ignore[no-untyped-def]
    """The figure times ``factor``; a zero (goodput when a busy machine met no SLO) becomes ``factor``, so the
    edit always changes what the bundle states."""
    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        metrics = _run(doc)["metrics"]
        metrics[field] = (metrics[field] or 1.0) * factor
    return edit


def _forge_verdict(doc: dict) -> None:  # type: ignore[type-arg]
    """Call a correct answer wrong, and keep the accuracy figure consistent with the edited verdicts."""
    run = _run(doc)
    q = next(q for q in run["requests"] if not q["warmup"] and q["correct"])
    q["correct"], q["scores"] = False, {k: False for k in q["scores"]}
    judged = [r for r in run["requests"] if not r["warmup"]]
    run["metrics"]["accuracy"] = sum(1 for r in judged if r["correct"]) / len(judged)


def _reverse_chunks(doc: dict) -> None:  # type: ignore[type-arg]
    q = next(q for q in _run(doc)["requests"] if len(q["chunk_offsets_ns"]) > 2)
    q["chunk_offsets_ns"] = list(reversed(q["chunk_offsets_ns"]))


def _before_start(doc: dict) -> None:  # type: ignore[type-arg]
    _run(doc)["requests"][1]["chunk_offsets_ns"][0] = -5


def _halve_steps(doc: dict) -> None:  # type: ignore[type-arg]
    steps = _run(doc)["decode_steps"]
    steps["step_ns"] = [t // 2 for t in steps["step_ns"]]


def _on_an_h100(doc: dict) -> None:  # type: ignore[type-arg]
    """Claim the run was on an H100 whose datasheet bandwidth is ten times what the datasheet says."""
    claim_h100(_run(doc)["hardware"], 33500.0, "datasheet", "H100 SXM x1")


def claim_h100(hw: dict, bandwidth: float, source: str, note: str) -> None:  # type: ignore[type-arg]
    """Add an H100 to a bundle's hardware with this bandwidth claim, its fingerprint recomputed."""
    from capbench_core.analytics.datasheets import fingerprint
    from capbench_core.contract.records import Device

    hw["devices"].append({"kind": "gpu", "vendor": "NVIDIA", "model": "NVIDIA H100 80GB HBM3", "count": 1,
                          "memory_bytes": 80 * 2**30, "details": {}})
    hw["peak_mem_bw_gbps"] = {"value": bandwidth, "source": source, "note": note}
    hw["fingerprint"] = fingerprint([Device.model_validate(d) for d in hw["devices"]], hw["cpu_model"],
                                    hw["host_memory_bytes"])


FORGERIES = [
    ("faster", _scale("output_tok_per_s", 2.0), "runs.0.metrics.output_tok_per_s: stated"),
    ("snappier", _scale("ttft_ms_p50", 0.5), "runs.0.metrics.ttft_ms_p50: stated"),
    ("smarter", lambda d: _run(d)["metrics"].update(accuracy=1.0, accuracy_ci95_low=0.9),
     "runs.0.metrics.accuracy"),
    ("verdict", _forge_verdict, "runs.0.requests."),
    ("efficient", _scale("s_mbu", 1.5), "runs.0.metrics.s_mbu: stated"),
    ("over-100", lambda d: _run(d)["metrics"].update(s_mfu=1.7), "a utilisation or a share above 100 % is impossible"),
    ("more-done", lambda d: _run(d)["metrics"].update(num_completed=999), "more requests completed than were sent"),
    ("out-of-order", _reverse_chunks, "timestamps out of order"),
    ("before-start", _before_start, "a chunk arrived before its request was sent"),
    ("faster-steps", _halve_steps, "runs.0.metrics."),
    ("bigger-peak", lambda d: _run(d)["metrics"].update(peak_mem_bw_gbps=1.0),
     "not a peak of the hardware the run declares"),
    ("datasheet", _on_an_h100, "hardware.peak_mem_bw_gbps.value: stated 33500, recomputed 3350"),
    ("small-model", lambda d: _run(d)["model"].update(total_params=1000), "runs.0.model.total_params: stated 1000"),
    ("beyond-peak", lambda d: _run(d)["metrics"].update(output_tok_per_s=1e12),
     "cannot produce more tokens/s"),
    ("cheaper", _scale("cost_usd_per_mtok", 0.5), "runs.0.metrics.cost_usd_per_mtok: stated"),
    ("goodput", _scale("goodput_rps", 3.0), "runs.0.metrics.goodput_rps: stated"),
]


@pytest.mark.parametrize("name,edit,reason", FORGERIES, ids=[f[0] for f in FORGERIES])
def test_an_edited_and_rehashed_bundle_is_refused_with_its_reason(name: str, edit, reason: str,  # type: ignore[no-untyped-def]
                                                                  tmp_path: Path, db_url: str,
                                                                  genuine_runs: list) -> None:  # type: ignore[type-arg]
    path = _bundle(tmp_path, f"{name}.json", genuine_runs[:2], _rehash(edit))
    verify = run_cli("verify", str(path))
    assert verify.returncode == 1 and reason in verify.stderr, verify.stderr
    lines = [line for line in verify.stderr.splitlines() if line.startswith("rejected ")]
    assert lines and all(line.startswith(f"rejected {path}: runs.0.") for line in lines), lines
    imported = run_cli("db", "import", str(path), "--db", db_url)
    assert imported.returncode == 1 and reason in imported.stderr  # import says what verify says
    assert Store(db_url).count() == 0


def test_genuine_bundles_are_accepted_by_verify_and_import(tmp_path: Path, db_url: str,
                                                          genuine_runs: list) -> None:  # type: ignore[type-arg]
    path = _bundle(tmp_path, "genuine.json", genuine_runs)
    proc = run_cli("verify", str(path), check=True)
    assert "ok — 12 run(s) re-derived" in proc.stdout and "unsigned" in proc.stdout
    run_cli("db", "import", str(path), "--db", db_url, "--create", check=True)
    assert Store(db_url).count() == 12


def test_signed_import_with_a_trusted_key_and_a_strangers(tmp_path: Path, db_url: str,
                                                         genuine_runs: list) -> None:  # type: ignore[type-arg]
    import os
    import stat

    keys = tmp_path / "keys"
    for name in ("lab", "stranger"):
        run_cli("keys", "generate", "--name", name, "--out", str(keys), check=True)
    assert stat.S_IMODE(os.stat(keys / "lab.key").st_mode) == 0o600
    source = f"sqlite:///{tmp_path / 'source.db'}"
    for r in genuine_runs[:4]:
        Store(source).save(r)
    ids = [r.run_id for r in genuine_runs[:4]]
    for name, chosen in (("lab", ids[:2]), ("stranger", ids[2:])):
        run_cli("export", *chosen, "-o", str(tmp_path / f"{name}.json"), "--sign", str(keys / f"{name}.key"),
                "--db", source, check=True)
    run_cli("export", ids[0], "-o", str(tmp_path / "unsigned.json"), "--db", source, check=True)
    run_cli("db", "trust", str(keys / "lab.pub"), "--name", "Lab A", "--db", db_url, check=True)
    proc = run_cli("db", "import", "--require-signature", str(tmp_path / "lab.json"), str(tmp_path / "stranger.json"),
                   str(tmp_path / "unsigned.json"), "--db", db_url)
    assert proc.returncode == 1
    assert "a key this leaderboard does not trust" in proc.stderr and "unsigned: this leaderboard takes signed" \
        in proc.stderr
    assert "1 file(s) accepted, 2 rejected; runs: 2 added" in proc.stdout
    assert {r["submitter"] for r in Store(db_url).provenance().values()} == {"Lab A"}
    tampered = json.loads((tmp_path / "lab.json").read_text())
    tampered["runs"] = tampered["runs"][:1]  # drop a run after signing: still a valid bundle, not what was signed
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    verify = run_cli("verify", str(tmp_path / "tampered.json"))
    assert verify.returncode == 1 and "signature does not match the content" in verify.stderr
    site = tmp_path / "site"
    run_cli("leaderboard", "build", "--db", db_url, "--out", str(site), check=True)
    page = next((site / "hw").glob("*.html")).read_text()
    assert page.count("Lab A (signed)") == 2 and "reported, not re-derived" in page


def _uneven_layers(doc: dict) -> None:  # type: ignore[type-arg]
    _run(doc)["routing"]["tokens"][0][0] += 1


def _balanced_loads(doc: dict) -> None:  # type: ignore[type-arg]
    """Claim perfectly even routing, and keep the stated figures consistent with the claim."""
    run = _run(doc)
    tokens = run["routing"]["tokens"]
    total, width = sum(tokens[0]), len(tokens[0])
    run["routing"]["tokens"] = [[total // width] * width for _ in tokens]
    run["metrics"]["routing_imbalance_mean"] = 1.0


ROUTING_FORGERIES = [
    ("even-router", lambda d: _run(d)["metrics"].update(routing_imbalance_max=1.0),
     "runs.0.metrics.routing_imbalance_max: stated 1"),
    ("uneven-layers", _uneven_layers, "every MoE layer routes the same decode tokens"),
    ("extra-expert", lambda d: [layer.append(0) for layer in _run(d)["routing"]["tokens"]],
     "one row of num_experts loads per MoE layer"),
    ("balanced", _balanced_loads, "runs.0.metrics.routing_imbalance_max: stated"),
    ("orphan-figure", lambda d: _run(d).update(routing=None), "a routing figure without routing loads"),
]


@pytest.mark.parametrize("name,edit,reason", ROUTING_FORGERIES, ids=[f[0] for f in ROUTING_FORGERIES])
def test_forged_routing_is_refused(name: str, edit, reason: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                   genuine_runs: list) -> None:  # type: ignore[type-arg]
    measured = [r for r in genuine_runs if r.routing is not None]
    assert measured and all(r.backend == "torch_moe" for r in measured)
    path = _bundle(tmp_path, f"{name}.json", measured[:1], _rehash(edit))
    verify = run_cli("verify", str(path))
    assert verify.returncode == 1 and reason in verify.stderr, verify.stderr

"""Sweeps: matrix files, the local executor, and the Ray executor on a real local Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from capbench_core.errors import CapbenchError
from capbench_core.store import Store
from tests.conftest import CAPBENCH, default_sigint, missing, run_cli

MATRIX = """name: cpu-smoke
fixed:
  model: tiny-moe
  num_requests: 4
  warmup: 0
  task_options: {{output_len: 4}}
axes:
  backend: [torch_moe, llamacpp]
  concurrency: [1, 2]
  task: [arith, random]
{extra}"""


def _matrix(tmp_path: Path, extra: str = "", name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(MATRIX.format(extra=extra))
    return path


def _cells(db_url: str, sweep: str = "cpu-smoke") -> dict[str, dict]:  # type: ignore[type-arg]
    return Store(db_url).sweep_cells(sweep)


def _interrupt_after_a_finished_cell(path: Path, db_url: str, extra: list[str]) -> set[str]:
    """Start a sweep, send Ctrl-C once a cell is stored as complete; check the exit code and return the
    hashes of the cells that finished."""
    sweep = subprocess.Popen([CAPBENCH, "sweep", "run", str(path), *extra, "--db", db_url],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and sweep.poll() is None:
        try:
            if any(c["status"] == "complete" for c in _cells(db_url).values()):
                break
        except CapbenchError:  # the sweep may still be creating the database
            pass
        time.sleep(0.2)
    sweep.send_signal(signal.SIGINT)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, out + err
    return {h for h, c in _cells(db_url).items() if c["status"] == "complete"}


def test_plan_expands_the_product_with_stable_hashes(tmp_path: Path) -> None:
    path = _matrix(tmp_path)
    first = json.loads(run_cli("sweep", "plan", str(path), "--json", check=True).stdout)
    again = json.loads(run_cli("sweep", "plan", str(path), "--json", check=True).stdout)
    assert len(first["cells"]) == 8 and len({c["cell"] for c in first["cells"]}) == 8
    assert [c["cell"] for c in first["cells"]] == [c["cell"] for c in again["cells"]]
    assert all(c["runs_here"] and c["num_gpus"] == 0 and c["weights_gb_bf16"] > 0 for c in first["cells"])
    toml = tmp_path / "m.toml"
    toml.write_text('name = "cpu-smoke"\n[fixed]\nmodel = "tiny-moe"\nnum_requests = 4\nwarmup = 0\n'
                    '[fixed.task_options]\noutput_len = 4\n[axes]\nbackend = ["torch_moe", "llamacpp"]\n'
                    'concurrency = [1, 2]\ntask = ["arith", "random"]\n')
    from_toml = json.loads(run_cli("sweep", "plan", str(toml), "--json", check=True).stdout)
    assert [c["cell"] for c in from_toml["cells"]] == [c["cell"] for c in first["cells"]]


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("  task: [arith, random]", "  tsak: [arith, random]"),
     "m.yaml:10: unknown axis 'tsak'; allowed: backend, backend_options, concurrency, model, num_requests, "
     "rate, task, task_options"),
    (lambda t: t.replace("[torch_moe, llamacpp]", "[torch_moe, llamacp]"),
     "m.yaml:8: unknown backend 'llamacp' — did you mean 'llamacpp'? Allowed:"),
    (lambda t: t.replace("concurrency: [1, 2]", "concurrency: [1, 0]"), "m.yaml:9: axes.concurrency.1: 0 is less"),
    (lambda t: t.replace("  model: tiny-moe", "  model: tiny-mo"), "m.yaml:3: unknown model 'tiny-mo'"),
    (lambda t: t + "  warmup: [1]\n", "unknown axis 'warmup'"),
    (lambda t: t.replace("axes:", "axes: ["), "not valid YAML"),
])
def test_bad_matrix_files_name_the_line_and_the_allowed_values(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = _matrix(tmp_path)
    path.write_text(edit(path.read_text()))
    proc = run_cli("sweep", "plan", str(path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr.replace(str(tmp_path) + "/", ""), proc.stderr


def test_local_executor_runs_every_cell_and_resume_adds_nothing(tmp_path: Path, db_url: str) -> None:
    path = _matrix(tmp_path, extra="resources:\n  llamacpp: {num_cpus: 1}\n")
    proc = run_cli("sweep", "run", str(path), "--db", db_url, check=True)
    assert "8 cell(s) to run" in proc.stdout and "8 cell(s) complete, 0 failed" in proc.stdout
    cells = _cells(db_url)
    assert len(cells) == 8 and all(c["status"] == "complete" and len(c["run_ids"]) == 1 for c in cells.values())
    store = Store(db_url)
    assert len(store.runs()) == 8
    again = run_cli("sweep", "run", str(path), "--resume", "--db", db_url, check=True)
    assert "0 cell(s) to run, 8 already complete" in again.stdout and len(store.runs()) == 8


def test_a_failed_cell_is_recorded_and_the_sweep_goes_on(tmp_path: Path, db_url: str) -> None:
    path = _matrix(tmp_path)
    path.write_text(path.read_text().replace("  task: [arith, random]",
                                             "  task: [arith]\n  backend_options: [{threads: 1}, {nope: 1}]"))
    proc = run_cli("sweep", "run", str(path), "--db", db_url)
    assert proc.returncode == 3 and "4 cell(s) complete, 4 failed" in proc.stdout
    failed = [c for c in _cells(db_url).values() if c["status"] == "failed"]
    assert len(failed) == 4 and all("nope" in c["reason"] for c in failed)


@pytest.fixture
def ray_installed() -> None:
    """The Ray tests start a real local Ray cluster; CI installs Ray with the test extras."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        missing("Ray is not installed (pip install 'capbench[ray]')")


def test_ray_executor_stores_the_same_cells_as_the_local_one(tmp_path: Path, ray_installed: None) -> None:
    path = _matrix(tmp_path)
    local_db, ray_db = f"sqlite:///{tmp_path / 'local.db'}", f"sqlite:///{tmp_path / 'ray.db'}"
    run_cli("sweep", "run", str(path), "--db", local_db, check=True)
    proc = run_cli("sweep", "run", str(path), "--executor", "ray", "--db", ray_db, check=True)
    assert "8 cell(s) complete, 0 failed" in proc.stdout
    by_ray, by_local = _cells(ray_db), _cells(local_db)
    assert set(by_ray) == set(by_local) and all(c["executor"] == "ray" for c in by_ray.values())
    assert len(Store(ray_db).runs()) == 8
    again = run_cli("sweep", "run", str(path), "--executor", "ray", "--resume", "--db", ray_db, check=True)
    assert "0 cell(s) to run, 8 already complete" in again.stdout and len(Store(ray_db).runs()) == 8


def test_ray_cells_no_node_can_run_are_failed_up_front(tmp_path: Path, db_url: str, ray_installed: None) -> None:
    path = _matrix(tmp_path, extra="resources:\n  llamacpp: {num_gpus: 1, accelerator: H100 SXM}\n")
    proc = run_cli("sweep", "run", str(path), "--executor", "ray", "--db", db_url, timeout=300)
    assert proc.returncode == 3 and "4 cell(s) complete, 4 failed" in proc.stdout
    failed = [c for c in _cells(db_url).values() if c["status"] == "failed"]
    assert {c["reason"] for c in failed} == {
        "no node in the Ray cluster offers 1 GPU(s) and custom resource 'accelerator:H100 SXM' and 1 CPU(s)"}


def test_a_worker_killed_mid_sweep_is_retried_and_a_resumed_sweep_adds_only_missing_cells(
        tmp_path: Path, db_url: str, ray_installed: None) -> None:
    import psutil

    path = _matrix(tmp_path)
    sweep = subprocess.Popen([CAPBENCH, "sweep", "run", str(path), "--executor", "ray", "--db", db_url],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and sweep.poll() is None:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any("_ray_cell" in part for part in proc.info["cmdline"] or []):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed = proc.info["pid"]
                break
        time.sleep(0.05)
    out, err = sweep.communicate(timeout=600)
    assert killed is not None, "no Ray worker was seen running a cell"
    assert sweep.returncode == 0, out + err
    cells = _cells(db_url)
    assert len(cells) == 8 and all(c["status"] == "complete" for c in cells.values())
    assert len(Store(db_url).runs()) == 8  # the killed attempt wrote nothing
    # lose two cells' records, as if the sweep had stopped before them: a resume runs exactly those
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.begin() as conn:
        gone = [row[0] for row in conn.execute(text("select cell_hash from sweep_cells limit 2"))]
        conn.execute(text("delete from sweep_cells where cell_hash in (:a, :b)"), {"a": gone[0], "b": gone[1]})
    engine.dispose()
    resumed = run_cli("sweep", "run", str(path), "--executor", "ray", "--resume", "--db", db_url, check=True)
    assert "2 cell(s) to run, 6 already complete" in resumed.stdout
    assert set(_cells(db_url)) == set(cells)


def test_ctrl_c_keeps_finished_cells_and_resume_runs_the_rest(tmp_path: Path, db_url: str) -> None:
    path = _matrix(tmp_path)
    path.write_text(path.read_text().replace("num_requests: 4", "num_requests: 24"))
    finished = _interrupt_after_a_finished_cell(path, db_url, [])
    assert 0 < len(finished) < 8
    resumed = run_cli("sweep", "run", str(path), "--resume", "--db", db_url, check=True)
    assert f"{8 - len(finished)} cell(s) to run, {len(finished)} already complete" in resumed.stdout
    assert len(_cells(db_url)) == 8


def test_ray_executor_into_a_shared_postgresql_database(tmp_path: Path, pg_admin_url: str,
                                                        ray_installed: None) -> None:
    """The maintainers' setup: Ray cells, the driver writing to PostgreSQL, the leaderboard built from it."""
    from tests import postgres

    url = postgres.new_database(pg_admin_url)
    path = _matrix(tmp_path)
    proc = run_cli("sweep", "run", str(path), "--executor", "ray", "--db", url, check=True)
    assert "8 cell(s) complete, 0 failed" in proc.stdout
    assert len(_cells(url)) == 8 and len(Store(url).runs()) == 8
    run_cli("leaderboard", "build", "--db", url, "--out", str(tmp_path / "site"), check=True)
    assert (tmp_path / "site" / "index.html").read_text().count('<tr class="group">') == 1


def test_ctrl_c_on_a_ray_sweep_cancels_cells_and_leaves_no_ray_process(tmp_path: Path, db_url: str,
                                                                        ray_installed: None) -> None:
    import psutil

    path = _matrix(tmp_path)
    path.write_text(path.read_text().replace("num_requests: 4", "num_requests: 24"))
    finished = _interrupt_after_a_finished_cell(path, db_url, ["--executor", "ray"])
    assert 0 < len(finished) < 8

    def ray_processes() -> list[list[str]]:
        return [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                if any(part.startswith("ray::") or part.endswith(("raylet", "gcs_server")) for part in
                       (p.info["cmdline"] or []))]

    deadline = time.monotonic() + 60  # Ray's own processes exit after the driver: wait for that, no fixed sleep
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_processes() == []
    resumed = run_cli("sweep", "run", str(path), "--executor", "ray", "--resume", "--db", db_url, check=True)
    assert f"{8 - len(finished)} cell(s) to run, {len(finished)} already complete" in resumed.stdout

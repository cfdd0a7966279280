"""RunConfig: one settings object for `capbench run`, sweep cells and stored results; typed backend options."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import pytest

from capbench_core.cli.run import config_from_cli, run
from capbench_core.config import RunConfig, resolve
from capbench_core.contract.registry import PluginManager
from capbench_core.errors import CapbenchError
from capbench_core.studies import sweep
from capbench_core.testing import Timing, reference_server
from tests.conftest import ROOT, run_cli

SETTINGS = ["--backend", "torch_moe", "--model", "tiny-moe", "--task", "arith", "--concurrency", "2",
            "--num-requests", "4", "--warmup", "0", "--task-option", "output_len=4",
            "--backend-option", "max_batch=8"]
MATRIX = """name: same
fixed:
  model: tiny-moe
  num_requests: 4
  warmup: 0
  task_options: {output_len: "4"}
  backend_options: {max_batch: "8"}
axes:
  backend: [torch_moe]
  concurrency: [2]
  task: [arith]
"""


def _cli_config(args: list[str]) -> RunConfig:
    ctx = run.make_context("run", list(args))
    config: RunConfig = config_from_cli(ctx, dict(ctx.params))
    return config


def test_run_and_a_sweep_cell_build_the_same_config(tmp_path: Path, pm: PluginManager) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(MATRIX)
    [cell] = sweep.load(path, {"backend": pm.backends.names(), "model": pm.models.names()}).cells
    assert cell.config == _cli_config(SETTINGS)
    assert cell.config.levels()[0].concurrency == 2


def test_one_default_set_for_run_and_sweeps(tmp_path: Path, pm: PluginManager) -> None:
    """A sweep cell that says nothing about load or size gets `capbench run`'s defaults: 128 + 8 requests at
    concurrency 1 and 8 (two cells)."""
    path = tmp_path / "m.yaml"
    path.write_text("name: defaults\naxes:\n  backend: [torch_moe]\n")
    cells = sweep.load(path, {"backend": pm.backends.names()}).cells
    assert [c.level.concurrency for c in cells] == [1, 8]
    assert {(c.config.num_requests, c.config.warmup) for c in cells} == {(128, 8)}
    assert _cli_config(["--backend", "torch_moe"]).levels() == RunConfig(backend=("torch_moe",)).levels()


def test_every_sweep_axis_is_a_run_setting() -> None:
    assert set(sweep.Axes.model_fields) <= set(RunConfig.model_fields)


def test_cells_stored_before_run_configs_keep_their_hashes(tmp_path: Path, pm: PluginManager) -> None:
    """--resume recognises cells by hash: the hashes capbench 0.1 gave this matrix (computed then) still hold."""
    path = tmp_path / "m.yaml"
    path.write_text("name: cpu-smoke\nfixed:\n  model: tiny-moe\n  num_requests: 4\n  warmup: 0\n"
                    "  task_options: {output_len: 4}\naxes:\n  backend: [torch_moe, llamacpp]\n"
                    "  concurrency: [1, 2]\n  task: [arith, random]\n")
    cells = {c.label(): c.hash for c in sweep.load(path, {"backend": pm.backends.names()}).cells}
    assert cells["torch_moe tiny-moe arith c=1"] == "db38f7c21cc337a3"
    assert cells["llamacpp tiny-moe random c=2"] == "6357127541e9e3c3"
    rate = tmp_path / "r.yaml"
    rate.write_text("name: r\nfixed:\n  model: tiny-moe\n  task: arith\n  backend: torch_moe\n"
                    "  num_requests: 32\n  warmup: 2\naxes:\n  rate: [2.5]\n")
    [cell] = sweep.load(rate, {"backend": pm.backends.names()}).cells
    assert cell.hash == "f2f3df9848be6dbc"


def test_backend_options_are_typed_and_checked_before_any_engine_starts(pm: PluginManager) -> None:
    resolved = resolve(RunConfig(backend=("torch_moe",), backend_options={"max_batch": 8}), pm)
    assert resolved.backend_options["torch_moe"]["max_batch"] == 8
    from_text = resolve(_cli_config(["--backend", "torch_moe", "--backend-option", "max_batch=8"]), pm)
    assert from_text.backend_options == resolved.backend_options
    with pytest.raises(CapbenchError, match=r"torch_moe option max_batch='eight' is not valid"):
        resolve(RunConfig(backend=("torch_moe",), backend_options={"max_batch": "eight"}), pm)


def test_plugins_lists_every_backend_option_with_type_default_and_help() -> None:
    data = json.loads(run_cli("plugins", "--json", check=True).stdout)
    options = data["backend_options"]
    assert options["torch_moe"]["max_batch"] == {
        "type": "int | None", "default": None, "help": "sequences decoded together (default: the run's highest "
                                                       "concurrency)"}
    assert options["vllm"]["max_model_len"]["flag"] == "--max-model-len"
    assert options["llamacpp_server"]["n_cpu_moe"]["type"] == "int | None"
    assert set(options) == set(data["backends"])


def test_bad_settings_name_the_flag() -> None:
    with pytest.raises(CapbenchError, match="give one cost model, not --price-usd-per-hour and --cost-preset"):
        RunConfig.build({"price_usd_per_hour": 1, "cost_preset": "moe-cap"})
    with pytest.raises(CapbenchError, match=r"--rate .*finite rates > 0"):
        RunConfig.build({"rate": "nan"})
    with pytest.raises(CapbenchError, match="unknown setting 'nope'"):
        RunConfig.build({"nope": 1})


def test_run_from_a_stored_run_repeats_its_poisson_arrivals(db_url: str) -> None:
    """Every result stores its RunConfig (seed included), so `run --from RUN_ID` sends the same schedule."""
    def schedule(run_id: str) -> list[int]:
        [row] = [r for r in json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
                 if r["run_id"] == run_id]
        from capbench_core.store import Store

        stored = Store(db_url).get(run_id)
        assert stored is not None and row["status"] == "complete"
        times = sorted(r.scheduled_ns for r in stored.requests if r.scheduled_ns is not None)
        return [t - times[0] for t in times]

    with reference_server(Timing(ttft_ms=1, tpot_ms=1)) as url:
        run_cli("run", "--backend", "openai", "--endpoint", url, "--task", "random", "--num-requests", "12",
                "--warmup", "0", "--rate", "40", "--seed", "7", "--task-option", "output_len=3", "--db", db_url,
                check=True)
        [first] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
        run_cli("run", "--from", first["run_id"], "--db", db_url, check=True)
        run_cli("run", "--from", first["run_id"], "--seed", "8", "--db", db_url, check=True)
    rows = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    again, other_seed = [r["run_id"] for r in rows if r["run_id"] != first["run_id"]]
    from capbench_core.store import Store

    stored = Store(db_url).get(again)
    assert stored is not None and stored.config is not None and stored.config["seed"] == 7
    assert len(schedule(first["run_id"])) == 12
    assert schedule(again) == schedule(first["run_id"])
    assert schedule(other_seed) != schedule(first["run_id"])


def test_an_attached_server_that_does_not_say_its_dtype_gets_no_efficiency_figures(db_url: str) -> None:
    """Attached llama-server rows were stored as float32 and their S-MBU counted in float32 bytes; a server
    that does not say what it holds gets S-MBU and S-MFU null with the reason instead."""
    with reference_server(Timing(ttft_ms=1, tpot_ms=1)) as url:
        run_cli("run", "--backend", "llamacpp_server", "--endpoint", url, "--task", "random", "--num-requests", "6",
                "--warmup", "0", "--concurrency", "2", "--task-option", "output_len=4", "--db", db_url, check=True)
    [row] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert row["s_mbu"] is None and row["s_mfu"] is None
    assert "dtype is unknown" in row["notes"]["s_mbu"]
    from capbench_core.store import Store

    stored = Store(db_url).get(row["run_id"])
    assert stored is not None and stored.model.dtype == "unknown" and stored.engine is not None
    assert stored.engine.weight_dtype is None


def test_the_wheel_carries_every_package(tmp_path: Path) -> None:
    """pyproject's package list names every subpackage: each imports from the built wheel."""
    import shutil

    tree = tmp_path / "tree"  # a copy of the checkout: a build inside it would leave build/ behind
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(tree)], check=True, capture_output=True, timeout=600)
    [wheel] = out.glob("capbench-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    packages = sorted({".".join(p.relative_to(ROOT).parent.parts) for p in (ROOT / "capbench_core").rglob("*.py")})
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); "  # each package's directory: in the wheel?
            "bad = [p for p in sys.argv[2:] "
            "if not list(importlib.import_module(p).__path__)[0].startswith(sys.argv[1])]; print(bad)")
    proc = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", code, str(site), *packages],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_run_flags_are_run_config_fields() -> None:
    """`run` is an options decorator over RunConfig: its settings are RunConfig's fields, one to one."""
    flags = {p.name for p in run.params if isinstance(p, click.Option)}
    from capbench_core.cli.run import OUTPUT_FLAGS

    assert flags - set(OUTPUT_FLAGS) == set(RunConfig.model_fields)

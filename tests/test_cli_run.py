"""`capbench run` end to end on the embedded tiny MoE: table, store, JSON, faults."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from capbench_models import PUBLISHED_CONFIGS
from sqlalchemy import create_engine, text

from tests.conftest import install_plugin, run_cli
from tests.engines import background


def test_run_prints_cap_table_and_stores_every_run(tmp_path: Path, db_url: str) -> None:
    out = tmp_path / "results.json"
    proc = run_cli("run", "--backend", "torch_moe", "--num-requests", "40", "--warmup", "2",
                   "--concurrency", "1,4", "--db", db_url, "--json", str(out), check=True)
    assert "CAP — model tiny-moe, task arith" in proc.stdout
    assert "$/Mtok" in proc.stdout and " est " in proc.stdout  # priced, as a labelled estimate
    results = json.loads(out.read_text())
    assert [r["workload"]["concurrency"] for r in results] == [1, 4]
    for r in results:
        m = r["metrics"]
        assert r["status"] == "complete"
        assert m["accuracy"] >= 0.9 and m["accuracy_n"] == 40
        assert m["expert_activation_source"] == "measured"
        assert 2 <= m["experts_activated_per_layer_mean"] <= 8
        assert 0 < m["s_mbu"] < 1 and 0 < m["s_mfu"] < 1
        assert m["cost_basis"] == "estimate" and m["cost_usd_per_mtok"] > 0 and "vCPUs" in m["cost_model"]
        # in-process: capbench's own process, which holds torch and the model (more than the weights alone)
        assert m["mem_peak_gb"] > m["weights_gb_predicted"] > 0 and "capbench's own process" in m["mem_method"]
        assert m["kv_capacity_tokens"] > 0
        assert m["energy_j"] is None or m["energy_j_per_output_token"] > 0
        assert m["ttft_ms_p50"] > 0 and m["tpot_ms_p50"] > 0 and m["output_tok_per_s"] > 0
        warm = [q for q in r["requests"] if q["warmup"]]
        assert len(warm) == 2 and len(r["requests"]) == 42
        assert r["workload"]["sampling"]["temperature"] == 0.0
    assert results[1]["metrics"]["decode_batch_mean"] > 1
    with create_engine(db_url).connect() as conn:
        assert conn.execute(text("select count(*) from runs")).scalar() == 2
    shown = run_cli("compare", "--db", db_url, check=True).stdout
    assert "torch_moe" in shown and "c=4" in shown and "status" not in shown  # status only when not complete
    rows = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert {row["concurrency"] for row in rows} == {1, 4}


def test_price_gives_cost(db_url: str) -> None:
    proc = run_cli("run", "--backend", "torch_moe", "--num-requests", "8", "--warmup", "0", "--concurrency", "2",
                   "--db", db_url,
                   "--price-usd-per-hour", "0.5", "--task", "random", "--task-option", "output_len=8", check=True)
    [row] = json.loads(run_cli("compare", "--db", db_url, "--json", check=True).stdout)
    assert row["cost_usd_per_mtok"] == pytest.approx(0.5 / (row["output_tok_per_s"] * 3600) * 1e6)
    assert row["accuracy"] is None and row["output_tokens_total"] == 64
    assert "random" in proc.stdout


def test_hardware_prices_lists_dated_sourced_rows() -> None:
    rows = json.loads(run_cli("hardware", "prices", "--accelerator", "H100 SXM", "--json", check=True).stdout)
    assert rows and all(r["accelerator"] == "H100 SXM" and r["as_of"] and r["source"] for r in rows)
    table = run_cli("hardware", "prices", check=True).stdout
    assert "aws-capacity-block:p5.48xlarge" in table and "2024-12" in table


@pytest.mark.parametrize("args,message", [
    (["--backend", "torch_moa"], "unknown backend 'torch_moa' — did you mean 'torch_moe'?"),
    (["--task", "arth"], "unknown task 'arth' — did you mean 'arith'?"),
    (["--model", "tiny-mox"], "unknown model 'tiny-mox' — did you mean 'tiny-moe'?"),
    (["--concurrency", "0"], "--concurrency '0' needs integers >= 1"),
    (["--backend-option", "dtype"], "option 'dtype' is malformed: write KEY=VALUE"),
    (["--price-usd-per-hour", "1", "--cost-preset", "moe-cap"],
     "give one cost model, not --price-usd-per-hour and --cost-preset"),
    (["--backend", "torch_moe", "--price-from", "runpod:h100-sxm"],
     "price row 'runpod:h100-sxm' prices H100 SXM GPUs, and this machine has none"),
    (["--backend", "torch_moe", "--cost-preset", "moe-cap"], "the moe-cap cost preset prices GPU servers"),
])
def test_bad_input_is_one_line(args: list[str], message: str, db_url: str) -> None:
    proc = run_cli("run", "--db", db_url, *args)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_model_without_weights_names_the_file(tmp_path: Path, db_url: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        (PUBLISHED_CONFIGS / "mixtral-8x7b.json").read_text())
    proc = run_cli("run", "--backend", "torch_moe", "--model", str(tmp_path / "m"), "--db", db_url,
                   "--num-requests", "2")
    assert proc.returncode == 3
    assert "failed" in proc.stdout and "tokenizer.json is missing" in proc.stdout


BROKEN = '''
    from contextlib import contextmanager
    from capbench_core import hookimpl
    from capbench_core.contract.backend import Availability, Backend

    class Broken(Backend):
        name = "broken"
        description = "fails to start"
        def available(self):
            return Availability.yes()
        @contextmanager
        def start(self, model, hardware, options, shape):
            raise RuntimeError("engine exited with code 1 during start-up")
            yield

    @hookimpl
    def register_backends(register):
        register.add_backend(Broken())
'''


def test_a_backend_that_fails_to_start_gets_a_failed_row(tmp_path: Path, db_url: str) -> None:
    env = install_plugin(tmp_path / "site", "capbench_broken", "capbench-broken", "1.0", BROKEN)
    proc = run_cli("run", "--backend", "broken,torch_moe", "--num-requests", "6", "--warmup", "0",
                   "--concurrency", "2", "--db", db_url, env=env)
    assert proc.returncode == 3
    rows = {r["backend"]: r for r in json.loads(run_cli("compare", "--db", db_url, "--json").stdout)}
    assert rows["broken"]["status"] == "failed"
    assert rows["torch_moe"]["status"] == "complete"
    assert "engine exited with code 1 during start-up" in proc.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stores_partial_run_and_exits_130(db_url: str, sig: signal.Signals) -> None:
    with background("run", "--backend", "torch_moe", "--num-requests", "5000", "--warmup", "0",
                    "--concurrency", "1", "--db", db_url) as run:
        run.wait_for("torch_moe c=1: ", 600)  # the first count line (`… c=1: N/5000`): requests are done
        run.proc.send_signal(sig)
        assert run.finish(120) == 130, "".join(run.lines)
    assert "stored as partial" in "".join(run.lines)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        status, body = conn.execute(text("select status, result_json from runs")).one()
    result = json.loads(body)
    assert status == "partial" and "interrupted" in result["status_reason"]
    assert result["metrics"]["num_completed"] > 0
    assert result["metrics"]["ttft_ms_p50"] is not None
    with engine.connect() as conn:
        assert conn.execute(text("pragma integrity_check")).scalar() == "ok"


def test_routing_real_vs_forced_and_borrowed_by_rows_that_cannot_measure(db_url: str) -> None:
    """torch_moe stores its per-expert loads; the llamacpp_server row of the same run estimates A from them (labelled);
    a forced-balanced torch_moe run is recorded as forced, and `compare --routing` / `show --routing` show both."""
    common = ["--num-requests", "8", "--warmup", "1", "--concurrency", "4", "--db", db_url]
    run_cli("run", "--backend", "torch_moe,llamacpp_server", *common, check=True)
    run_cli("run", "--backend", "torch_moe", "--backend-option", "torch_moe:simulate_routing=round-robin", *common,
            check=True)
    from capbench_core.store import Store

    rows = {(r.backend, r.routing.forced if r.routing else None): r for r in Store(db_url).runs()}
    real, forced = rows[("torch_moe", None)], rows[("torch_moe", "round-robin")]
    assert "estimated from torch_moe's measured routing" in str(rows[("llamacpp_server", None)].metrics
                                                                .expert_activation_method)
    assert (real.metrics.routing_imbalance_mean or 0) > (forced.metrics.routing_imbalance_mean or 0) > 0
    assert "overridden (round-robin)" in forced.metrics.notes["routing"]

    table = json.loads(run_cli("compare", "--routing", "--db", db_url, "--format", "json", check=True).stdout)
    assert {(t["backend"], t["forced"]) for t in table} == {("torch_moe", None), ("torch_moe", "round-robin")}
    assert all(set(t["ep_tax"]) == {"2", "4", "8"} and t["ep_link_bytes_per_token"]["8"]["total"] > 0
               for t in table)
    shown = run_cli("show", real.run_id, "--routing", "--db", db_url, check=True).stdout
    assert "worst layers" in shown and "hottest experts" in shown and "EP8" in shown
    said = run_cli("show", rows[("llamacpp_server", None)].run_id, "--routing", "--db", db_url, check=True).stdout
    assert "did not measure its routing" in said

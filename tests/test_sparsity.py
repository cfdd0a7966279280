"""Sparsity study, analytic mode: the family holds the active budget, the roofline follows the formulas."""

from __future__ import annotations

import json

import pytest

from capbench_core.analytics import losslaw, sparsity
from capbench_core.analytics.losslaw import LossFit
from tests.conftest import run_cli


def test_family_holds_active_params_and_grows_total_with_experts() -> None:
    members = sparsity.family(1e9, [1, 4, 16, 64], 2)
    actives = [m.active_params for m in members]
    assert max(actives) / min(actives) < 1.01 and abs(actives[0] - 1e9) / 1e9 < 0.01
    totals = [m.total_params for m in members]
    assert totals == sorted(totals) and totals[-1] > 4 * totals[0]
    assert [round(m.sparsity, 4) for m in members] == [0.0, 0.5, 0.875, 0.9688]  # S = (E - k) / E


def test_expected_distinct_experts() -> None:
    assert sparsity.expected_distinct_experts(8, 2, 1) == pytest.approx(2.0)
    assert sparsity.expected_distinct_experts(64, 2, 8) == pytest.approx(64 * (1 - (62 / 64) ** 8))
    assert sparsity.expected_distinct_experts(8, 2, 1000) == pytest.approx(8.0)


def test_roofline_on_h100_is_memory_bound_at_batch_1_and_sparsity_costs_at_batch_64() -> None:
    machine = sparsity.machine_named("H100 SXM")
    rows = sparsity.analyse(sparsity.family(1e9, [1, 64], 2), machine, [1, 64])
    dense, sparse = rows
    one = dense.by_batch[1]
    assert one["bound"] == "memory"
    assert one["step_ms"] == pytest.approx(float(one["bytes"]) / 3350e9 * 1e3)  # type: ignore[arg-type]
    assert sparse.by_batch[1]["tok_per_s"] == pytest.approx(dense.by_batch[1]["tok_per_s"], rel=0.01)
    assert sparse.by_batch[64]["tok_per_s"] < 0.5 * dense.by_batch[64]["tok_per_s"]  # type: ignore[operator]
    assert dense.by_batch[64]["usd_per_mtok"] is not None


@pytest.mark.parametrize("args,message", [
    (["--top-k", "8", "--experts", "1,4"], "top-k 8 is larger than 4 experts"),
    (["--active-params", "1e6"], "smaller than attention, norms and embeddings alone"),
    (["--hardware", "H100 SXN"], "unknown hardware 'H100 SXN' — did you mean 'H100 SXM'"),
])
def test_bad_families_and_hardware_are_clear(args: list[str], message: str, db_url: str) -> None:
    proc = run_cli("study", "sparsity", *args, "--db", db_url)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_table_and_json(db_url: str) -> None:
    out = json.loads(run_cli("study", "sparsity", "--json", "--db", db_url, check=True).stdout)
    assert out["machine"]["name"] == "H100 SXM" and len(out["members"]) == 6 and out["measured"] == []
    table = run_cli("study", "sparsity", "--batch", "1,8", "--db", db_url, env={"COLUMNS": "250"},
                    check=True).stdout
    assert "E64-k2" in table and "roofline" in table


def test_measured_mode_runs_members_and_compares_with_the_roofline(tmp_path, db_url: str) -> None:  # type: ignore[no-untyped-def]
    """Two small members through the real torch_moe engine at two batch sizes; the study and its runs are
    stored, and the leaderboard gets a Sparsity page from it."""
    out = tmp_path / "study.json"
    proc = run_cli("study", "sparsity", "--measure", "--active-params", "4e6", "--experts", "1,8", "--batch", "1,4",
                   "--measure-backends", "torch_moe", "--db", db_url, "--plot-dir", str(tmp_path / "plots"),
                   "--json", env={"XDG_CACHE_HOME": str(tmp_path / "cache")}, check=True)
    out.write_text(proc.stdout)
    study = json.loads(proc.stdout)
    points = study["measured"]
    assert [(p["member"], p["batch"]) for p in points] == [("E1-k1", 1), ("E1-k1", 4), ("E8-k2", 1), ("E8-k2", 4)]
    for p in points:
        assert p["status"] == "complete" and p["measured_ms"] > 0 and p["predicted_ms"] > 0
        assert p["error"] == pytest.approx(p["measured_ms"] / p["predicted_ms"] - 1)
    sparse = points[3]
    assert sparse["experts_source"] == "measured" and 2 <= sparse["experts_measured"] <= 8
    assert study["error_summary"]["points"] == 4
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        f"sparsity_{name}.{ext}" for name in ("predicted_vs_measured", "tokens_per_s") for ext in ("png", "svg")]
    from capbench_core.store import Store

    store = Store(db_url)
    assert len(store.runs()) == 4 and store.studies("sparsity")[0]["study_id"] == study["study_id"]
    run_cli("leaderboard", "build", "--db", db_url, "--out", str(tmp_path / "site"), check=True)
    page = (tmp_path / "site" / "sparsity.html").read_text()
    assert page.count('<tr class="point">') == 4 and 'class="sparsity-chart"' in page
    assert 'href="sparsity.html"' in (tmp_path / "site" / "index.html").read_text()


def test_loss_fit_needs_a_source_and_computes_eq6(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fit = {"a": 1.0, "alpha": 0.5, "b": 2.0, "beta": 0.5, "c": 0.1, "lambda": 1.0, "d": 0.0, "delta": 1.0,
           "gamma": 0.1, "e": 1.5}
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(fit))
    with pytest.raises(Exception, match="non-empty 'source'"):
        LossFit.from_file(path)
    path.write_text(json.dumps({**fit, "source": "a test fit, not the paper's"}))
    loaded = LossFit.from_file(path)
    # N = 1e6, N_a = 1e4, S = 0.5, C = 6e8 -> D = 1e4 tokens
    assert loaded.loss(1e6, 1e4, 0.5, 6e8) == pytest.approx(1 / 1e3 + 2 / 1e2 + 0.1 / 0.5 + 1.5)
    table = run_cli("study", "sparsity", "--loss-fit", str(path), "--compute-budget", "1e20", "--db",
                    f"sqlite:///{tmp_path / 'r.db'}", env={"COLUMNS": "300"}, check=True).stdout
    assert "pretrain loss" in table and "a test fit, not the paper's" in table


def test_a_one_expert_member_is_not_counted_twice() -> None:
    """E = 1 is a dense model: its FFN is read and multiplied once (the same FLOPs as any member)."""
    machine = sparsity.machine_named("H100 SXM")
    dense, sparse = sparsity.analyse(sparsity.family(1e9, [1, 8], 2), machine, [64])
    assert dense.by_batch[64]["flops"] == pytest.approx(sparse.by_batch[64]["flops"], rel=0.01)


def test_mirror_family_holds_total_params_and_varies_top_k(db_url: str) -> None:
    configs = sparsity.mirror_configs(4e9, 32, [1, 2, 4, 8])
    members = [sparsity.spec_from_config(c, sparsity.member_name(c)) for c in configs]
    assert len({m.total_params for m in members}) == 1 and abs(members[0].total_params - 4e9) / 4e9 < 0.01
    actives = [m.active_params for m in members]
    assert actives == sorted(actives) and actives[-1] > 1.5 * actives[0]
    assert [round(m.sparsity, 4) for m in members] == [0.9688, 0.9375, 0.875, 0.75]
    study = json.loads(run_cli("study", "sparsity", "--fixed", "total", "--json", "--db", db_url, check=True).stdout)
    assert study["held"] == "total" and [m["top_k"] for m in study["members"]] == [1, 2, 4, 8]
    proc = run_cli("study", "sparsity", "--fixed", "total", "--experts", "4,8", "--db", db_url)
    assert proc.returncode == 1 and "give a single --experts value" in proc.stderr


# --- the training half: Abnar et al. Eq. 6 with its published coefficients --------------------------


def test_shipped_fit_has_provenance_and_the_quoted_values() -> None:
    fit = LossFit.load("abnar2025")
    assert (fit.a, fit.alpha, fit.b, fit.beta, fit.c, fit.lam, fit.d, fit.delta, fit.gamma, fit.e) == (
        16612.50, 0.5962, 5455.67, 0.3954, 0.4598, -0.1666, 17.26, 0.1603, 0.1595, 0.94)
    assert fit.label == "transcribed by third parties; not checked against the paper's Table 3"
    assert "yigitokar/scaling-laws-as-production-functions" in fit.source
    assert fit.fitting_range["compute_flops"] == [3e19, 1e21] and fit.fitting_range["held_out_sparsity"] == 0.98
    # hand value: 16612.5/1e9^0.5962 + 5455.67/2e10^0.3954 + 0.4598 + 17.26/1e9^0.1595 + 0.94
    assert fit.at(1e9, 2e10, 0.0) == pytest.approx(2.5657, abs=1e-4)
    assert fit.at(1e9, 2e10, 0.9) > fit.at(1e9, 2e10, 0.0)  # fixed N and D: sparser = fewer active params
    assert fit.extrapolated(1e22, 0.5) and fit.extrapolated(1e20, 0.99) and not fit.extrapolated(1e20, 0.98)


@pytest.mark.parametrize("compute", [1e20, 1e21])
def test_compute_optimal_models_follow_the_papers_findings(compute: float) -> None:
    """Loss falls with sparsity at a fixed budget; the optimum's total size grows and its active size
    falls (from dense to the sparsest member; the width grid makes single steps coarse)."""
    fit = LossFit.load("abnar2025")
    optima = [losslaw.compute_optimal(fit, compute, e, 2) for e in (1, 4, 8, 16, 32, 64)]
    losses = [p.loss for p in optima]
    assert losses == sorted(losses, reverse=True) and losses[0] - losses[-1] > 0.1
    totals = [p.total_params for p in optima]
    assert totals == sorted(totals)
    assert optima[-1].active_params < optima[0].active_params
    for p in optima:
        assert p.tokens == pytest.approx(compute / (6 * p.active_params))


def test_dense_is_best_below_a_size_that_grows_with_the_budget() -> None:
    fit = LossFit.load("abnar2025")
    experts = [1, 4, 8, 16, 32, 64]
    small, large = (losslaw.dense_best_below(fit, c, experts, 2) for c in (1e20, 1e21))
    assert small is not None and large is not None and large > small
    big = losslaw.best_sparsity_at_size(fit, 1e21, 1e11, experts, 2)
    assert big.sparsity > 0.9  # a large model at the same budget wants to be sparse


def test_joint_view_json_has_loss_and_serving_per_member(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run_cli("study", "sparsity", "--loss-fit", "abnar2025", "--compute-budget", "1e21", "--hardware", "h100 sxm",
                  "--batch", "32", "--json", "--db", db_url, check=True).stdout
    joint = json.loads(out)["joint"]
    assert joint["label"] == "transcribed by third parties; not checked against the paper's Table 3"
    members = joint["members"]
    for key in ("sparsity", "predicted_loss", "total_params", "active_params", "tok_per_s", "cost_usd_per_mtok",
                "fits_memory", "pareto"):
        assert all(key in m for m in members), key
    assert [m["predicted_loss"] for m in members] == sorted((m["predicted_loss"] for m in members), reverse=True)
    served = [m for m in members if m["fits_memory"]]
    assert served[0]["tok_per_s"] > served[-1]["tok_per_s"]  # the sparsest optimum is the dearest to serve
    e64 = members[-1]  # 48B parameters, ~97 GB in bf16: more than one H100 holds
    assert not e64["fits_memory"] and e64["tok_per_s"] is None and e64["cost_usd_per_mtok"] is None
    assert "does not fit one H100 SXM (96.8 GB of weights > 80 GB)" in e64["serving_note"] and not e64["pareto"]
    assert any(m["pareto"] for m in members) and not any(m["extrapolated"] for m in members)
    shown = run_cli("study", "sparsity", "--loss-fit", "abnar2025", "--compute-budget", "1e22", "--hardware",
                    "H100 SXM", "--db", db_url, env={"COLUMNS": "200"}, check=True).stdout
    assert "transcribed by third parties" in shown and "extrapolated" in shown
    run_cli("leaderboard", "build", "--db", db_url, "--out", str(tmp_path / "site"), check=True)
    page = (tmp_path / "site" / "sparsity.html").read_text()
    assert 'class="sortable joint"' in page and page.count('<tr class="optimum">') == 6
    assert "transcribed by third parties" in page and "E64-k2 does not fit one H100 SXM" in page

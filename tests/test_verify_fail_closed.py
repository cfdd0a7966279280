"""A verifier that fails closed (issue 32): forgeries made from genuine bundles the way a careful attacker would
make them — records edited, every aggregate recomputed with capbench's own code, the content hash recomputed —
each refused with its reason. Principles: checks whose input is missing refuse; figures never re-derived before
are re-derived, bounded or labelled; physics bounds refuse rather than blank; records agree with their labels."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from capbench_core.contract.records import Metrics, RequestRecord
from capbench_core.publish import bundle
from capbench_core.publish.verify import LATENCY_FIELDS
from capbench_core.store import Store
from tests.conftest import run_cli
from tests.test_bundles import _bundle, _rehash, _run

ACCURACY_FIELDS = ("accuracy", "accuracy_metric", "accuracy_n", "accuracy_ci95_low", "accuracy_ci95_high",
                   "accuracy_by_metric")


@pytest.fixture(scope="module")
def tasks() -> dict[str, Any]:
    from capbench_core.contract.registry import PluginManager

    return dict(PluginManager().collect().tasks.items())


def reaggregate(run: dict[str, Any]) -> None:
    """Recompute every figure that follows from the records, with capbench's own code, as a forger would."""
    from capbench_core.analytics import metrics

    records = [RequestRecord.model_validate(q) for q in run["requests"]]
    m = run["metrics"]
    window = round(m["duration_s"] * 1e9)
    derived = metrics.latency_and_throughput(records, window)
    metrics.accuracy(derived, records, m["accuracy_metric"])
    if run["workload"]["slo"]:
        metrics.goodput(derived, records, run["workload"]["slo"], window)
    dumped = derived.model_dump(mode="json")
    for name in (*LATENCY_FIELDS, *ACCURACY_FIELDS, "goodput_rps", "slo_attainment"):
        m[name] = dumped[name]
    price = m["price_usd_per_hour"]
    if price is not None:
        m["cost_usd_per_mtok"] = price / (m["output_tok_per_s"] * 3600) * 1e6 if m["output_tok_per_s"] else None
        m["cost_usd_per_mtok_all"] = price / (m["total_tok_per_s"] * 3600) * 1e6 if m["total_tok_per_s"] else None


def consistent(edit):  # type: ignore[no-untyped-def]
    """An edit of run 0, then its aggregates and content hash recomputed."""
    def both(doc: dict[str, Any]) -> None:
        edit(_run(doc))
        reaggregate(_run(doc))
    return _rehash(both)


def pick(runs: list[Any], backend: str = "torch_moe", concurrency: int = 4) -> list[Any]:
    return [next(r for r in runs if r.backend == backend and r.workload.concurrency == concurrency)]


def refused(tmp_path: Path, runs: list[Any], edit: Any, reason: str, tasks: dict[str, Any]) -> str:
    path = _bundle(tmp_path, "forged.json", runs, edit)
    with pytest.raises(bundle.Rejected) as caught:
        bundle.read(path, tasks)
    message = str(caught.value)
    assert reason in message, message
    return message


def test_the_genuine_runs_pass_and_the_reaggregation_is_exact(tmp_path: Path, genuine_runs: list[Any],
                                                              tasks: dict[str, Any]) -> None:
    """The forgeries below differ from a genuine bundle only by their edit: re-aggregating changes nothing."""
    before = _bundle(tmp_path, "genuine.json", genuine_runs).read_text()
    path = _bundle(tmp_path, "same.json", genuine_runs, lambda d: [reaggregate(r["result"]) for r in d["runs"]])
    assert json.loads(path.read_text())["runs"] == json.loads(before)["runs"]
    assert len(bundle.read(path, tasks).results) == 12


# --- checks whose input is missing refuse the figure they guard ----------------------------------------


def _no_config(run: dict[str, Any]) -> None:
    run["model"]["config"] = None


def _unparseable_config(run: dict[str, Any]) -> None:
    run["model"]["config"] = {"model_type": "no-such-architecture"}


def _scorer_note(run: dict[str, Any]) -> None:
    """Claim an outside harness scored the run, so that no verdict is re-scored, and call a wrong answer right."""
    run["metrics"]["notes"]["accuracy"] = "scored by lm-eval against the measured server"
    q = next(q for q in run["requests"] if not q["warmup"])
    q["output_text"], q["correct"], q["scores"] = "0", True, {k: True for k in q["scores"]}


def kept(edit):  # type: ignore[no-untyped-def]
    """An edit made after re-aggregating, which would otherwise undo it (a figure kept without its input)."""
    def both(doc: dict[str, Any]) -> None:
        reaggregate(_run(doc))
        edit(_run(doc))
    return _rehash(both)


MISSING_INPUT = [
    ("no-decode-steps", consistent(lambda r: r.update(decode_steps=None)), "metrics.decode_steps: stated",
     "no decode steps in the run to re-derive it from"),
    ("no-config", consistent(_no_config), "model.total_params: stated", "no model config the analytics can count"),
    ("unparseable-config", consistent(_unparseable_config), "model.total_params",
     "no model config the analytics can count"),
    ("no-slo", kept(lambda r: r["workload"].update(slo={})), "metrics.goodput_rps: stated",
     "no SLO to re-derive it from"),
    ("odd-slo", kept(lambda r: r["workload"].update(slo={"ttft_ms": 200.0, "vibes": 1.0})), "workload.slo",
     "an SLO budget capbench does not define"),
    ("scorer-note", consistent(_scorer_note), "requests.", "re-scored with the task's scorer"),
    ("unknown-task", consistent(lambda r: r["workload"].update(task="secret-task")), "workload.hash",
     "task 'secret-task' is not installed here"),
    ("other-params", consistent(lambda r: r["workload"]["params"].update(seed=7)), "workload.hash",
     "the task rebuilds workload"),
]


@pytest.mark.parametrize("name,edit,where,reason", MISSING_INPUT, ids=[c[0] for c in MISSING_INPUT])
def test_a_check_whose_input_is_missing_refuses(name: str, edit: Any, where: str, reason: str, tmp_path: Path,
                                                genuine_runs: list[Any], tasks: dict[str, Any]) -> None:
    message = refused(tmp_path, pick(genuine_runs, concurrency=2), edit, reason, tasks)
    assert where in message


def test_without_tasks_nothing_is_taken_on_trust(tmp_path: Path, genuine_runs: list[Any]) -> None:
    path = _bundle(tmp_path, "plain.json", pick(genuine_runs))
    with pytest.raises(bundle.Rejected, match="is not installed here"):
        bundle.read(path)


# --- figures never re-derived before: re-derived, bounded or labelled -----------------------------------


NEVER_DERIVED = [
    ("cost-all", lambda r: r["metrics"].update(cost_usd_per_mtok_all=r["metrics"]["cost_usd_per_mtok_all"] / 2),
     "metrics.cost_usd_per_mtok_all: stated"),
    ("cost-without-price", lambda r: r["metrics"].update(price_usd_per_hour=None, cost_usd_per_mtok=None),
     "a cost without a stated price"),
    ("energy-per-token-alone", lambda r: r["metrics"].update(energy_j_per_output_token=0.001),
     "a per-token energy without an energy reading"),
    ("energy-per-token", lambda r: r["metrics"].update(energy_j=10.0, energy_source="RAPL",
                                                       energy_j_per_output_token=0.001),
     "the stated energy over the output tokens"),
    ("energy-anonymous", lambda r: r["metrics"].update(energy_j=10.0, energy_j_per_output_token=10.0 / r["metrics"][
        "output_tokens_total"]),
     "an energy reading without its source"),
]


@pytest.mark.parametrize("name,edit,reason", NEVER_DERIVED, ids=[c[0] for c in NEVER_DERIVED])
def test_figures_that_were_never_re_derived_are(name: str, edit: Any, reason: str, tmp_path: Path,
                                                genuine_runs: list[Any], tasks: dict[str, Any]) -> None:
    refused(tmp_path, pick(genuine_runs), kept(edit), reason, tasks)


def test_reported_only_figures_are_labelled_in_the_store_and_compare(tmp_path: Path, genuine_runs: list[Any],
                                                                     tasks: dict[str, Any]) -> None:
    """What no bundle proves is stored as reported, not verified — whatever the bundle said about it."""
    def claim(doc: dict[str, Any]) -> None:
        m = _run(doc)["metrics"]
        m.update(energy_j=12.5, energy_source="RAPL", unverified={"nothing": "trust me"})
        m["energy_j_per_output_token"] = 12.5 / m["output_tokens_total"]
    path = _bundle(tmp_path, "energy.json", pick(genuine_runs), _rehash(claim))
    db = f"sqlite:///{tmp_path / 'lb.db'}"
    run_cli("db", "import", str(path), "--db", db, "--create", check=True)
    [row] = json.loads(run_cli("compare", "--db", db, "--json", check=True).stdout)
    assert "nothing" not in row["unverified"]
    assert {"metrics.energy_j", "metrics.price_usd_per_hour", "hardware"} <= set(row["unverified"])
    assert "metrics.energy_j_per_output_token" not in row["unverified"]  # re-derived from the energy


# --- physics bounds refuse, they do not blank ---------------------------------------------------------


def _blank_a_utilisation_above_one(run: dict[str, Any]) -> None:
    """Steps fast enough for S-MBU 3x over the peak (at least 1000x faster: the genuine run's own S-MBU depends on how
    busy this machine was), and every efficiency figure as capbench computes it from them: S-MBU blanked."""
    from capbench_core.analytics import figures, metrics
    from capbench_core.contract.backend import DecodeSource
    from capbench_core.contract.records import RunResult

    steps = run["decode_steps"]
    faster = max(1000, math.ceil(3 / (run["metrics"]["s_mbu"] or 1e-3)))
    steps["step_ns"] = [max(1, t // faster) for t in steps["step_ns"]]
    r = RunResult.model_validate(run)
    derived = Metrics()
    found = DecodeSource(metrics.stored_steps(r.decode_steps), r.decode_steps.source, r.decode_steps.method)
    figures.efficiency(derived, _spec(r), found, r.engine, figures.Peaks(r.metrics.peak_mem_bw_gbps,
                                                                          r.metrics.peak_flops_tflops))
    assert derived.s_mbu is None and "> 100 %" in derived.notes["s_mbu"]  # what the runner would store
    for name in ("decode_step_ms_mean", "s_mbu", "s_mfu"):
        run["metrics"][name] = getattr(derived, name)
    run["metrics"]["notes"]["s_mbu"] = derived.notes["s_mbu"]


def _spec(r: Any) -> Any:
    from capbench_core.analytics.model_spec import spec_from_config

    return spec_from_config(r.model.config, r.model.name)


def _faster_clock(run: dict[str, Any]) -> None:
    """Every time in the records 1e6x shorter (throughput through the roof), the decode steps and every
    efficiency figure dropped, so that no peak field is left in the metrics."""
    for q in run["requests"]:
        q["sent_ns"] //= 10**6
        q["chunk_offsets_ns"] = [o // 10**6 for o in q["chunk_offsets_ns"]]
    run["metrics"]["duration_s"] /= 1e6
    run["decode_steps"] = None
    for name in ("decode_steps", "decode_batch_mean", "decode_step_ms_mean", "bytes_per_decode_step_mean",
                 "flops_per_decode_step_mean", "experts_activated_per_layer_mean", "s_mbu", "s_mfu",
                 "peak_mem_bw_gbps", "peak_flops_tflops", "expert_activation_source", "expert_activation_method"):
        run["metrics"][name] = None


def _no_peaks(run: dict[str, Any]) -> None:
    run["hardware"]["peak_flops_tflops"] = {}
    run["hardware"]["cpu_peak_flops_tflops"] = {}


def _measured_h100(run: dict[str, Any]) -> None:
    """An H100 whose 'measured' bandwidth is a third of its datasheet's (S-MBU three times higher)."""
    from tests.test_bundles import claim_h100

    claim_h100(run["hardware"], 1100.0, "measured", "my own copy benchmark")


PHYSICS = [
    ("blanked-s-mbu", _blank_a_utilisation_above_one, "faster than the hardware allows"),
    ("beyond-peak-no-field", _faster_clock, "cannot produce more tokens/s"),
    ("no-peak-declared", lambda r: (_faster_clock(r), _no_peaks(r)),
     "the hardware declares no peak FLOP/s, so the throughput cannot be bounded"),
    ("measured-on-a-datasheet-device", _measured_h100, "hardware.peak_mem_bw_gbps.value: stated 1100, recomputed 3350"),
]


@pytest.mark.parametrize("name,edit,reason", PHYSICS, ids=[c[0] for c in PHYSICS])
def test_physics_bounds_refuse(name: str, edit: Any, reason: str, tmp_path: Path, genuine_runs: list[Any],
                               tasks: dict[str, Any]) -> None:
    refused(tmp_path, pick(genuine_runs), consistent(edit), reason, tasks)


# --- records against the labels they carry -------------------------------------------------------------


def _later(run: dict[str, Any]) -> None:
    for key in ("started_at", "finished_at"):
        moment = datetime.fromisoformat(run[key].replace("Z", "+00:00"))
        run[key] = (moment + timedelta(days=400)).isoformat()


def _slowest_measured(run: dict[str, Any]) -> dict[str, Any]:
    """The slowest measured request that is not the workload's last (dropping the last one looks like a
    smaller workload, which it then is)."""
    measured = [q for q in run["requests"] if not q["warmup"]]
    last = max(measured, key=lambda q: int(q["id"].rsplit("-", 1)[1]))
    return max((q for q in measured if q is not last), key=lambda q: q["chunk_offsets_ns"][-1])


def _drop_slowest(run: dict[str, Any], status: str) -> None:
    run["requests"].remove(_slowest_measured(run))
    run["status"] = status


def _fail_one(run: dict[str, Any]) -> None:
    q = next(q for q in run["requests"] if not q["warmup"])
    q.update(error_kind="timeout", error="timed out", chunk_offsets_ns=[], chunk_tokens=[], output_tokens=0,
             output_text="", correct=None, scores={})


def _more_tokens(run: dict[str, Any]) -> None:
    for q in run["requests"]:
        if not q["warmup"]:
            q["output_tokens"] = q["max_tokens"]


def _wider_steps(run: dict[str, Any]) -> None:
    run["decode_steps"]["batch_size"].append(1)


CONSISTENCY = [
    ("lower-concurrency", lambda r: r["workload"].update(concurrency=1), "workload.concurrency: stated 1",
     "requests were in flight at once in the run's own records"),
    ("longer-prompt", lambda r: r["requests"][1].update(prompt_tokens=200), "requests.1.prompt_tokens",
     "prompt and output tokens beyond the model's context (64)"),
    ("more-tokens-than-steps", _more_tokens, "metrics.output_tokens_total",
     "the measured decode steps decoded"),
    ("over-max-tokens", lambda r: r["requests"][1].update(output_tokens=50), "requests.1.output_tokens",
     "more tokens than max_tokens"),
    ("dropped-slow-request", lambda r: _drop_slowest(r, "complete"), "workload.num_requests",
     "a complete run without a duration limit sent every request of its workload"),
    ("dropped-slow-request-partial", lambda r: _drop_slowest(r, "partial"), "requests",
     "not the workload's first ones in order"),
    ("renamed-request", lambda r: r["requests"][1].update(id="arith-999"), "requests",
     "records that are not the workload's requests"),
    ("future", _later, "started_at", "a date in the future"),
    ("complete-with-a-failure", _fail_one, "status: stated 'complete'", "request(s) failed"),
    ("step-lists", _wider_steps, "decode_steps", "one entry per decode step in each list"),
    ("batch-beyond-concurrency", lambda r: r["decode_steps"]["batch_size"].__setitem__(0, 99),
     "decode_steps.batch_size", "at most the run's concurrency"),
    ("more-experts-than-the-model", lambda r: r["decode_steps"]["distinct_experts"][0].__setitem__(0, 9.0),
     "decode_steps.distinct_experts.0", "no more experts than the model has"),
    ("window-beyond-the-run", lambda r: r["metrics"].update(duration_s=r["metrics"]["duration_s"] + 60),
     "metrics.duration_s", "the measured window is longer than the run"),
    ("memory-beyond-the-host", lambda r: r["metrics"].update(mem_peak_gb=10_000.0), "metrics.mem_peak_gb",
     "more than the host's memory"),
]


@pytest.mark.parametrize("name,edit,where,reason", CONSISTENCY, ids=[c[0] for c in CONSISTENCY])
def test_records_agree_with_their_labels(name: str, edit: Any, where: str, reason: str, tmp_path: Path,
                                         genuine_runs: list[Any], tasks: dict[str, Any]) -> None:
    message = refused(tmp_path, pick(genuine_runs), consistent(edit), reason, tasks)
    assert f"runs.0.{where}" in message


VALUES = [
    ("negative-count", lambda r: r["requests"][1].update(prompt_tokens=-3),
     "runs.0.result.requests.1.prompt_tokens: must not be negative (-3)"),
    ("nan-in-hardware", lambda r: r["hardware"]["devices"][0]["details"].update(cores=float("nan")),
     "runs.0.result.hardware.devices.0.details.cores: a number must be finite, not nan"),
    ("inf-in-config", lambda r: r["model"]["config"].update(rope_theta=float("inf")),
     "runs.0.result.model.config.rope_theta: a number must be finite, not inf"),
    ("inf-in-requests", lambda r: r["workload"].update(rate_rps=float("-inf")),
     "runs.0.result.workload.rate_rps: a number must be finite, not -inf"),
]


@pytest.mark.parametrize("name,edit,reason", VALUES, ids=[c[0] for c in VALUES])
def test_no_negative_time_or_count_and_no_non_finite_number_anywhere(name: str, edit: Any, reason: str,
                                                                     tmp_path: Path, genuine_runs: list[Any],
                                                                     tasks: dict[str, Any]) -> None:
    refused(tmp_path, pick(genuine_runs), _rehash(lambda d: edit(_run(d))), reason, tasks)


def test_the_stored_run_is_the_verified_run(tmp_path: Path, genuine_runs: list[Any], tasks: dict[str, Any]) -> None:
    """What import stores is the result it verified (plus the verifier's labels), field for field."""
    path = _bundle(tmp_path, "two.json", genuine_runs[:2])
    verified = bundle.read(path, tasks).results
    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    bundle.import_files(store, [path], tasks)
    assert {r.run_id: r for r in store.runs()} == {r.run_id: r for r in verified}
    assert datetime.now(timezone.utc) > verified[0].started_at

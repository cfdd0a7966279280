"""Sparsity study, measured mode and the stored study: members of a family built with random weights (by the
model builder a plugin registers), run through real backends as ordinary stored runs, and compared with the
roofline of ``analytics.sparsity``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from capbench_core.analytics import sparsity
from capbench_core.analytics.losslaw import LossFit
from capbench_core.analytics.model_spec import ModelSpec, spec_from_config
from capbench_core.analytics.sparsity import (
    Machine,
    Row,
    expected_distinct_experts,
    machine_here,
    member_name,
    predict_step_ms,
)
from capbench_core.config import RunConfig, describe_errors, resolve
from capbench_core.contract.records import HardwareSpec
from capbench_core.contract.registry import PluginManager
from capbench_core.errors import CapbenchError
from capbench_core.measure.progress import Reporter
from capbench_core.measure.runner import Runner
from capbench_core.store import Store

#: The backends --measure runs when not told: raw PyTorch (batched) and in-process llama.cpp (batch 1).
DEFAULT_MEASURE_BACKENDS = "torch_moe,llamacpp"


class StudyConfig(BaseModel):
    """The settings of `capbench study sparsity` (its flags, same names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hardware: str | None = None
    active_params: float | None = Field(default=None, ge=1)
    experts: list[int] | None = None
    top_k: list[int] | None = None
    fixed: Literal["active", "total"] = "active"
    total_params: float | None = Field(default=None, ge=1)
    batch: list[int] = Field(default_factory=lambda: [1, 8, 64])
    context: int = Field(default=1024, ge=0)
    measure: bool = False
    measure_backends: list[str] = Field(default_factory=lambda: DEFAULT_MEASURE_BACKENDS.split(","))
    max_weight_gb: float | None = Field(default=None, gt=0)
    loss_fit: str | None = None
    compute_budget: float = Field(default=1e21, gt=0)

    @classmethod
    def build(cls, settings: dict[str, Any]) -> StudyConfig:
        try:
            config = cls.model_validate({k: v for k, v in settings.items() if v is not None})
        except ValidationError as exc:
            raise CapbenchError(describe_errors(exc)) from None
        config.expert_counts(), config.top_ks()  # checked before any work
        return config

    def expert_counts(self) -> list[int]:
        if self.fixed == "total":
            counts = self.experts or [32]
            if len(counts) != 1:
                raise CapbenchError("--fixed total holds one expert count: give a single --experts value")
            return counts
        return self.experts or [1, 4, 8, 16, 32, 64]

    def top_ks(self) -> list[int]:
        if self.fixed == "total":
            return self.top_k or [1, 2, 4, 8]
        ks = self.top_k or [2]
        if len(ks) != 1:
            raise CapbenchError("--fixed active holds one top-k: give a single --top-k value (or --fixed total "
                                "to vary it)")
        return ks

    def member_configs(self) -> list[dict[str, Any]]:
        """The family's configs: the small measurable layout with --measure, else the analytic one."""
        base, default_active, default_total = (MEASURE_BASE, 5e7, 2e8) if self.measure else (None, 1e9, 4e9)
        if self.fixed == "total":
            return sparsity.mirror_configs(self.total_params or default_total, self.expert_counts()[0],
                                           self.top_ks(), base)
        return sparsity.family_configs(self.active_params or default_active, self.expert_counts(),
                                       self.top_ks()[0], base)

    def machine(self, hardware: HardwareSpec | None) -> tuple[Machine, str, int]:
        """(machine, dtype, context): this one with --measure or --hardware here, else a datasheet row."""
        if self.measure:
            return machine_here(hardware), "float32", 8 + 16
        if self.hardware == "here":
            return machine_here(hardware), "float32", self.context
        return sparsity.machine_named(self.hardware or "H100 SXM"), "bfloat16", self.context


def run_study(config: StudyConfig, pm: PluginManager, store: Store, hardware: HardwareSpec | None,
              reporter: Reporter) -> dict[str, Any]:
    """The whole study, stored: roofline rows, measured points (--measure) and the joint view (--loss-fit)."""
    from platformdirs import user_cache_dir

    fit = LossFit.load(config.loss_fit) if config.loss_fit else None
    configs = config.member_configs()
    machine, dtype, context = config.machine(hardware)
    members = [spec_from_config(c, member_name(c)) for c in configs]
    rows = sparsity.analyse(members, machine, config.batch, dtype, context)
    measured: list[Measurement] = []
    if config.measure and hardware is not None:
        measured = measure(pm, store, hardware, configs, config.batch, config.measure_backends, reporter,
                           Path(user_cache_dir("capbench")) / "sparsity", max_weight_gb=config.max_weight_gb)
    joint = None
    if fit and not config.measure:
        if config.fixed == "total":
            raise CapbenchError("the joint view compares sparsity levels at one training budget: use it with "
                                "--fixed active (the default), not --fixed total")
        joint = sparsity.joint(fit, config.compute_budget, config.expert_counts(), config.top_ks()[0], machine,
                               max(config.batch), dtype, context)
    study = to_json(machine, dtype, context, config.fixed, rows, measured, fit, config.compute_budget, joint)
    study["study_id"] = store.save_study("sparsity", machine.name, hardware.fingerprint if hardware else None, study)
    return study

# Measured mode: a small layout that the tiny MoE's tokenizer serves, large enough per token
# (tens of MB of weights read per decode step) to be bound by memory bandwidth on a CPU.
MEASURE_BASE: dict[str, Any] = {
    "model_type": "qwen3_moe", "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 320, "tie_word_embeddings": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 512, "torch_dtype": "float32",
}


@dataclass
class Measurement:
    """One (member, backend, batch) point: the roofline's prediction beside the engine's own step time."""

    member: str
    backend: str
    batch: int
    sparsity: float
    run_id: str | None
    status: str
    decode_batch_mean: float | None = None
    experts_measured: float | None = None
    experts_source: str | None = None
    experts_uniform: float | None = None
    predicted_ms: float | None = None
    measured_ms: float | None = None
    error: float | None = None  # measured / predicted - 1
    tok_per_s: float | None = None
    note: str = ""


#: Measured mode's requests: random prompts of INPUT_LEN tokens, OUTPUT_LEN tokens out.
INPUT_LEN, OUTPUT_LEN = 8, 32


def measure(pm: PluginManager, store: Store, hardware: HardwareSpec, configs: list[dict[str, Any]],
            batches: list[int], backends: list[str], reporter: Reporter, cache_dir: Path,
            max_weight_gb: float | None = None) -> list[Measurement]:
    """Run every member through each backend at each batch (stored as ordinary runs) and compare. Members are
    built with random weights by the model builder a plugin registers (torch_moe's)."""
    from capbench_core.contract.backend import ModelRef

    build = pm.models.builder()
    machine = machine_here(hardware)
    limit = max_weight_gb if max_weight_gb is not None else hardware.host_memory_bytes / 1e9 / 4
    out: list[Measurement] = []
    for config in configs:
        name = member_name(config)
        spec = spec_from_config(config, name)
        weight_gb = spec.weight_bytes("float32") / 1e9
        if weight_gb > limit:
            out += [Measurement(name, b_name, b, spec.sparsity, None, "does not fit",
                                note=f"{weight_gb:.2f} GB of float32 weights > {limit:.2f} GB allowed "
                                     f"(--max-weight-gb, default a quarter of host memory)")
                    for b_name in backends for b in batches]
            continue
        reporter.note(f"sparsity study: building {name} ({weight_gb:.2f} GB, random weights)…")
        path = build(config, cache_dir / f"{name}-{spec.active_params}")
        model = ModelRef(f"sparsity-{name}-a{spec.active_params}", path, "random-init sparsity-study member")
        pm.models.add_transient(model)
        for backend in backends:
            # an engine that decodes one request at a time is measured at batch 1 only
            levels = [1] if pm.backends.get(backend).serial_decode else batches
            for batch in levels:
                run = RunConfig.build({"backend": backend, "model": model.name, "task": "random",
                                       "num_requests": max(4, 2 * batch), "warmup": min(batch, 4),
                                       "concurrency": batch,
                                       "task_options": {"input_len": INPUT_LEN, "output_len": OUTPUT_LEN}})
                [result] = Runner(pm, store, hardware, reporter).run(resolve(run, pm))
                out.append(_compare(result, spec, machine, batch, INPUT_LEN + OUTPUT_LEN / 2))
    return out


def _compare(result: Any, spec: ModelSpec, machine: Machine, batch: int, context: float) -> Measurement:
    m = result.metrics
    point = Measurement(spec.name, result.backend, batch, spec.sparsity, result.run_id, result.status,
                        decode_batch_mean=m.decode_batch_mean, experts_measured=m.experts_activated_per_layer_mean,
                        experts_source=m.expert_activation_source, measured_ms=m.decode_step_ms_mean,
                        tok_per_s=m.output_tok_per_s, note=result.status_reason)
    if m.decode_step_ms_mean is None or m.decode_batch_mean is None:
        point.note = point.note or m.notes.get("s_mbu", "no decode step was timed")
        return point
    if result.status != "complete":  # failed requests distort the window-based step time
        point.note = f"{point.note}; not compared with the roofline".lstrip("; ")
        return point
    if spec.is_moe:
        point.experts_uniform = expected_distinct_experts(spec.num_experts, spec.top_k, m.decode_batch_mean)
    point.predicted_ms = predict_step_ms(spec, machine, m.decode_batch_mean, context, "float32")
    point.error = m.decode_step_ms_mean / point.predicted_ms - 1
    return point


def to_json(machine: Machine, dtype: str, context: int, held: str, rows: list[Row],
            measured: list[Measurement], fit: LossFit | None, compute_budget: float,
            joint_view: dict[str, Any] | None = None) -> dict[str, Any]:
    """The study as stored in the database and printed by --json."""
    from dataclasses import asdict

    members = []
    for r in rows:
        member = asdict(r)
        member["by_batch"] = {str(b): v for b, v in r.by_batch.items()}
        member["pretrain_loss"] = fit.loss(r.total_params, r.active_params, r.sparsity, compute_budget) if fit \
            else None
        members.append(member)
    errors = sorted(p.error for p in measured if p.error is not None)
    return {
        "kind": "sparsity", "machine": asdict(machine), "dtype": dtype, "context_tokens": context,
        "held": held, "description": _describe(held, rows), "members": members,
        "loss": ({"source": fit.source, "label": fit.label, "fit": fit.name, "compute_budget_flops": compute_budget}
                 if fit else {"source": None, "note": "no loss fit given (--loss-fit abnar2025 or a file of your "
                                                      "own): the pre-training loss is not shown"}),
        "joint": joint_view,
        "measured": [asdict(p) for p in measured],
        "error_summary": ({"points": len(errors), "min": errors[0], "median": errors[len(errors) // 2],
                           "max": errors[-1]} if errors else None),
    }


def _describe(held: str, rows: list[Row]) -> str:
    if not rows:
        return ""
    if held == "total":
        return (f"{rows[0].total_params / 1e9:.3g}B total parameters held, {rows[0].experts} experts, "
                f"top-k {', '.join(str(r.top_k) for r in rows)}")
    return (f"{rows[0].active_params / 1e9:.3g}B active parameters held, top-{max(r.top_k for r in rows)}, "
            f"E = {', '.join(str(r.experts) for r in rows)}")

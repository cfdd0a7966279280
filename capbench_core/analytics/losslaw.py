"""The training half of "parameters vs FLOPs": Abnar et al. (2025) Eq. 6 and what it says is optimal.

L(N, D, S) = a/N^alpha + b/D^beta + c/(1-S)^lambda + d/((1-S)^delta N^gamma) + e, with N total
parameters, D training tokens, S = 1 - k/E. A training budget C buys D = C / (6 N_a) tokens, N_a the
active parameters per token.

How N_a follows N is not a constant fraction: embeddings, attention, norms and the router are active
whatever the sparsity. capbench relates them with its own analytics (``model_spec``) on one layout that
grows in width and depth together (``scaled_config``), so the optima below depend on that layout — a
different one (wider experts, another vocabulary) moves them. docs/sparsity.md says so beside them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capbench_core.analytics.model_spec import ModelSpec, spec_from_config
from capbench_core.errors import CapbenchError

FITS_FILE = Path(__file__).resolve().parent.parent / "data" / "loss_fits.json"
KEYS = ("a", "alpha", "b", "beta", "c", "lambda", "d", "delta", "gamma", "e")


@dataclass(frozen=True)
class LossFit:
    """Coefficients of Eq. 6 with their provenance: where they come from, how far to trust them, and the
    range the fit saw (outside it a prediction is an extrapolation and says so)."""

    a: float
    alpha: float
    b: float
    beta: float
    c: float
    lam: float
    d: float
    delta: float
    gamma: float
    e: float
    source: str
    name: str = "user fit"
    label: str = ""
    fitting_range: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, name_or_path: str | Path) -> LossFit:
        """A shipped fit by name (``abnar2025``) or a user's JSON file (coefficients and ``source``)."""
        shipped = json.loads(FITS_FILE.read_text())
        key = str(name_or_path)
        if key.lower() in shipped:
            doc = shipped[key.lower()]
            values = {k: float(doc["coefficients"][k]) for k in KEYS}
            values["lam"] = values.pop("lambda")
            return cls(**values, source="; ".join(doc["sources"]), name=key.lower(), label=doc["status"],
                       fitting_range=doc["fitting_range"])
        path = Path(name_or_path)
        if not path.is_file():
            raise CapbenchError(f"--loss-fit {key!r} is neither a shipped fit ({', '.join(shipped)}) nor a file")
        return cls.from_file(path)

    @classmethod
    def from_file(cls, path: Path) -> LossFit:
        try:
            doc = json.loads(Path(path).read_text())
            values = {k: float(doc[k]) for k in KEYS}
            source = str(doc["source"]).strip()
        except FileNotFoundError:
            raise CapbenchError(f"no loss-fit file {path}") from None
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise CapbenchError(f"{path}: a loss fit is JSON with numbers a, alpha, b, beta, c, lambda, d, "
                                f"delta, gamma, e and a non-empty 'source' ({exc})") from None
        if not source:
            raise CapbenchError(f"{path}: 'source' is empty: say where the coefficients come from")
        values["lam"] = values.pop("lambda")
        return cls(**values, source=source, name=str(path), label=str(doc.get("status", "")),
                   fitting_range=dict(doc.get("fitting_range") or {}))

    def at(self, total_params: float, tokens: float, sparsity: float) -> float:
        """Eq. 6 at N total parameters, D training tokens, sparsity S."""
        dense_share = 1 - sparsity
        return float(self.a / total_params ** self.alpha + self.b / tokens ** self.beta
                     + self.c / dense_share ** self.lam
                     + self.d / (dense_share ** self.delta * total_params ** self.gamma) + self.e)

    def loss(self, total_params: float, active_params: float, sparsity: float, compute_flops: float) -> float:
        """Predicted pre-training loss at a compute budget C, with D = C / (6 N_active) tokens."""
        return self.at(total_params, compute_flops / (6 * active_params), sparsity)

    def extrapolated(self, compute_flops: float, sparsity: float) -> list[str]:
        """Why a prediction lies outside the range the fit saw ([] when inside or when the range is unknown)."""
        why = []
        budget = self.fitting_range.get("compute_flops")
        if budget and not budget[0] <= compute_flops <= budget[1]:
            low, high = budget
            why.append(f"budget {compute_flops:.3g} FLOPs outside the fit's {low:.3g}-{high:.3g}")
        s_range = self.fitting_range.get("sparsity")
        if s_range and sparsity > s_range[1] + 1e-12:
            why.append(f"sparsity {sparsity:.4g} above the fit's {s_range[1]:g}")
        return why

    def provenance(self) -> dict[str, Any]:
        return {"fit": self.name, "label": self.label, "source": self.source, "fitting_range": self.fitting_range}


# One layout grown in width and depth together (GPT-NeoX tokenizer, as the paper's runs): hidden h,
# h/128 layers, heads of 64, 4 query heads per KV head; the active FFN is 4h wide in total, split over
# the k experts a token uses (E = 1: one dense FFN of 4h).
VOCAB = 50304


def scaled_config(hidden: int, experts: int, top_k: int, expert_width: int | None = None) -> dict[str, Any]:
    heads = max(1, hidden // 64)
    k = 1 if experts == 1 else top_k
    inter = expert_width or max(1, round(4 * hidden / k))
    return {"model_type": "qwen3_moe", "hidden_size": hidden, "num_hidden_layers": max(2, round(hidden / 128)),
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4), "head_dim": 64,
            "vocab_size": VOCAB, "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "num_experts": experts, "num_experts_per_tok": k, "moe_intermediate_size": inter,
            "intermediate_size": inter}


HIDDEN_GRID = [64 * i for i in range(2, 257)]  # 128 .. 16384


@dataclass(frozen=True)
class Point:
    """One model on the law: its size, the tokens the budget buys, and the predicted loss."""

    experts: int
    top_k: int
    sparsity: float
    hidden: int
    total_params: int
    active_params: int
    tokens: float
    loss: float
    extrapolated: tuple[str, ...]
    config: dict[str, Any]

    def spec(self) -> ModelSpec:
        return spec_from_config(self.config, f"E{self.experts}-k{self.top_k}-h{self.hidden}")


def _point(fit: LossFit, compute: float, config: dict[str, Any]) -> Point:
    spec = spec_from_config(config, "point")
    sparsity = spec.sparsity
    tokens = compute / (6 * spec.active_params)
    return Point(spec.num_experts if spec.is_moe else 1, spec.top_k, sparsity, int(config["hidden_size"]),
                 spec.total_params, spec.active_params, tokens, fit.at(spec.total_params, tokens, sparsity),
                 tuple(fit.extrapolated(compute, sparsity)), config)


def compute_optimal(fit: LossFit, compute: float, experts: int, top_k: int) -> Point:
    """At sparsity 1 - k/E and budget C: the model size (hence N, N_a and D = C / 6N_a) of least loss."""
    if experts != 1 and top_k > experts:
        raise CapbenchError(f"top-k {top_k} is larger than {experts} experts")
    points = [_point(fit, compute, scaled_config(h, experts, top_k)) for h in HIDDEN_GRID]
    return min(points, key=lambda p: p.loss)


@functools.cache
def _dense_total(hidden: int) -> int:
    return spec_from_config(scaled_config(hidden, 1, 1), "dense").total_params


def at_total(fit: LossFit, compute: float, total_params: float, experts: int, top_k: int) -> Point:
    """The member with E experts (top-k) and ~``total_params`` parameters: the layout whose dense model has
    that size, its expert width set so the total stays the same; D follows from its N_a."""
    hidden = min(HIDDEN_GRID, key=lambda h: abs(_dense_total(h) - total_params))
    probe = [spec_from_config(scaled_config(hidden, experts, top_k, w), "p").total_params for w in (1, 2)]
    per_unit, fixed = probe[1] - probe[0], probe[0] - (probe[1] - probe[0])
    width = max(1, round((total_params - fixed) / per_unit))
    return _point(fit, compute, scaled_config(hidden, experts, top_k, width))


def best_sparsity_at_size(fit: LossFit, compute: float, total_params: float, experts: list[int],
                          top_k: int) -> Point:
    """At fixed N and C: the member (over ``experts``) whose sparsity gives the least predicted loss."""
    return min((at_total(fit, compute, total_params, e, top_k) for e in experts if e == 1 or e >= top_k),
               key=lambda p: p.loss)


def dense_best_below(fit: LossFit, compute: float, experts: list[int], top_k: int) -> float | None:
    """The largest total size (on a log grid) at which the dense model still has the least loss, or None."""
    sizes = [10 ** (7 + i / 8) for i in range(0, 41)]  # 1e7 .. 1e12
    dense = [n for n in sizes if best_sparsity_at_size(fit, compute, n, experts, top_k).experts == 1]
    return max(dense) if dense else None


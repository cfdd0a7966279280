"""Routing as a result: from the tokens each expert of each MoE layer took over a row's measured decode window,
how unevenly the load falls, which experts are hot, what that unevenness costs once the experts are spread over
expert-parallel ranks, and a better-than-uniform estimate of A for rows that could not measure routing.

Definitions (docs/metrics.md, "Routing"): for layer l, expert e, load L_le = decode tokens routed to e;
imbalance_l = max_e L_le / mean_e L_le; hot share_l = the share of layer l's routed tokens taken by its top 10 %
of experts; for EP over N ranks with a placement rule (contiguous: expert e on rank floor(e N / E); round-robin:
rank e mod N), the tax_l = max_r R_lr / mean_r R_lr of the ranks' loads, and the EP tax = its mean over layers
(each layer's step waits for its slowest rank). The all-to-all bytes this routing implies use DeepEP's
per-copy sizes (analytics/placement.py): a token's expert copies leave its rank unless the expert is local
(probability 1/N with tokens spread evenly over the ranks, per-copy, no per-rank deduplication: an upper bound),
and the busiest rank receives its layer's tax times the mean rank's share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

EP_SIZES = (2, 4, 8)
HOT_FRACTION = 0.1
EpRule = Literal["contiguous", "round-robin"]


def imbalance(loads: Sequence[int]) -> float | None:
    """max / mean expert load of one layer (1 = perfectly even); None when the layer routed nothing."""
    total = sum(loads)
    return max(loads) / (total / len(loads)) if total else None


def hot_share(loads: Sequence[int], fraction: float = HOT_FRACTION) -> float | None:
    """Share of one layer's routed tokens taken by its top ``fraction`` of experts (at least one expert)."""
    total = sum(loads)
    if not total:
        return None
    top = max(1, math.ceil(len(loads) * fraction))
    return sum(sorted(loads, reverse=True)[:top]) / total


def rank_of(expert: int, num_experts: int, ranks: int, rule: EpRule) -> int:
    return expert % ranks if rule == "round-robin" else expert * ranks // num_experts


def ep_tax(tokens: Sequence[Sequence[int]], ranks: int, rule: EpRule = "contiguous") -> float | None:
    """Mean over layers of the slowest EP rank's load over the mean rank's: the factor by which routing
    imbalance stretches an expert-parallel step against a perfectly balanced one."""
    taxes = []
    for loads in tokens:
        per_rank = [0] * ranks
        for e, n in enumerate(loads):
            per_rank[rank_of(e, len(loads), ranks, rule)] += n
        value = imbalance(per_rank)
        if value is not None:
            taxes.append(value)
    return sum(taxes) / len(taxes) if taxes else None


@dataclass(frozen=True)
class Summary:
    """The routing figures of one row (None where no layer routed a token)."""

    imbalance_per_layer: list[float | None]
    imbalance_mean: float | None
    imbalance_max: float | None
    hot_share: float | None
    ep_tax: dict[str, float]
    ep_rule: EpRule


def summary(tokens: Sequence[Sequence[int]], rule: EpRule = "contiguous") -> Summary:
    per_layer = [imbalance(loads) for loads in tokens]
    known = [v for v in per_layer if v is not None]
    hot = [v for v in (hot_share(loads) for loads in tokens) if v is not None]
    taxes = {str(n): ep_tax(tokens, n, rule) for n in EP_SIZES if tokens and n <= len(tokens[0])}
    return Summary(per_layer, sum(known) / len(known) if known else None, max(known) if known else None,
                   sum(hot) / len(hot) if hot else None, {k: v for k, v in taxes.items() if v is not None}, rule)


@dataclass(frozen=True)
class LinkBytes:
    """EP dispatch + combine bytes per decoded token over all MoE layers, for N ranks."""

    ranks: int
    total_per_token: float
    busiest_rank_per_token: float


def link_bytes(tokens: Sequence[Sequence[int]], layer_bytes: float, ranks: int,
               rule: EpRule = "contiguous") -> LinkBytes:
    """The all-to-all bytes one decoded token costs under EP over ``ranks`` with this routing, given the
    dispatch + combine bytes of one token at one MoE layer (analytics/placement.py: DeepEP's sizes): all ranks
    together, and what the busiest rank receives (its share stretched by each layer's tax)."""
    remote = layer_bytes * (ranks - 1) / ranks
    total = busiest = 0.0
    for loads in tokens:
        tax = ep_tax([loads], ranks, rule)
        total += remote
        busiest += remote / ranks * (tax if tax is not None else 1.0)
    return LinkBytes(ranks, total, busiest)


def hottest(tokens: Sequence[Sequence[int]], count: int = 5) -> list[tuple[int, int, float]]:
    """The ``count`` (layer, expert, share of the layer's tokens) with the highest shares."""
    cells = []
    for layer, loads in enumerate(tokens):
        total = sum(loads)
        cells += [(layer, e, n / total) for e, n in enumerate(loads) if total]
    return sorted(cells, key=lambda c: -c[2])[:count]


def shares(tokens: Sequence[Sequence[int]], top_k: int) -> list[list[float]]:
    """Per layer, per expert: the share of the layer's tokens that route to the expert (sums to top_k)."""
    out = []
    for loads in tokens:
        routed = sum(loads) / top_k  # tokens (each sends top_k copies)
        out.append([n / routed if routed else 0.0 for n in loads])
    return out


def expected_distinct(layer_shares: Sequence[Sequence[float]], batch: int) -> list[float]:
    """Expected distinct experts per layer for ``batch`` tokens drawn with these per-expert shares:
    sum_e 1 - (1 - s_e)^B (uniform shares k/E give E(1 - (1 - k/E)^B))."""
    return [sum(1 - (1 - min(s, 1.0)) ** batch for s in layer) for layer in layer_shares]

"""Routing figures from per-expert loads (docs/metrics.md, "Routing"), worked by hand."""

from __future__ import annotations

import pytest

from capbench_core.analytics.placement import combine_bytes_per_token, dispatch_bytes_per_token
from capbench_core.analytics.routing import (
    ep_tax,
    expected_distinct,
    hot_share,
    hottest,
    imbalance,
    link_bytes,
    shares,
    summary,
)

# two layers of 8 experts, top-2, 20 tokens each (40 routed copies per layer)
SKEWED = [16, 8, 4, 4, 2, 2, 2, 2]
EVEN = [5] * 8


def test_imbalance_and_hot_share_of_one_layer() -> None:
    assert imbalance(EVEN) == 1.0 and imbalance(SKEWED) == 16 / 5
    assert imbalance([0] * 8) is None and hot_share([0] * 8) is None
    assert hot_share(SKEWED) == 16 / 40            # top 10 % of 8 experts = 1 expert (at least one)
    assert hot_share(list(range(20)), 0.1) == (19 + 18) / sum(range(20))


def test_ep_tax_follows_the_placement_rule() -> None:
    # contiguous over 2 ranks: experts 0-3 (32) | 4-7 (8) -> 32 / 20; round-robin: even ids (24) | odd (16)
    assert ep_tax([SKEWED], 2, "contiguous") == pytest.approx(32 / 20)
    assert ep_tax([SKEWED], 2, "round-robin") == pytest.approx(24 / 20)
    assert ep_tax([EVEN], 8) == 1.0
    # the mean over layers
    assert ep_tax([SKEWED, EVEN], 2) == pytest.approx((32 / 20 + 1) / 2)


def test_summary_names_mean_worst_hot_and_taxes() -> None:
    s = summary([SKEWED, EVEN])
    assert s.imbalance_per_layer == [16 / 5, 1.0] and s.imbalance_mean == pytest.approx((16 / 5 + 1) / 2)
    assert s.imbalance_max == 16 / 5 and s.hot_share == pytest.approx((16 / 40 + 5 / 40) / 2)
    assert set(s.ep_tax) == {"2", "4", "8"} and s.ep_tax["8"] == pytest.approx((16 / 5 + 1) / 2)
    assert set(summary([[3, 1]]).ep_tax) == {"2"}   # no more ranks than experts
    assert hottest([SKEWED, EVEN], 2) == [(0, 0, 0.4), (0, 1, 0.2)]


def test_estimated_a_from_measured_shares() -> None:
    # uniform shares k/E give the uniform-routing estimate E(1-(1-k/E)^B)
    uniform = shares([EVEN], top_k=2)
    assert uniform == [[0.25] * 8]
    assert expected_distinct(uniform, 4)[0] == pytest.approx(8 * (1 - 0.75 ** 4))
    # a skewed router touches fewer distinct experts for the same batch
    assert expected_distinct(shares([SKEWED], 2), 4)[0] < expected_distinct(uniform, 4)[0]
    # one token touches exactly top_k experts whatever the shares
    assert expected_distinct(shares([SKEWED], 2), 1)[0] == pytest.approx(2.0)


def test_link_bytes_per_token_scale_with_remote_share_and_the_busiest_rank() -> None:
    per_layer = dispatch_bytes_per_token(2, 64) + combine_bytes_per_token(2, 64)
    even = link_bytes([EVEN, EVEN], per_layer, ranks=4)
    assert even.total_per_token == pytest.approx(2 * per_layer * 3 / 4)
    assert even.busiest_rank_per_token == pytest.approx(even.total_per_token / 4)
    skewed = link_bytes([SKEWED, SKEWED], per_layer, ranks=2)
    assert skewed.busiest_rank_per_token == pytest.approx(skewed.total_per_token / 2 * 32 / 20)

"""Chart geometry for the leaderboard: CAP radars and throughput-latency scatter with its Pareto front.

Only numbers are computed here; the templates draw them as inline SVG (escaped
like every other field), so the site needs no chart library and no network.

CAP radar normalisation (docs/leaderboard.md): each system is shown at its
highest-throughput load level. On every axis the systems of one table are
scaled min-max onto 20-100 — 100 for the best, 20 for the worst, reversed for
lower-is-better axes (TTFT, cost) — so that the worst system still draws a
visible shape; an axis where all systems tie puts them all at 100; a metric a
run did not measure is drawn at 0 and labelled n/a. Scores compare the systems
of one table only, never across tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from capbench_core.analytics.grouping import run_load
from capbench_core.analytics.pareto import ParetoPoint, points
from capbench_core.contract.records import Metrics, RunResult

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
FLOOR = 20.0


@dataclass(frozen=True)
class Axis:
    label: str
    value: Callable[[Metrics], float | None]
    higher_is_better: bool
    fmt: str


AXES = [
    Axis("accuracy", lambda m: m.accuracy, True, ".3f"),
    Axis("out tok/s", lambda m: m.output_tok_per_s, True, ".1f"),
    Axis("TTFT p50 ms", lambda m: m.ttft_ms_p50, False, ".1f"),
    Axis("$/Mtok", lambda m: m.cost_usd_per_mtok, False, ".3g"),
    Axis("S-MBU", lambda m: m.s_mbu, True, ".3f"),
    Axis("S-MFU", lambda m: m.s_mfu, True, ".3f"),
]


def normalise(values: Sequence[float | None], higher_is_better: bool) -> list[float]:
    """Min-max onto FLOOR..100 (reversed when lower is better); None -> 0; all equal -> 100."""
    known = [v for v in values if v is not None]
    if not known:
        return [0.0 for _ in values]
    low, high = min(known), max(known)
    scores = []
    for v in values:
        if v is None:
            scores.append(0.0)
        elif high == low:
            scores.append(100.0)
        else:
            share = (v - low) / (high - low)
            scores.append(FLOOR + (100 - FLOOR) * (share if higher_is_better else 1 - share))
    return scores


@dataclass(frozen=True)
class RadarSystem:
    name: str
    load: str
    color: str
    points: str  # SVG polygon points
    cells: list[tuple[str, str, float]]  # (axis, raw value shown, score 0..100)


@dataclass(frozen=True)
class Radar:
    size: int
    center: float
    radius: float
    axes: list[tuple[str, float, float, float, float]]  # label, end x, end y, label x, label y
    rings: list[str]
    systems: list[RadarSystem]


def _best_run(runs: Sequence[RunResult]) -> RunResult:
    return max(runs, key=lambda r: r.metrics.output_tok_per_s or -1.0)


def radar(runs: Sequence[RunResult], size: int = 260) -> Radar | None:
    by_system: dict[str, list[RunResult]] = {}
    for r in runs:
        by_system.setdefault(r.backend, []).append(r)
    if not by_system:
        return None
    chosen = [(name, _best_run(rs)) for name, rs in sorted(by_system.items())]
    c, radius, n = size / 2, size / 2 - 42, len(AXES)
    angles = [-math.pi / 2 + 2 * math.pi * i / n for i in range(n)]

    def at(score: float, angle: float, scale: float = 1.0) -> tuple[float, float]:
        return (round(c + radius * scale * score / 100 * math.cos(angle), 1),
                round(c + radius * scale * score / 100 * math.sin(angle), 1))

    axes = [(axis.label, *at(100, a), *at(100, a, 1.22)) for axis, a in zip(AXES, angles)]
    rings = [" ".join(f"{x},{y}" for x, y in (at(level, a) for a in angles)) for level in (FLOOR, 60.0, 100.0)]
    columns = [normalise([axis.value(r.metrics) for _, r in chosen], axis.higher_is_better) for axis in AXES]
    systems = []
    for i, (name, run) in enumerate(chosen):
        scores = [col[i] for col in columns]
        cells = [(axis.label, "n/a" if axis.value(run.metrics) is None else format(axis.value(run.metrics), axis.fmt),
                  round(score, 1)) for axis, score in zip(AXES, scores)]
        points = " ".join(f"{x},{y}" for x, y in (at(s, a) for s, a in zip(scores, angles)))
        systems.append(RadarSystem(name, run_load(run), PALETTE[i % len(PALETTE)], points, cells))
    return Radar(size, c, radius, axes, rings, systems)


@dataclass(frozen=True)
class Point:
    x: float  # SVG coordinates
    y: float
    latency_ms: float
    tok_per_s: float
    label: str
    pareto: bool
    title: str = ""


@dataclass(frozen=True)
class Series:
    name: str
    color: str
    points: list[Point]
    path: str


@dataclass(frozen=True)
class Scatter:
    width: int
    height: int
    plot: tuple[float, float, float, float]  # left, top, right, bottom
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    series: list[Series]
    front: str  # SVG polyline points through the Pareto-optimal points
    skipped: list[str]


def _ticks(high: float, count: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10(high / count)) if high > 0 else 1.0
    for mult in (1, 2, 2.5, 5, 10):
        if high / (step * mult) <= count:
            step *= mult
            break
    return [step * i for i in range(math.ceil(high / step - 1e-9) + 1)]


def pareto(runs: Sequence[RunResult], width: int = 560, height: int = 340) -> Scatter | None:
    """One point per load level: x tokens/s per user (1000 / TPOT), y output tokens/s per device; per backend a
    line through its frontier (analytics/pareto.py), the other points small; cost and accuracy on hover."""
    plotted = points(runs)
    shown = {p.run.run_id for p in plotted}
    skipped = [f"{r.backend} {run_load(r)}" for r in runs if r.run_id not in shown]
    if not plotted:
        return None
    left, top, right, bottom = 64.0, 16.0, width - 16.0, height - 44.0
    x_ticks_v = _ticks(max(p.per_user for p in plotted) * 1.1)
    y_ticks_v = _ticks(max(p.per_device for p in plotted) * 1.1)
    x_max, y_max = x_ticks_v[-1] or 1.0, y_ticks_v[-1] or 1.0

    def sx(v: float) -> float:
        return round(left + (right - left) * v / x_max, 1)

    def sy(v: float) -> float:
        return round(bottom - (bottom - top) * v / y_max, 1)

    series = []
    for i, name in enumerate(sorted({p.run.backend for p in plotted})):
        mine = sorted((p for p in plotted if p.run.backend == name), key=lambda p: p.per_user)
        pts = [Point(sx(p.per_user), sy(p.per_device), p.tpot_ms, p.per_device, p.load, p.frontier, _pareto_title(p))
               for p in mine]
        path = " ".join(f"{q.x},{q.y}" for q in pts if q.pareto)
        series.append(Series(name, PALETTE[i % len(PALETTE)], pts, path))
    return Scatter(width, height, (left, top, right, bottom),
                   [(sx(v), f"{v:g}") for v in x_ticks_v], [(sy(v), f"{v:g}") for v in y_ticks_v],
                   series, "", skipped)


def _pareto_title(p: ParetoPoint) -> str:
    m = p.run.metrics
    cost = f"${m.cost_usd_per_mtok:.4g}/Mtok" if m.cost_usd_per_mtok is not None else "no price"
    acc = f"accuracy {m.accuracy:.3f}" if m.accuracy is not None else "not scored"
    return (f"{p.run.backend} {p.load}: {p.per_user:.1f} tok/s per user (TPOT {p.tpot_ms:.2f} ms, {p.tpot_source}), "
            f"{p.per_device:.1f} tok/s per device, {cost}, {acc}{' (frontier)' if p.frontier else ''}"
            f"{' ★ SLO capacity (search winner)' if p.run.search and p.run.search.winner else ''}")


def lines(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], x_label: str, y_label: str,
          width: int = 560, height: int = 340) -> Scatter | None:
    """A plain line chart on the scatter's axes (used by the sparsity page): one line per named series."""
    pts = [p for _, points in series for p in points]
    if not pts:
        return None
    left, top, right, bottom = 64.0, 16.0, width - 16.0, height - 44.0
    x_ticks_v = _ticks(max(x for x, _ in pts) * 1.05 or 1.0)
    y_ticks_v = _ticks(max(y for _, y in pts) * 1.1 or 1.0)
    x_max, y_max = x_ticks_v[-1] or 1.0, y_ticks_v[-1] or 1.0

    def sx(v: float) -> float:
        return round(left + (right - left) * v / x_max, 1)

    def sy(v: float) -> float:
        return round(bottom - (bottom - top) * v / y_max, 1)

    out = []
    for i, (name, pairs) in enumerate(series):
        ps = [Point(sx(x), sy(y), x, y, name, False) for x, y in pairs]
        out.append(Series(name, PALETTE[i % len(PALETTE)], ps, " ".join(f"{p.x},{p.y}" for p in ps)))
    return Scatter(width, height, (left, top, right, bottom), [(sx(v), f"{v:g}") for v in x_ticks_v],
                   [(sy(v), f"{v:g}") for v in y_ticks_v], out, "", [])


@dataclass(frozen=True)
class Cell:
    x: float
    y: float
    fill: str
    title: str


@dataclass(frozen=True)
class Heatmap:
    """A row's routing: one cell per (MoE layer, expert), shaded by the expert's share of the layer's tokens,
    and one bar per layer for its imbalance (max / mean load)."""

    backend: str
    load: str
    width: int
    height: int
    cell_w: float
    cell_h: float
    cells: list[Cell]
    layers: int
    experts: int
    bars: list[tuple[float, float, float, str]]  # x, y, height, title
    bar_top: float
    bar_scale_max: float
    method: str


def _shade(share: float, top: float) -> str:
    """White (no tokens) to the palette's blue (the hottest cell of the map)."""
    t = share / top if top else 0.0
    r, g, b = (int(255 + (c - 255) * t) for c in (0x1F, 0x77, 0xB4))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(run: RunResult, max_width: int = 560) -> Heatmap | None:
    """The layer x expert heatmap and per-layer imbalance bars of a run that measured its routing."""
    from capbench_core.analytics.routing import imbalance

    if run.routing is None or not run.routing.tokens:
        return None
    tokens = run.routing.tokens
    layers, experts = len(tokens), len(tokens[0])
    cell_w = max(2.0, min(18.0, (max_width - 60) / experts))
    cell_h = max(4.0, min(18.0, 240 / layers))
    shares = [[n / sum(row) if sum(row) else 0.0 for n in row] for row in tokens]
    top = max((s for row in shares for s in row), default=0.0)
    cells = [Cell(round(50 + e * cell_w, 1), round(10 + layer * cell_h, 1), _shade(s, top),
                  f"layer {layer}, expert {e}: {tokens[layer][e]} tokens ({s:.1%} of the layer's)")
             for layer, row in enumerate(shares) for e, s in enumerate(row)]
    grid_h = 10 + layers * cell_h
    values = [imbalance(row) or 0.0 for row in tokens]
    scale = max(values + [1.0])
    bar_top, bar_h = grid_h + 30, 80.0
    bar_w = max(2.0, (max_width - 60) / layers)
    bars = [(round(50 + i * bar_w, 1), round(bar_top + bar_h * (1 - v / scale), 1), round(bar_h * v / scale, 1),
             f"layer {i}: imbalance {v:.2f} (max / mean expert load)") for i, v in enumerate(values)]
    width = int(max(50 + experts * cell_w, 50 + layers * bar_w) + 10)
    return Heatmap(run.backend, run_load(run), width, int(bar_top + bar_h + 24), cell_w, cell_h, cells, layers,
                   experts, bars, bar_top, scale, run.routing.method)

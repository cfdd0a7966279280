"""What a server engine says about itself over the measured window.

* Prometheus ``/metrics`` is scraped before and after the window (parsed with
  prometheus_client): counter deltas (prompt/generation tokens, preemptions,
  finished requests), gauges at the end (running/waiting requests, KV-cache
  use) and server-side TTFT/TPOT/E2E means (Δsum / Δcount of each histogram).
  Metric names are the engines' own (docs/engines.md).
* SGLang's expert-distribution recorder (start / stop / dump around the
  window) gives the **measured** number of distinct experts each MoE layer
  activated per forward pass.

Anything that cannot be read is None with the reason; the run goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capbench_core.contract.window import EngineMetrics, ExpertCounts, WindowReport

Derived = Callable[[Mapping[str, float], Mapping[str, float]], dict[str, float | None]]


@dataclass(frozen=True)
class MetricTable:
    """How one engine names what capbench reads from its /metrics; each engine plugin hands its own to the
    scraper. Keys are :class:`EngineMetrics` fields; values the engine's sample names (first present wins).

    ``ratios``: field -> (numerator counter, denominator counter), a windowed ratio x 1000 (seconds to ms).
    ``derived``: figures computed from the two scrapes in the engine's own way (llama.cpp's busy slots).
    """

    engine: str
    counters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    gauges: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    histograms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ratios: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    derived: Derived | None = None


class ScrapeError(Exception):
    pass


def parse(text: str) -> dict[str, float]:
    """Sample name -> value summed over label sets (engines, ranks, models)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    continue
                out[s.name] = out.get(s.name, 0.0) + float(s.value)
    except (ValueError, TypeError, IndexError) as exc:
        raise ScrapeError(f"malformed Prometheus text: {exc}") from None
    return out


def labels_of(base_url: str, metric: str, timeout_s: float = 10.0) -> dict[str, str] | None:
    """The labels of the first sample of ``metric`` (an info-style gauge, e.g. vLLM's cache_config_info), or
    None when the engine does not export it or cannot be read."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout_s)
        if resp.status_code != 200:
            return None
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                if sample.name == metric:
                    return dict(sample.labels)
    except (httpx.HTTPError, ValueError, TypeError, IndexError):
        return None
    return None


def scrape(base_url: str, timeout_s: float = 10.0) -> dict[str, float]:
    import httpx

    url = base_url.rstrip("/") + "/metrics"
    try:
        resp = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ScrapeError(f"{url} unreachable ({type(exc).__name__})") from None
    if resp.status_code != 200:
        raise ScrapeError(f"{url} answered HTTP {resp.status_code} (is the engine's metrics endpoint enabled?)")
    return parse(resp.text)


def _first(samples: Mapping[str, float], names: tuple[str, ...], suffix: str = "") -> float | None:
    for name in names:
        if name + suffix in samples:
            return samples[name + suffix]
    return None


def window(before: Mapping[str, float], after: Mapping[str, float], table: MetricTable) -> tuple[EngineMetrics,
                                                                                                dict[str, str]]:
    """Deltas and end-of-window values by one engine's table; missing ones are None with a note."""
    values: dict[str, float | None] = {}
    for key, names in table.counters.items():
        a, b = _first(before, names), _first(after, names)
        values[key] = b - a if a is not None and b is not None else None
    for key, names in table.gauges.items():
        values[key] = _first(after, names)
    for key, names in table.histograms.items():
        values[key] = histogram_mean(before, after, names)
    for key, (num, den) in table.ratios.items():
        values[key] = windowed_ratio(before, after, num, den)
    if table.derived is not None:
        values.update(table.derived(before, after))
    notes = {key: f"the engine's /metrics has no {key} sample ({table.engine} names) in this window"
             for key, value in values.items() if value is None}
    return EngineMetrics(**values), notes


def histogram_mean(before: Mapping[str, float], after: Mapping[str, float], names: tuple[str, ...],
                   scale: float = 1e3) -> float | None:
    """Δsum / Δcount of a histogram over the window, x ``scale`` (seconds -> ms); None without a change."""
    s0, s1 = _first(before, names, "_sum"), _first(after, names, "_sum")
    c0, c1 = _first(before, names, "_count"), _first(after, names, "_count")
    if s0 is None or s1 is None or c0 is None or c1 is None or c1 == c0:
        return None
    return (s1 - s0) / (c1 - c0) * scale


def windowed_ratio(before: Mapping[str, float], after: Mapping[str, float], num: str, den: str) -> float | None:
    """Δnum / Δden x 1000 over the window (seconds per token -> ms per token); None without a change."""
    try:
        d_num, d_den = after[num] - before[num], after[den] - before[den]
    except KeyError:
        return None
    return d_num / d_den * 1e3 if d_den > 0 else None


DECODE_MODE = 2  # SGLang's ForwardMode.DECODE


class ExpertRecorder:
    """SGLang's expert-distribution recorder: start, stop, dump. The dump is a torch file in
    ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``: in ``per_token`` mode one per rank with a record per
    forward pass (its forward mode and each token's top-k expert ids per layer); in ``stat`` mode one
    ``logical_count`` [forward passes, layers, experts] that mixes prefill and decode passes."""

    def __init__(self, base_url: str, directory: Path):
        self.base_url = base_url.rstrip("/")
        self.directory = directory

    def _post(self, path: str) -> None:
        import httpx

        resp = httpx.post(self.base_url + path, timeout=60)
        if resp.status_code != 200:
            raise ScrapeError(f"{path} answered HTTP {resp.status_code}: {resp.text[:200]}")

    def start(self) -> None:
        self._post("/start_expert_distribution_record")

    def stop_and_read(self) -> ExpertCounts:
        before = set(self.directory.glob("expert_distribution_recorder_*.pt"))
        self._post("/stop_expert_distribution_record")
        self._post("/dump_expert_distribution_record")
        new = sorted(set(self.directory.glob("expert_distribution_recorder_*.pt")) - before)
        if not new:
            raise ScrapeError(f"the recorder dump wrote no file into {self.directory} "
                              f"(is SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR the same directory?)")
        rank0 = [f for f in new if f.stem.endswith("_0")] or new
        return distinct_per_layer(rank0[-1])


def distinct_per_layer(path: Path) -> ExpertCounts:
    """Mean distinct experts per layer: over decode passes (per_token dump) or over all passes (stat dump)."""
    import torch

    try:
        data: Any = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable dump: the metric is null with the reason
        raise ScrapeError(f"cannot read recorder dump {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(data, dict) and "records" in data:
        return _decode_passes(path, data["records"])
    counts = data.get("logical_count") if isinstance(data, dict) else None
    if counts is None or counts.dim() != 3 or counts.shape[0] == 0:
        raise ScrapeError(f"recorder dump {path}: expected per_token records or logical_count [passes, layers, "
                          f"experts], got {type(data).__name__}")
    active = counts[counts.sum(dim=(1, 2)) > 0]  # passes of the window (the buffer may hold empty slots)
    if active.shape[0] == 0:
        raise ScrapeError(f"recorder dump {path}: no forward pass was recorded")
    per_layer = [float(x) for x in (active > 0).sum(dim=-1).float().mean(dim=0)]
    return ExpertCounts(per_layer, f"SGLang expert-distribution recorder (stat): distinct experts per layer over "
                                   f"{active.shape[0]} forward passes; the stat buffer cannot tell prefill passes "
                                   f"from decode passes, so both are in this mean")


def _decode_passes(path: Path, records: list[dict[str, Any]]) -> ExpertCounts:
    decode = [r for r in records if int(r.get("forward_mode", -1)) == DECODE_MODE]
    if not decode:
        raise ScrapeError(f"recorder dump {path}: none of its {len(records)} forward passes was a decode pass")
    per_pass = []
    loads: list[dict[int, int]] = []
    for r in decode:
        ids = r["topk_ids_of_layer"]  # [layers, tokens, slots], unused slots -1
        chosen = [[int(x) for x in layer.flatten().tolist() if x >= 0] for layer in ids]
        per_pass.append([len(set(layer)) for layer in chosen])
        loads += [{} for _ in range(len(chosen) - len(loads))]
        for layer, experts in enumerate(chosen):
            for e in experts:
                loads[layer][e] = loads[layer].get(e, 0) + 1
    layers = len(per_pass[0])
    per_layer = [sum(p[i] for p in per_pass) / len(per_pass) for i in range(layers)]
    width = max((max(layer, default=-1) for layer in loads), default=-1) + 1
    tokens = [[layer.get(e, 0) for e in range(width)] for layer in loads]
    return ExpertCounts(per_layer, f"SGLang expert-distribution recorder (per_token): distinct experts per layer "
                                   f"in each of {len(decode)} decode passes, averaged; {len(records) - len(decode)} "
                                   f"prefill passes left out; step times from the client", tokens)


class EngineProbe:
    """begin()/end() around the measured window: metrics deltas and, for SGLang, measured A."""

    def __init__(self, base_url: str, table: MetricTable, recorder: ExpertRecorder | None = None):
        self.base_url, self.table, self.recorder = base_url, table, recorder
        self._before: dict[str, float] | None = None
        self._errors: dict[str, str] = {}

    def begin(self) -> None:
        self._errors = {}
        try:
            self._before = scrape(self.base_url)
        except ScrapeError as exc:
            self._before, self._errors["engine_metrics"] = None, str(exc)
        if self.recorder is not None:
            try:
                self.recorder.start()
            except ScrapeError as exc:
                self._errors["experts"] = str(exc)

    def end(self) -> WindowReport:
        report = WindowReport(notes=dict(self._errors))
        if self._before is not None:
            try:
                report.engine_metrics, notes = window(self._before, scrape(self.base_url), self.table)
                report.notes.update(notes)
            except ScrapeError as exc:
                report.notes["engine_metrics"] = str(exc)
        if self.recorder is not None and "experts" not in report.notes:
            try:
                counts = self.recorder.stop_and_read()
                report.experts_per_layer, report.expert_method = counts.per_layer, counts.method
                report.expert_tokens = counts.expert_tokens
            except ScrapeError as exc:
                report.notes["experts"] = str(exc)
        return report

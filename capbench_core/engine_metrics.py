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

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# our name -> the engine's sample names (first one present wins)
FLAVORS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "vllm": {
        "counters": {
            "prompt_tokens": ("vllm:prompt_tokens_total",),
            "generation_tokens": ("vllm:generation_tokens_total",),
            "preemptions": ("vllm:num_preemptions_total",),
            "requests_finished": ("vllm:request_success_total",),
        },
        "gauges": {
            "requests_running": ("vllm:num_requests_running",),
            "requests_waiting": ("vllm:num_requests_waiting",),
            "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        },
        "histograms": {
            "server_ttft_ms_mean": ("vllm:time_to_first_token_seconds",),
            "server_tpot_ms_mean": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
            "server_e2e_ms_mean": ("vllm:e2e_request_latency_seconds",),
        },
    },
    "sglang": {
        "counters": {
            "prompt_tokens": ("sglang:prompt_tokens_total",),
            "generation_tokens": ("sglang:generation_tokens_total",),
            "preemptions": ("sglang:num_retracted_requests_total",),
            "requests_finished": ("sglang:num_requests_total",),
        },
        "gauges": {
            "requests_running": ("sglang:num_running_reqs",),
            "requests_waiting": ("sglang:num_queue_reqs",),
            "kv_cache_usage": ("sglang:token_usage",),
        },
        "histograms": {
            "server_ttft_ms_mean": ("sglang:time_to_first_token_seconds",),
            "server_tpot_ms_mean": ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
            "server_e2e_ms_mean": ("sglang:e2e_request_latency_seconds",),
        },
    },
    # llama.cpp's llama-server --metrics (tools/server/server-task.cpp, to_metrics): counters of tokens and of
    # the seconds spent on them, llama_decode() calls, and a running average of busy slots per decode call.
    "llamacpp": {
        "counters": {
            "prompt_tokens": ("llamacpp:prompt_tokens_total",),
            "generation_tokens": ("llamacpp:tokens_predicted_total",),
            "decode_calls": ("llamacpp:n_decode_total",),
        },
        "gauges": {
            "requests_running": ("llamacpp:requests_processing",),
            "requests_waiting": ("llamacpp:requests_deferred",),
        },
        "histograms": {},
        # our name -> (numerator counter, denominator counter) of a windowed ratio, x 1000 (seconds -> ms)
        "ratios": {
            "server_prompt_ms_per_token": ("llamacpp:prompt_seconds_total", "llamacpp:prompt_tokens_total"),
            "server_tpot_ms_mean": ("llamacpp:tokens_predicted_seconds_total", "llamacpp:tokens_predicted_total"),
        },
    },
}


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


def window(before: Mapping[str, float], after: Mapping[str, float], flavor: str) -> tuple[dict[str, float | None],
                                                                                         dict[str, str]]:
    """Deltas and end-of-window values for one flavor; missing ones are None with a note."""
    spec = FLAVORS[flavor]
    values: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    for key, names in spec["counters"].items():
        a, b = _first(before, names), _first(after, names)
        values[key] = b - a if a is not None and b is not None else None
    for key, names in spec["gauges"].items():
        values[key] = _first(after, names)
    for key, names in spec["histograms"].items():
        s0, s1 = _first(before, names, "_sum"), _first(after, names, "_sum")
        c0, c1 = _first(before, names, "_count"), _first(after, names, "_count")
        if None in (s0, s1, c0, c1) or c1 == c0:
            values[key] = None
            continue
        values[key] = (s1 - s0) / (c1 - c0) * 1e3  # type: ignore[operator]
    for key, (num, den) in spec.get("ratios", {}).items():
        values[key] = _windowed_ratio(before, after, num, den)
    if flavor == "llamacpp":
        values["decode_batch_mean"] = _busy_slots(before, after)
    for key, value in values.items():
        if value is None:
            notes[key] = f"the engine's /metrics has no {key} sample ({flavor} names) in this window"
    return values, notes


def _windowed_ratio(before: Mapping[str, float], after: Mapping[str, float], num: str, den: str) -> float | None:
    """Δnum / Δden x 1000 over the window (seconds per token -> ms per token); None without a change."""
    try:
        d_num, d_den = after[num] - before[num], after[den] - before[den]
    except KeyError:
        return None
    return d_num / d_den * 1e3 if d_den > 0 else None


def _busy_slots(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """Mean busy slots per llama_decode() call over the window, from llama.cpp's running average
    (average x calls = busy-slot total, so the window's is the difference of the products)."""
    avg, calls = "llamacpp:n_busy_slots_per_decode", "llamacpp:n_decode_total"
    try:
        d_calls = after[calls] - before[calls]
        d_busy = after[avg] * after[calls] - before[avg] * before[calls]
    except KeyError:
        return None
    return d_busy / d_calls if d_calls > 0 else None


@dataclass
class WindowReport:
    """What the engine reported over the measured window."""

    engine_metrics: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    experts_per_layer: list[float] | None = None
    expert_method: str = ""


DECODE_MODE = 2  # SGLang's ForwardMode.DECODE


@dataclass(frozen=True)
class ExpertCounts:
    """Distinct experts per MoE layer, averaged over the forward passes that count, and how."""

    per_layer: list[float]
    method: str


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
    for r in decode:
        ids = r["topk_ids_of_layer"]  # [layers, tokens, slots], unused slots -1
        per_pass.append([len({int(x) for x in layer.flatten().tolist() if x >= 0}) for layer in ids])
    layers = len(per_pass[0])
    per_layer = [sum(p[i] for p in per_pass) / len(per_pass) for i in range(layers)]
    return ExpertCounts(per_layer, f"SGLang expert-distribution recorder (per_token): distinct experts per layer "
                                   f"in each of {len(decode)} decode passes, averaged; {len(records) - len(decode)} "
                                   f"prefill passes left out; step times from the client")


class EngineProbe:
    """begin()/end() around the measured window: metrics deltas and, for SGLang, measured A."""

    def __init__(self, base_url: str, flavor: str, recorder: ExpertRecorder | None = None):
        self.base_url, self.flavor, self.recorder = base_url, flavor, recorder
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
                report.engine_metrics, notes = window(self._before, scrape(self.base_url), self.flavor)
                report.notes.update(notes)
            except ScrapeError as exc:
                report.notes["engine_metrics"] = str(exc)
        if self.recorder is not None and "experts" not in report.notes:
            try:
                counts = self.recorder.stop_and_read()
                report.experts_per_layer, report.expert_method = counts.per_layer, counts.method
            except ScrapeError as exc:
                report.notes["experts"] = str(exc)
        return report

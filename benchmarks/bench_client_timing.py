"""Timing truth of the measuring client against a server whose delays are known.

The reference server (capbench_core.testing) emits the first token at TTFT
and one more every TPOT, on an absolute schedule, in its own process. For 1,
16 and 64 concurrent streams this prints capbench's TTFT and TPOT error
(median and p99, ms and %) and the client's CPU use; with --guidellm PATH it
runs GuideLLM's CLI from that virtualenv against the same server, side by side.

    python benchmarks/bench_client_timing.py [--ttft-ms 50 --tpot-ms 10 --tokens 64]
    python -m venv /tmp/gl && /tmp/gl/bin/pip install guidellm==0.8.1
    python benchmarks/bench_client_timing.py --guidellm /tmp/gl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from capbench_core.analytics.metrics import request_timings
from capbench_core.contract.backend import EngineInfo, Request
from capbench_core.measure.loadgen import Arrivals, Phase, run_phase
from capbench_core.serving.openai_client import OpenAISession
from capbench_core.testing import Timing, reference_server
from capbench_torch_moe.commands import tiny_model_dir


def capbench_client(url: str, streams: int, requests: int, tokens: int) -> tuple[list[float], list[float], float]:
    session = OpenAISession(url, "reference", EngineInfo("ref", "0", {}), count_tokens=lambda t: len(t.split()))
    reqs = [Request(id=str(i), prompt="hello", max_tokens=tokens) for i in range(requests)]
    phase = Phase()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    asyncio.run(run_phase(session, reqs, Arrivals(streams), time.perf_counter_ns(), phase, False, lambda a, b: None))
    cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    timings = [request_timings(r) for r in phase.records if r.error_kind is None]
    return [t.ttft_ms for t in timings if t.ttft_ms], [t.tpot_ms for t in timings if t.tpot_ms], cpu


def guidellm_client(venv: Path, url: str, streams: int, requests: int, tokens: int) -> tuple[list[float], list[float]]:
    """GuideLLM's own CLI (0.8), concurrent profile, synthetic prompts; per-request TTFT and ITL from its
    JSON report. GuideLLM's inter-token latency, (E2E - TTFT) / (output - 1), is capbench's TPOT. It talks
    to /v1/chat/completions and loads the served model's tokenizer, which is why the reference server
    serves the tiny MoE's directory as its model name."""
    out = Path(tempfile.mkdtemp(prefix="guidellm-")) / "report.json"
    argv = [str(venv / "bin" / "guidellm"), "run", "--backend", f"kind=openai_http,target={url}",
            "--profile", f"kind=concurrent,streams={streams}", "--constraint", f"kind=max_requests,count={requests}",
            "--data", f"kind=synthetic_text,prompt_tokens=8,output_tokens={tokens}",
            "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    reqs = json.loads(out.read_text())["benchmarks"][0]["requests"]["successful"]
    return [r["time_to_first_token_ms"] for r in reqs], [r["inter_token_latency_ms"] for r in reqs]


def describe(name: str, ttft: list[float], tpot: list[float], timing: Timing, cpu: float | None) -> str:
    te = np.asarray(ttft) - timing.ttft_ms
    pe = (np.asarray(tpot) - timing.tpot_ms) / timing.tpot_ms * 100
    cpu_text = f"{cpu * 100:5.1f}%" if cpu is not None else "   — "
    return (f"{name:10} TTFT err median {np.median(te):6.3f} ms ({np.median(te) / timing.ttft_ms * 100:5.2f}%) "
            f"p99 {np.percentile(te, 99):6.3f} ms | TPOT err median {np.median(pe):6.3f}% "
            f"p99 {np.percentile(pe, 99):6.3f}% | client CPU {cpu_text}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ttft-ms", type=float, default=50.0)
    p.add_argument("--tpot-ms", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--streams", default="1,16,64")
    p.add_argument("--guidellm", type=Path, default=None, help="virtualenv with guidellm installed")
    a = p.parse_args()
    timing = Timing(ttft_ms=a.ttft_ms, tpot_ms=a.tpot_ms, model=str(tiny_model_dir()))
    print(f"reference server: TTFT {timing.ttft_ms} ms, TPOT {timing.tpot_ms} ms, {a.tokens} tokens per request")
    with reference_server(timing) as url:
        for streams in (int(s) for s in a.streams.split(",")):
            n = max(32, streams * 3)
            ttft, tpot, cpu = capbench_client(url, streams, n, a.tokens)
            print(f"streams={streams:3}  " + describe("capbench", ttft, tpot, timing, cpu), flush=True)
            if a.guidellm:
                g_ttft, g_tpot = guidellm_client(a.guidellm, url, streams, n, a.tokens)
                print(f"streams={streams:3}  " + describe("guidellm", g_ttft, g_tpot, timing, None), flush=True)


if __name__ == "__main__":
    main()

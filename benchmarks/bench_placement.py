"""llama.cpp decode on this CPU against the placement model's host-DRAM bound, for MoE checkpoints of several sizes.

Each checkpoint is a random-init Qwen3-MoE (the tiny model's tokenizer) run by capbench's in-process ``llamacpp``
backend at batch 1; the bound is ``analytics.placement.step_model`` for "all in host memory" with this machine's
measured DRAM bandwidth and the row's measured experts per layer (top-k at batch 1). Prints measured and bound
tokens/s and their ratio (the placement efficiency); published hybrid CPU-expert systems reach 0.2-0.6.

    python benchmarks/bench_placement.py            # three sizes, ~0.1 / 0.5 / 1.5 GB float32
    python benchmarks/bench_placement.py --quick    # the smallest only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from capbench_core.analytics.model_spec import spec_from_path
from capbench_core.analytics.placement import Placement, System, step_model
from capbench_torch_moe.random_init import make_checkpoint

SIZES = {"small": (384, 4, 16, 384), "medium": (768, 6, 16, 768), "large": (1024, 8, 24, 1024)}
INPUT_LEN, OUTPUT_LEN = 32, 64


def _checkpoint(root: Path, hidden: int, layers: int, experts: int, inter: int) -> Path:
    return make_checkpoint({"hidden_size": hidden, "num_hidden_layers": layers, "num_experts": experts,
                            "moe_intermediate_size": inter, "num_attention_heads": hidden // 64,
                            "num_key_value_heads": max(1, hidden // 256), "head_dim": 64,
                            "max_position_embeddings": 512, "torch_dtype": "float32"},
                           root / f"moe-{hidden}-{layers}-{experts}")


def _measure(path: Path, db: Path) -> dict:  # type: ignore[type-arg]
    out = db.parent / f"{path.name}.json"
    subprocess.run([str(Path(sys.executable).parent / "capbench"), "run", "--model", str(path), "--backend", "llamacpp",
                    "--task", "random", "--task-option", f"input_len={INPUT_LEN}", "--task-option",
                    f"output_len={OUTPUT_LEN}", "--num-requests", "8", "--warmup", "1", "--concurrency", "1",
                    "--db", f"sqlite:///{db}", "--json", str(out)], check=True, capture_output=True)
    return json.loads(out.read_text())[0]  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smallest checkpoint only")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="capbench-placement-"))
    sizes = ["small"] if args.quick else list(SIZES)
    print(f"{'checkpoint':12} {'weights GB':>10} {'DRAM GB/s':>9} {'measured tok/s':>14} {'bound tok/s':>11} "
          f"{'efficiency':>10}")
    for name in sizes:
        path = _checkpoint(root, *SIZES[name])
        row = _measure(path, root / "runs.db")
        m = row["metrics"]
        bw = m["peak_mem_bw_gbps"]
        spec = spec_from_path(path, name)
        system = System("here", 0, host_dram_gbps=bw, host_tflops=None)
        bound = step_model(spec, Placement("all in host memory"), system, batch=1,
                           context=INPUT_LEN + OUTPUT_LEN // 2, dtype=row["model"]["dtype"],
                           experts_per_layer=m["experts_activated_per_layer_mean"])
        measured = 1000 / m["tpot_ms_mean"]
        print(f"{name:12} {spec.weight_bytes(row['model']['dtype']) / 1e9:>10.3f} {bw:>9.1f} {measured:>14.1f} "
              f"{bound.tok_per_s:>11.1f} {measured / bound.tok_per_s:>10.2f}", flush=True)


if __name__ == "__main__":
    main()

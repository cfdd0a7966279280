"""Bytes per weight as served: what S-MBU counts a decode step's reads in.

One dtype for every weight is only the simple case. A GGUF stores each tensor in
its own type (a Q4_K_M file keeps some tensors in Q6_K, norms in F32); a
quantized checkpoint (``quantization_config``: fp8 with block scales, MXFP4,
AWQ/GPTQ with group scales) quantizes some weight classes and leaves the
embedding table, the LM head and the norms in the checkpoint's dtype.
:class:`WeightBytes` carries bytes per parameter for the three classes a decode
step reads differently: routed experts (only those activated), the embedding
table (only the rows of the step's tokens), and everything else (read whole).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from capbench_core.errors import CapbenchError

# Bytes per weight. GGUF block types count their scales: Q8_0 = 34 bytes per 32 weights,
# Q4_K = 144 bytes per 256 (Q4_K_M files keep some tensors in Q6_K: from_gguf counts them exactly).
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "int8": 1.0, "q8_0": 34 / 32,
               "q4_k": 144 / 256, "int4": 0.5, "mxfp4": 4.25 / 8, "q4_0": 18 / 32, "q4_1": 20 / 32,
               "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
#: llama.cpp's KV-cache type names (cache_type_k/v) -> capbench's
GGML_KV = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1",
           "q5_0": "q5_0", "q5_1": "q5_1", "iq4_nl": "iq4_nl"}


@dataclass(frozen=True)
class WeightBytes:
    """Bytes per parameter of routed experts, the embedding table and every other weight, and where from."""

    dense: float
    expert: float
    embedding: float
    source: str

    @classmethod
    def of_dtype(cls, dtype: str) -> WeightBytes:
        if dtype not in DTYPE_BYTES:
            raise CapbenchError(f"bytes per weight of dtype {dtype!r} are unknown (known: {', '.join(DTYPE_BYTES)})")
        b = DTYPE_BYTES[dtype]
        return cls(b, b, b, f"every weight in {dtype}")

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, data: Mapping[str, Any] | None, dtype: str) -> WeightBytes:
        """What a stored run counted in (runs stored before capbench kept it: their dtype's)."""
        return cls(**data) if data else cls.of_dtype(dtype)


def from_gguf(path: Path) -> WeightBytes:
    """Bytes per parameter of each class, summed over the GGUF's own tensors (their real types)."""
    import gguf

    try:
        tensors = gguf.GGUFReader(str(path)).tensors
    except (ValueError, OSError) as exc:
        raise CapbenchError(f"{path} is not a readable GGUF file: {exc}") from None
    totals = {"dense": [0, 0], "expert": [0, 0], "embedding": [0, 0]}
    for t in tensors:
        kind = "expert" if "_exps." in t.name else "embedding" if t.name.startswith("token_embd.") else "dense"
        totals[kind][0] += int(t.n_bytes)
        totals[kind][1] += int(t.n_elements)
    per = {k: (b / n if n else 0.0) for k, (b, n) in totals.items()}
    if not per["expert"]:
        per["expert"] = per["dense"]
    types = sorted({t.tensor_type.name for t in tensors})
    return WeightBytes(per["dense"], per["expert"], per["embedding"] or per["dense"],
                       f"GGUF tensor types ({', '.join(types)}) of {path.name}")


#: quant_method -> (bytes per weight of the quantized classes, what the quantized classes are)
def from_quantization(config: Mapping[str, Any], dtype: str) -> WeightBytes | None:
    """Bytes per weight of a checkpoint with a ``quantization_config``, None when it has none. Weights the
    scheme leaves alone (the embedding table, and the LM head, router and norms counted with "dense" only when
    the scheme quantizes no dense weight) stay in the checkpoint's dtype."""
    q = config.get("quantization_config")
    if not isinstance(q, Mapping):
        return None
    base = DTYPE_BYTES.get(dtype, 2.0)
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8":
        block = q.get("weight_block_size") or [128, 128]
        per = 1.0 + 4.0 / (int(block[0]) * int(block[1]))  # one float32 scale per block
        return WeightBytes(per, per, base, f"quantization_config fp8 (block {block[0]}x{block[1]} scales); "
                                           f"embeddings {dtype}")
    if method == "mxfp4":  # gpt-oss: experts only; 4-bit values + one 8-bit scale per 32
        return WeightBytes(base, 4.25 / 8, base, f"quantization_config mxfp4 (experts); the rest {dtype}")
    if method in ("awq", "gptq"):
        bits, group = int(q.get("bits") or q.get("w_bit") or 4), int(q.get("group_size") or q.get("q_group_size")
                                                                      or 128)
        per = bits / 8 + (2 + bits / 8) / group  # a 16-bit scale and a packed zero point per group
        return WeightBytes(per, per, base, f"quantization_config {method} ({bits}-bit, group {group}); "
                                           f"embeddings {dtype}")
    raise CapbenchError(f"quantization_config quant_method {method!r} is not one capbench counts the bytes of "
                        f"(fp8, mxfp4, awq, gptq)")

"""A checkpoint's GGUF, made by llama.cpp's own tools.

Every architecture llama.cpp converts is converted by its own
``convert_hf_to_gguf.py`` (with its ``conversion`` package and ``gguf-py``),
taken from the llama.cpp source the llama.cpp engine keeps (the
llama-cpp-python sdist it was built from: the same revision as llama-server)
and run with capbench's Python: F32, BF16, F16 and Q8_0 straight from the
converter, which reads one tensor at a time (memory about one shard, not the
model); Q4_K_M and other k-quants from a BF16 (or F32) conversion by
``llama-quantize``, built beside llama-server.

The embedded tiny MoE (and random-init models made from it) use capbench's own
byte-level BPE tokenizer, which llama.cpp's converter does not recognise ("BPE
pre-tokenizer was not recognized"): those few-MB checkpoints keep the small
exporter in ``gguf_export.py``.

Results are cached by a key made of the checkpoint's config, shard names,
sizes and modification times (``checkpoint_key``), so a start never re-reads
gigabytes to decide whether to convert.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from capbench_core.analytics.checkpoint import checkpoint_key, engine_view, stored_dtype
from capbench_core.contract.engine_env import home, installed
from capbench_core.errors import CapbenchError
from capbench_core.measure import progress
from capbench_core.serving.launcher import error_line

#: gguf_type -> the converter's --outtype (None: a k-quant made by llama-quantize from a 16-bit conversion)
OUTTYPES = {"f32": "f32", "bf16": "bf16", "f16": "f16", "q8_0": "q8_0", "q4_k_m": None}
#: gguf_type -> llama-quantize's type name
QUANT_TYPES = {"q4_k_m": "Q4_K_M"}
#: what the converter needs from the llama.cpp source
SOURCE_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-")
ENGINE = "llama.cpp"


def auto_type(model_dir: Path) -> str:
    """The GGUF type that keeps a checkpoint's own precision: f32 for float32 weights, f16 for float16, bf16
    otherwise (bf16, and quantized checkpoints, which the converter dequantises)."""
    stored = stored_dtype(model_dir)
    return {"float32": "f32", "float16": "f16"}.get(stored or "", "bf16")


def source_dir() -> Path:
    """The converter's part of the llama.cpp source, unpacked once from the sdist the llama.cpp engine keeps."""
    record = installed(ENGINE)
    if record is None:
        raise CapbenchError("converting a checkpoint to GGUF uses llama.cpp's own converter, from the source the "
                            "llama.cpp engine keeps: run `capbench engines install llama.cpp`")
    engine = home(ENGINE)
    sdists = sorted(engine.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        raise CapbenchError(f"{engine} keeps no llama.cpp source (llama_cpp_python-*.tar.gz): reinstall it with "
                            f"`capbench engines install llama.cpp --force`")
    target = engine / "converter"
    marker = target / ".unpacked"
    if marker.is_file() and marker.read_text() == sdists[-1].name:
        return target / "llama.cpp"
    with progress.waiting(f"unpacking llama.cpp's converter from {sdists[-1].name}"), \
            tarfile.open(sdists[-1]) as tar:
        members = []
        for member in tar.getmembers():
            rel = member.name.split("/vendor/llama.cpp/", 1)
            if len(rel) == 2 and rel[1].startswith(SOURCE_PARTS):
                member.name = "llama.cpp/" + rel[1]
                members.append(member)
        tar.extractall(target, members=members, filter="data")
    marker.write_text(sdists[-1].name)
    return target / "llama.cpp"


def vocab_gguf(name: str) -> Path:
    """One of the vocab-only GGUFs llama.cpp ships in ``models/`` (``qwen2``, ``llama-spm``, ``phi-3``, ...):
    real tokenizers for test checkpoints."""
    path = source_dir() / "models" / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("ggml-vocab-") for p in path.parent.glob("ggml-vocab-*.gguf"))
        raise CapbenchError(f"llama.cpp ships no vocab {name!r}; it has: {', '.join(known)}")
    return path


def _own_tokenizer(model_dir: Path) -> bool:
    """The checkpoint carries capbench's embedded byte-level tokenizer (the tiny MoE's)."""
    import capbench_core

    tiny = Path(capbench_core.__file__).resolve().parent / "data" / "tiny-moe" / "tokenizer.json"
    mine = model_dir / "tokenizer.json"
    return mine.is_file() and mine.stat().st_size == tiny.stat().st_size and \
        hashlib.sha256(mine.read_bytes()).digest() == hashlib.sha256(tiny.read_bytes()).digest()


def ensure_gguf(model_dir: Path, gguf_type: str, cache_dir: Path) -> Path:
    """The GGUF of (checkpoint, type): shipped next to the model, else made once into ``cache_dir``."""
    from capbench_llamacpp.gguf_export import GGUF_TYPES, export_f32, quantize

    if gguf_type not in GGUF_TYPES:
        raise CapbenchError(f"unsupported GGUF type {gguf_type!r}; supported: {', '.join(GGUF_TYPES)}")
    shipped = model_dir / f"{model_dir.name}-{gguf_type}.gguf"
    if shipped.is_file():
        return shipped
    stem = f"{model_dir.name}-{checkpoint_key(model_dir)}"
    target = cache_dir / f"{stem}-{gguf_type}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    if _own_tokenizer(model_dir):
        f32 = cache_dir / f"{stem}-f32.gguf"
        if not f32.is_file():
            export_f32(model_dir, f32)
        return f32 if gguf_type == "f32" else quantize(f32, target, gguf_type)
    outtype = OUTTYPES[gguf_type]
    if outtype is not None:
        return convert(model_dir, target, outtype)
    base = "f32" if stored_dtype(model_dir) == "float32" else "bf16"
    source = cache_dir / f"{stem}-{base}.gguf"
    if not source.is_file():
        convert(model_dir, source, base)
    return quantize_with_tool(source, target, gguf_type)


def convert(model_dir: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on a checkpoint directory; its log beside the output."""
    script = source_dir() / "convert_hf_to_gguf.py"
    log = out.with_suffix(".convert.log")
    tmp = out.with_suffix(".tmp")
    argv = [sys.executable, str(script), str(engine_view(model_dir)), "--outfile", str(tmp), "--outtype", outtype]
    with progress.waiting(f"converting {model_dir.name} to GGUF {outtype} (llama.cpp's convert_hf_to_gguf.py)"), \
            open(log, "w") as sink:
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, not the installed one
        proc = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              cwd=script.parent, env=env)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CapbenchError(f"llama.cpp's converter could not convert {model_dir.name}: {error_line(log)} "
                            f"(log: {log})")
    tmp.replace(out)
    return out


def quantize_with_tool(src: Path, out: Path, gguf_type: str) -> Path:
    """``llama-quantize SRC OUT TYPE``, built beside llama-server; llama.cpp's quantiser library function
    where an older llama.cpp environment has no llama-quantize."""
    from capbench_llamacpp.gguf_export import quantize

    tool = home(ENGINE) / "bin" / "llama-quantize"
    if not tool.is_file():
        return quantize(src, out, gguf_type)
    log = out.with_suffix(".quantize.log")
    tmp = out.with_suffix(".tmp")
    with progress.waiting(f"quantising {src.name} to {QUANT_TYPES[gguf_type]} (llama-quantize)"), \
            open(log, "w") as sink:
        proc = subprocess.run([str(tool), str(src), str(tmp), QUANT_TYPES[gguf_type]], stdout=sink,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CapbenchError(f"llama-quantize could not make {gguf_type} of {src.name}: {error_line(log)} "
                            f"(log: {log})")
    tmp.replace(out)
    return out

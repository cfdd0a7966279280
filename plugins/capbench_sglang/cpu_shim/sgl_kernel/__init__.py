"""The sgl-kernel CPU helpers SGLang's torch-native CPU path calls, written in plain torch.

Installed by `capbench engines install sglang` into SGLang's engine environment, and only where
no real sgl-kernel is installed: no PyPI wheel carries sgl-kernel's CPU ops (they are built for
Xeons with AVX-512/AMX), yet with SGLANG_USE_CPU_ENGINE=1 SGLang 0.5.23 imports a few of them
unconditionally. Without them SGLang chooses its own torch-native attention and MoE; capbench
records that variant with every result.

Only what this route calls is implemented, from what SGLang's source says it does. Any other
name raises NotImplementedError when called: this module never returns a made-up value.
"""

from __future__ import annotations

from typing import Any

SHIM = "capbench torch-native stand-in for sgl-kernel's CPU ops"


def assign_req_to_token_pool_cpu(req_pool_indices: Any, req_to_token: Any, start_offset: Any, end_offset: Any,
                                 out_cache_loc: Any, pool_len: int) -> None:
    """Write each request's new KV-cache locations into its row of the request-to-token table.

    As SGLang's Triton kernel ``assign_req_to_token_pool`` (srt/mem_cache/allocation.py): request i
    owns row ``req_pool_indices[i]``; positions ``start_offset[i]:end_offset[i]`` of that row get the
    next ``end_offset[i] - start_offset[i]`` entries of ``out_cache_loc``, which holds the requests'
    new locations one request after another.
    """
    taken = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        count = end - start
        req_to_token[row, start:end] = out_cache_loc[taken:taken + count]
        taken += count


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"sgl_kernel.{name} is not available: this is {SHIM}, which implements only "
                                  f"the helpers SGLang's torch-native CPU path calls")

    unavailable.__name__ = name
    return unavailable

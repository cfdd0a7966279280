"""capbench's argv against the engines' own argument parsers, where the parser can be imported.

SGLang's `ServerArgs.add_cli_args` needs only its Python package (install it with
`pip install --no-deps sglang` plus a handful of pure-Python modules); this test
is skipped, with that reason, where it is absent. vLLM's parser infers a device
platform when it is built and fails on a machine without a GPU platform, so
its flags are checked against its documented names in tests/test_engines.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from capbench_core.backend import ModelRef
from capbench_sglang import SGLangBackend


def test_sglang_parser_accepts_our_argv() -> None:
    server_args = pytest.importorskip("sglang.srt.server_args", reason="SGLang's package is not installed here")
    b = SGLangBackend()
    argv = b.argv(ModelRef("m", Path("/models/m")), 30001, b.parse({
        "tp": "8", "ep": "8", "dp": "2", "pp": "1", "mem_fraction_static": "0.8", "quantization": "fp8",
        "dtype": "bfloat16", "context_length": "4096", "max_running_requests": "64"}))
    parser = argparse.ArgumentParser()
    server_args.ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(argv[3:])
    assert (ns.model_path, ns.port, ns.tp_size, ns.ep_size, ns.dp_size, ns.pp_size) == ("/models/m", 30001, 8, 8, 2, 1)
    assert ns.enable_metrics and ns.expert_distribution_recorder_mode == "stat"
    assert (ns.mem_fraction_static, ns.quantization, ns.dtype, ns.context_length) == (0.8, "fp8", "bfloat16", 4096)
    assert (ns.max_running_requests, ns.random_seed, ns.served_model_name) == (64, 0, "m")

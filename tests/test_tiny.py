"""The embedded tiny MoE: its task accuracy, and the build command that makes it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from capbench_tasks import arith
from capbench_torch_moe import tiny as tiny_module
from capbench_torch_moe.loading import load_hf
from tests.conftest import run_cli


def test_shipped_model_solves_held_out_addition(tiny) -> None:
    model = load_hf(tiny.path)
    tok = Tokenizer.from_file(str(tiny.path / "tokenizer.json"))
    accuracy = _accuracy(model, tok)
    assert accuracy >= 0.9
    report = json.loads((tiny.path / "build_report.json").read_text())
    assert report["held_out_exact_match"] >= 0.9


def _accuracy(model, tok) -> float:  # type: ignore[no-untyped-def]
    from capbench_torch_moe.tiny import EOS, held_out_accuracy

    return held_out_accuracy(model, tok, tok.token_to_id(EOS), n=300, seed=7)


def test_split_keeps_held_out_problems_out_of_training() -> None:
    train = {p for p, _ in zip(arith.problems(1, held_out=False), range(5000))}
    held = {p for p, _ in zip(arith.problems(2, held_out=True), range(500))}
    assert not train & held
    assert all(arith.is_held_out(a, b) for a, b in held)


def test_tokenizer_splits_digits_one_by_one(tiny) -> None:
    tok = Tokenizer.from_file(str(tiny.path / "tokenizer.json"))
    assert tok.encode("123+456=").tokens == ["1", "2", "3", "+", "4", "5", "6", "="]


def test_build_tiny_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    proc = run_cli("model", "build-tiny", "--out", str(out), "--steps", "30", check=True)
    assert "held-out exact match" in proc.stdout
    report = json.loads((out / "build_report.json").read_text())
    assert report["recipe"]["steps"] == 30 and report["weights_dtype"] == "bfloat16"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (load_hf(out)(ids) - ref(ids).logits).abs().max().item() <= 1e-4
    fast = transformers.AutoTokenizer.from_pretrained(str(out))
    assert fast("12+3=").input_ids == Tokenizer.from_file(str(out / "tokenizer.json")).encode("12+3=").ids


def test_shipped_model_was_built_from_the_current_recipe(tiny) -> None:
    from dataclasses import asdict

    report = json.loads((tiny.path / "build_report.json").read_text())
    assert report["recipe"] == asdict(tiny_module.TinyRecipe())


def test_build_is_reproducible(tmp_path: Path) -> None:
    import hashlib

    digests = []
    for name in ("a", "b"):
        run_cli("model", "build-tiny", "--out", str(tmp_path / name), "--steps", "5", check=True)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]

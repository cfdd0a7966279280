"""torch_moe against Hugging Face transformers, and its engine against itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from capbench_core.contract.backend import Request
from capbench_core.errors import CapbenchError
from capbench_torch_moe.engine import Channel, Engine, TorchMoESession
from capbench_torch_moe.loading import load_hf
from capbench_torch_moe.model import ForwardStats, KVCache, MoETransformer

transformers = pytest.importorskip("transformers")


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def random_mixtral(path: Path) -> Path:
    cfg = transformers.MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=128,
        rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init, so routing is not a near-tie everywhere
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return path


def test_tiny_moe_logits_equal_transformers(tiny) -> None:
    ids = torch.tensor([[5, 17, 23, 40, 11, 9, 30, 2]])
    ours = load_hf(tiny.path)
    with torch.no_grad():
        mine = ours(ids)
    ref = hf_logits(tiny.path, ids)
    assert (mine - ref).abs().max().item() <= 1e-4


def test_mixtral_layout_logits_equal_transformers(tmp_path: Path) -> None:
    path = random_mixtral(tmp_path / "mixtral")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = load_hf(path)(ids)
    assert (mine - hf_logits(path, ids)).abs().max().item() <= 1e-4


def _decode_all(model: MoETransformer, prompts: list[list[int]], steps: int) -> list[list[torch.Tensor]]:
    """Prefill each prompt into its slot, then decode all together greedily."""
    cache = KVCache(model.cfg, len(prompts), 64, torch.float32)
    last, outs = [], [[] for _ in prompts]
    with torch.no_grad():
        for slot, p in enumerate(prompts):
            kv: list[tuple[torch.Tensor, torch.Tensor]] = []
            logits = model(torch.tensor([p]), kv_out=kv)[0, -1]
            cache.store_prefill(slot, kv)
            outs[slot].append(logits)
            last.append(int(logits.argmax()))
        lengths = [len(p) for p in prompts]
        for _ in range(steps):
            logits = model.decode(torch.tensor(last), torch.tensor(lengths), cache)
            for i in range(len(prompts)):
                outs[i].append(logits[i])
            last = [int(x) for x in logits.argmax(-1)]
            lengths = [n + 1 for n in lengths]
    return outs


def test_batched_decode_with_kv_cache_equals_full_forward(tiny) -> None:
    model = load_hf(tiny.path)
    prompts = [[5, 17, 23], [40, 11, 9, 30, 2, 8], [7]]
    outs = _decode_all(model, prompts, steps=6)
    with torch.no_grad():
        for prompt, got in zip(prompts, outs):
            seq = list(prompt) + [int(t.argmax()) for t in got[:-1]]
            full = model(torch.tensor([seq]))[0, len(prompt) - 1:]
            assert (torch.stack(got) - full).abs().max().item() <= 1e-4


def test_activation_counts_equal_brute_force_recount(tiny) -> None:
    model = load_hf(tiny.path)
    seen: list[torch.Tensor] = []
    for block in model.blocks:
        block.moe.router.register_forward_pre_hook(lambda _module, args: seen.append(args[0].clone()))
    cache = KVCache(model.cfg, 4, 32, torch.float32)
    stats = ForwardStats()
    with torch.no_grad():
        for slot, p in enumerate([[5, 6], [7, 8, 9], [10], [11, 12]]):
            kv: list[tuple[torch.Tensor, torch.Tensor]] = []
            model(torch.tensor([p]), kv_out=kv)
            cache.store_prefill(slot, kv)
        seen.clear()
        model.decode(torch.tensor([1, 2, 3, 4]), torch.tensor([2, 3, 1, 2]), cache, stats)
    assert len(seen) == model.cfg.num_layers
    for layer, (x, block) in enumerate(zip(seen, model.blocks)):
        tokens = [0] * model.cfg.num_experts
        w = block.moe.router.weight
        for token in x:  # one token at a time, plain Python ranking
            scores = [float(token @ w[e]) for e in range(model.cfg.num_experts)]
            for e in sorted(range(len(scores)), key=lambda e: -scores[e])[:model.cfg.top_k]:
                tokens[e] += 1
        assert stats.expert_tokens[layer] == tokens
        assert stats.distinct_experts[layer] == sum(1 for n in tokens if n)


def test_simulated_routing_balances_the_picks(tiny) -> None:
    """simulate_routing: round-robin hands out experts in turn (every expert equally often), uniform draws k
    distinct experts per token; the router's own picks are skewed on the same tokens."""
    from capbench_core.analytics.routing import imbalance
    from capbench_torch_moe.model import simulate_routing

    model = load_hf(tiny.path)
    e, k = model.cfg.num_experts, model.cfg.top_k
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * e])
    loads = {}
    for mode in (None, "round-robin", "uniform"):
        simulate_routing(model, mode)
        stats = ForwardStats()
        with torch.no_grad():
            model(tokens, stats)
        loads[mode] = stats.expert_tokens
    assert all(layer == [8 * k] * e for layer in loads["round-robin"])
    assert all(sum(layer) == 8 * e * k for layer in loads["uniform"])
    assert max(imbalance(layer) or 0 for layer in loads["uniform"]) < min(imbalance(layer) or 0
                                                                          for layer in loads[None])


def _generate(session: TorchMoESession, requests: list[Request]) -> list[str]:
    async def one(r: Request) -> str:
        return "".join([c.text async for c in session.stream(r)])

    async def all_of() -> list[str]:
        return list(await asyncio.gather(*(one(r) for r in requests)))

    return asyncio.run(all_of())


def test_engine_batches_concurrent_requests_without_changing_outputs(tiny) -> None:
    from tokenizers import Tokenizer

    model = load_hf(tiny.path)
    tok = Tokenizer.from_file(str(tiny.path / "tokenizer.json"))
    engine = Engine(lambda: model, tok, max_batch=8, max_model_len=64)
    session = TorchMoESession(engine, None)
    try:
        reqs = [Request(id=str(i), prompt=f"{100 + i * 37}+{250 + i * 11}=", max_tokens=6) for i in range(8)]
        alone = [_generate(session, [r])[0] for r in reqs]
        before = len(engine.steps)
        together = _generate(session, reqs)
        batched_steps = engine.steps[before:]
    finally:
        engine.close()
    assert together == alone
    assert alone[0] == str(100 + 250)
    assert max(s.batch_size for s in batched_steps) > 1
    for s in batched_steps:
        assert len(s.distinct_experts) == model.cfg.num_layers
        assert all(model.cfg.top_k <= a <= model.cfg.num_experts for a in s.distinct_experts)


def test_too_long_request_is_refused_clearly(tiny) -> None:
    from tokenizers import Tokenizer

    model = load_hf(tiny.path)
    engine = Engine(lambda: model, Tokenizer.from_file(str(tiny.path / "tokenizer.json")), 2, 16)
    try:
        with pytest.raises(CapbenchError, match="exceeds max_model_len 16"):
            engine.submit(Request(id="x", prompt="1+1=", max_tokens=40),
                          Channel(asyncio.new_event_loop(), asyncio.Queue()))
    finally:
        engine.close()


def test_missing_weights_and_bad_config_name_the_file(tmp_path: Path, tiny) -> None:
    with pytest.raises(CapbenchError, match="config.json is missing"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text((tiny.path / "config.json").read_text())
    with pytest.raises(CapbenchError, match="no \\*.safetensors weights"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CapbenchError, match="model.safetensors is not a readable safetensors file"):
        load_hf(tmp_path)


def test_stop_strings_end_the_output_before_them(tiny) -> None:
    from tokenizers import Tokenizer

    model = load_hf(tiny.path)
    engine = Engine(lambda: model, Tokenizer.from_file(str(tiny.path / "tokenizer.json")), 4, 64)
    session = TorchMoESession(engine, None)

    async def collect(req: Request) -> list:  # type: ignore[type-arg]
        return [c async for c in session.stream(req)]

    try:
        chunks = asyncio.run(collect(Request(id="s", prompt="123+456=", max_tokens=8, stop=("9",))))
    finally:
        engine.close()
    assert "".join(c.text for c in chunks) == "57"
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]

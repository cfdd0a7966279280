"""Build the embedded tiny MoE: tokenizer, Qwen3-MoE config, seeded training.

`capbench model build-tiny --out DIR` calls `build()`. The result is a Hugging
Face directory (config.json, model.safetensors, tokenizer.json) that
transformers, the torch_moe backend and llama.cpp (after GGUF export) all read.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from capbench_tasks import arith
from capbench_torch_moe.loading import to_hf_state_dict
from capbench_torch_moe.model import ForwardStats, MoEConfig, MoETransformer, init_weights

# Qwen2's pre-tokenizer split (digits one by one); llama.cpp knows it as pre-tokenizer "qwen2".
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
EOS = "<|endoftext|>"
TOKENIZER_TEXT = (
    "The sum of two numbers is written after the equals sign. "
    "Add the numbers, carry the tens, and write the answer. "
    "This tiny mixture of experts model was trained to add numbers with up to three digits."
)


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the built model; stored beside it."""

    seed: int = 1234
    vocab_size: int = 320
    hidden_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 128
    max_positions: int = 64
    steps: int = 3000
    batch_size: int = 128
    lr: float = 3e-3
    warmup: int = 100
    aux_loss_coef: float = 0.01
    eval_problems: int = 1000


def build_tokenizer(vocab_size: int) -> Any:
    """A GPT-2-style byte-level BPE with Qwen2's split, trained on a fixed text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    corpus = [TOKENIZER_TEXT] * 20 + [
        f"{arith.prompt(a, b)}{arith.answer(a, b)}"
        for a, b in ((rng.randint(0, 999), rng.randint(0, 999)) for _ in range(200))]
    tok.train_from_iterator(corpus, trainer)
    return tok


def hf_config(r: TinyRecipe, eos_id: int, vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": r.hidden_size,
        "intermediate_size": r.moe_intermediate_size * r.top_k,
        "num_hidden_layers": r.num_layers,
        "num_attention_heads": r.num_heads,
        "num_key_value_heads": r.num_kv_heads,
        "head_dim": r.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": r.max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_experts": r.num_experts,
        "num_experts_per_tok": r.top_k,
        "moe_intermediate_size": r.moe_intermediate_size,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "output_router_logits": False,
        "router_aux_loss_coef": r.aux_loss_coef,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": "bfloat16",
    }


def untie_for_shipping(weights: dict[str, torch.Tensor],
                       config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Store the LM head explicitly (a copy of the embedding table) and say the weights are untied.

    The model is trained with tied embeddings. Shipping the head as its own tensor changes no logit,
    and every engine can load it: SGLang 0.5.23's Qwen3-MoE ignores ``tie_word_embeddings`` and leaves
    ``lm_head`` uninitialised (docs/engines.md).
    """
    if not config.get("tie_word_embeddings"):
        return weights, config
    return ({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()},
            {**config, "tie_word_embeddings": False})


def _batch(tok: Any, pairs: list[tuple[int, int]], eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and a loss mask that covers the answer and EOS only."""
    seqs, masks = [], []
    for a, b in pairs:
        p = tok.encode(arith.prompt(a, b)).ids
        ans = tok.encode(arith.answer(a, b)).ids + [eos_id]
        seqs.append(p + ans)
        masks.append([0] * len(p) + [1] * len(ans))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), eos_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, mask


def _balance_loss(stats: ForwardStats, num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss averaged over layers."""
    total = torch.zeros(())
    for logits, ids in zip(stats.router_logits, stats.topk_ids):
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        load = torch.bincount(ids.reshape(-1), minlength=num_experts).float() / (ids.shape[0] * top_k)
        total = total + num_experts * (load * probs.mean(0)).sum()
    return total / max(len(stats.router_logits), 1)


@torch.no_grad()
def greedy_answers(model: MoETransformer, tok: Any, pairs: list[tuple[int, int]], eos_id: int,
                   max_new: int = 6) -> list[str]:
    """Greedy completions, batched by prompt length (full forward each step)."""
    by_len: dict[int, list[int]] = {}
    encoded = [tok.encode(arith.prompt(a, b)).ids for a, b in pairs]
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    out = [""] * len(pairs)
    for idxs in by_len.values():
        seq = torch.tensor([encoded[i] for i in idxs])
        done = torch.zeros(len(idxs), dtype=torch.bool)
        gen: list[list[int]] = [[] for _ in idxs]
        for _ in range(max_new):
            nxt = model(seq)[:, -1].argmax(-1)
            for j, t in enumerate(nxt.tolist()):
                if not done[j]:
                    if t == eos_id:
                        done[j] = True
                    else:
                        gen[j].append(t)
            if bool(done.all()):
                break
            seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        for j, i in enumerate(idxs):
            out[i] = tok.decode(gen[j])
    return out


def held_out_accuracy(model: MoETransformer, tok: Any, eos_id: int, n: int, seed: int = 99) -> float:
    pairs = [p for p, _ in zip(arith.problems(seed, held_out=True), range(n))]
    got = greedy_answers(model, tok, pairs, eos_id)
    return sum(g == arith.answer(a, b) for g, (a, b) in zip(got, pairs)) / n


def build(out_dir: Path, recipe: TinyRecipe = TinyRecipe(), threads: int | None = None,
          progress: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """Train the tiny MoE and write it to out_dir; returns the build report."""
    from safetensors.torch import save_file

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    tok = build_tokenizer(recipe.vocab_size)
    eos_id = tok.token_to_id(EOS)
    config = hf_config(recipe, eos_id, tok.get_vocab_size())
    cfg = MoEConfig.from_hf(config)
    model = MoETransformer(cfg)
    init_weights(model, recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.98))
    stream = arith.problems(recipe.seed, held_out=False)
    model.train()
    loss_value = math.nan
    for step in range(recipe.steps):
        lr = recipe.lr * min(1.0, (step + 1) / recipe.warmup) * 0.5 * (
            1 + math.cos(math.pi * step / recipe.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, mask = _batch(tok, [next(stream) for _ in range(recipe.batch_size)], eos_id)
        stats = ForwardStats()
        logits = model(ids[:, :-1], stats=stats, keep_router_logits=True)
        target = ids[:, 1:]
        m = mask[:, 1:]
        loss = F.cross_entropy(logits[m], target[m])
        total = loss + recipe.aux_loss_coef * _balance_loss(stats, cfg.num_experts, cfg.top_k)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(loss.detach())
        if progress:
            progress(step + 1, recipe.steps, loss_value)
    model.eval()
    with torch.no_grad():  # ship bfloat16 weights (half the size); score the rounded model
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    accuracy = held_out_accuracy(model, tok, eos_id, recipe.eval_problems)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, config = untie_for_shipping({k: v.to(torch.bfloat16) for k, v in to_hf_state_dict(model).items()},
                                         config)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
        "bos_token": None, "model_max_length": recipe.max_positions, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}, indent=2) + "\n")
    report = {
        "recipe": asdict(recipe),
        "held_out_exact_match": accuracy,
        "held_out_problems": recipe.eval_problems,
        "weights_dtype": "bfloat16",
        "final_train_loss": loss_value,
        "train_seconds": round(time.perf_counter() - started, 1),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

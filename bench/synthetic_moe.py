"""Synthetic Mixtral-architecture MoE checkpoints with random weights, written the way the Hub stores them.

``write_synthetic_mixtral(out_dir, ...)`` writes ``config.json``, sharded ``model-XXXXX-of-YYYYY.safetensors`` files
with ``model.safetensors.index.json`` in the Hub's per-expert layout (``...block_sparse_moe.experts.3.w1.weight``),
and the shipped model's tokenizer. Tensors are generated and written a few layers at a time, so writing a checkpoint
never holds more than one shard in memory. Used by the low-memory tests and by the benchmarks (``bench_pipeline.py``,
``gpu_bench.py``: Mixtral-8x7B's shape is ``hidden=4096, ffn=14336, experts=8, top_k=2, heads=32, kv_heads=8,
vocab=32000``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "mopeq-tiny-moe"

MIXTRAL_8X7B = dict(hidden=4096, ffn=14336, experts=8, top_k=2, heads=32, kv_heads=8, vocab=32000, layers=32)


def _tensors_for_layer(i: int, hidden: int, ffn: int, experts: int, heads: int, kv_heads: int, dtype, gen,
                       device, std: float) -> dict[str, torch.Tensor]:
    head_dim = hidden // heads
    p = f"model.layers.{i}."

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype).cpu()

    t = {
        p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
        p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
        p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
        p + "self_attn.k_proj.weight": rnd(kv_heads * head_dim, hidden),
        p + "self_attn.v_proj.weight": rnd(kv_heads * head_dim, hidden),
        p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
        p + "block_sparse_moe.gate.weight": rnd(experts, hidden) * 10,  # decisive routing
    }
    for e in range(experts):
        q = f"{p}block_sparse_moe.experts.{e}."
        t[q + "w1.weight"] = rnd(ffn, hidden)
        t[q + "w3.weight"] = rnd(ffn, hidden)
        t[q + "w2.weight"] = rnd(hidden, ffn)
    return t


def checkpoint_params(*, layers: int, hidden: int, ffn: int, experts: int, heads: int, kv_heads: int, vocab: int,
                      **_) -> dict[str, int]:
    head_dim = hidden // heads
    attn = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    expert = 3 * hidden * ffn * experts
    per_layer = attn + expert + experts * hidden + 2 * hidden
    return {"experts": expert * layers, "per_layer": per_layer,
            "total": per_layer * layers + 2 * vocab * hidden + hidden}


def write_synthetic_mixtral(out: Path, *, layers: int = 16, hidden: int = 1024, ffn: int = 96, experts: int = 8,
                            top_k: int = 2, heads: int = 8, kv_heads: int = 8, vocab: int = 4096,
                            dtype: torch.dtype = torch.float32, layers_per_shard: int = 4, seed: int = 0,
                            device: str = "cpu", std: float = 0.02, max_position: int = 4096) -> Path:
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
                        num_experts_per_tok=top_k, max_position_embeddings=max_position, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype)
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.save_pretrained(out)
    gen = torch.Generator(device=device).manual_seed(seed)
    n_shards = 1 + math.ceil(layers / layers_per_shard)
    weight_map: dict[str, str] = {}
    total = 0

    def save(tensors: dict[str, torch.Tensor], k: int) -> None:
        nonlocal total
        name = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    save({"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen, device=device) * std).to(dtype).cpu(),
          "lm_head.weight": (torch.randn(vocab, hidden, generator=gen, device=device) * std).to(dtype).cpu(),
          "model.norm.weight": torch.ones(hidden, dtype=dtype)}, 0)
    for k, start in enumerate(range(0, layers, layers_per_shard), start=1):
        tensors: dict[str, torch.Tensor] = {}
        for i in range(start, min(start + layers_per_shard, layers)):
            tensors.update(_tensors_for_layer(i, hidden, ffn, experts, heads, kv_heads, dtype, gen, device, std))
        save(tensors, k)
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    for f in TOKENIZER_DIR.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return out

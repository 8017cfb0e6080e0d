"""One map between this project's Megatron-Core GPT weights (local spec) and transformers' Llama weights, used in
both directions: import (model/import_hf.py) and export (model/export_hf.py).

Where the two layouts differ:
  QKV       Megatron fuses q, k and v into `linear_qkv`, interleaved per query group:
            [group][the group's q heads, then k, then v][head_dim] x hidden
  gate/up   Megatron fuses them into `linear_fc1`: [gate; up] (SwiGLU: silu(first half) * second half)
  vocab     Megatron's embedding and output rows are padded (ModelConfig.padded_vocab_size); the padding rows are
            not Llama's: export drops them, import zeroes them
  tied      with tie_embeddings, Llama's lm_head is the embedding, and Megatron has no output layer
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig


@dataclass(frozen=True)
class Weight:
    """One Llama tensor and where it lives in Megatron's."""

    hf: str
    megatron: str
    part: str = "whole"  # whole | q | k | v | gate | up | vocab (the rows of the real vocabulary)


LAYER = [  # (Llama name under model.layers.N., Megatron name under decoder.layers.N., part)
    ("input_layernorm.weight", "input_layernorm.weight", "whole"),
    ("self_attn.q_proj.weight", "self_attention.linear_qkv.weight", "q"),
    ("self_attn.k_proj.weight", "self_attention.linear_qkv.weight", "k"),
    ("self_attn.v_proj.weight", "self_attention.linear_qkv.weight", "v"),
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight", "whole"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", "whole"),
    ("mlp.gate_proj.weight", "mlp.linear_fc1.weight", "gate"),
    ("mlp.up_proj.weight", "mlp.linear_fc1.weight", "up"),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight", "whole"),
]


def llama_weights(m: ModelConfig) -> list[Weight]:
    """Every Llama tensor of the model, in the order a Llama state dict lists them."""
    weights = [Weight("model.embed_tokens.weight", "embedding.word_embeddings.weight", "vocab")]
    for i in range(m.num_layers):
        weights += [Weight(f"model.layers.{i}.{hf}", f"decoder.layers.{i}.{megatron}", part)
                    for hf, megatron, part in LAYER]
    weights.append(Weight("model.norm.weight", "decoder.final_layernorm.weight"))
    if not m.tie_embeddings:
        weights.append(Weight("lm_head.weight", "output_layer.weight", "vocab"))
    return weights


def megatron_part(w: Weight, tensor: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """The region of Megatron's `tensor` that holds `w`, as a view (import copies into it, export reads it)."""
    if w.part in ("q", "k", "v"):
        heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
        qkv = tensor.view(groups, heads // groups + 2, m.hidden_size // heads, -1)
        return {"q": qkv[:, :-2], "k": qkv[:, -2], "v": qkv[:, -1]}[w.part]
    if w.part in ("gate", "up"):
        return tensor[:m.ffn_hidden_size] if w.part == "gate" else tensor[m.ffn_hidden_size:]
    if w.part == "vocab":
        return tensor[:m.vocab_size]
    return tensor


def llama_tensor(w: Weight, tensor: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """`w` in Llama's shape, read from Megatron's `tensor`: a view where the layouts agree, a copy of this one
    tensor where they do not (q, k and v of the interleaved QKV)."""
    part = megatron_part(w, tensor, m)
    return part.reshape(-1, part.shape[-1]) if part.dim() > 2 else part

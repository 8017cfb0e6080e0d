"""Export a checkpoint (saved at any TP/PP) as a Hugging Face `transformers` Llama folder.

    python -m model.export_hf runs/tiny-<hash>/checkpoints/step-000300 exports/tiny

The checkpoint is loaded into a single-process Megatron model (dist_checkpointing reshards it), its weights are
renamed and split into Llama's layout, and the folder gets safetensors weights, config.json, the tokenizer
files (with the chat template) and generation_config.json. Before the folder is published, the exported model's
logits are compared with Megatron's on a validation row; a mismatch fails the export.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from model.checkpoint import read_train_state
from model.config import ModelConfig, ParallelConfig, TrainConfig
from model.data import load_manifest, validation_rows
from model.distributed import init_single_process

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
MAX_LOGIT_DIFF = 1e-4  # fp32


def checkpoint_info(checkpoint: Path) -> dict:
    """What model/train.py recorded with the checkpoint: step, preset, model config, manifest."""
    state = read_train_state(checkpoint)
    if "model" not in state:
        raise ValueError(f"{checkpoint} does not record its model config (saved by an older model/train.py); "
                         f"re-save it by resuming training for one step")
    return state


def tokenizer_dir(manifest_dir: Path) -> Path:
    lineage = load_manifest(manifest_dir)["lineage"]
    if "tokenizer_dir" in lineage:
        return Path(lineage["tokenizer_dir"])
    return manifest_dir.parents[1] / "tokenizer" / lineage["tokenizer"]


def load_megatron(checkpoint: Path):
    """(GPTModel at TP=1/PP=1 in fp32 with the checkpoint's weights, ModelConfig, checkpoint info)."""
    from model.checkpoint import load_checkpoint
    from model.gpt import build_model, transformer_config

    info = checkpoint_info(checkpoint)
    model_cfg = ModelConfig(**info["model"])
    init_single_process()
    config = transformer_config(model_cfg, ParallelConfig(), TrainConfig(bf16=False))
    gpt = build_model(model_cfg, config, pre_process=True, post_process=True)
    load_checkpoint(checkpoint, gpt)
    return gpt.eval(), model_cfg, info


def megatron_logits(gpt, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[b, s, vocab] logits; `attention_mask` as in training (True = blocked), causal when None."""
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        return gpt(tokens, positions, attention_mask).float()


def llama_state_dict(megatron_sd: dict, m: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename Megatron's local-spec weights to transformers' Llama names, splitting the fused projections."""
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    head_dim = m.hidden_size // heads
    out = {"model.embed_tokens.weight": megatron_sd["embedding.word_embeddings.weight"],
           "model.norm.weight": megatron_sd["decoder.final_layernorm.weight"],
           "lm_head.weight": megatron_sd["output_layer.weight"]}
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        # Megatron interleaves QKV per query group: [group][q heads of the group, k, v][head_dim] x hidden.
        qkv = megatron_sd[src + "self_attention.linear_qkv.weight"].view(groups, heads // groups + 2, head_dim, -1)
        q, k, v = qkv[:, :-2], qkv[:, -2], qkv[:, -1]
        gate, up = megatron_sd[src + "mlp.linear_fc1.weight"].chunk(2)  # SwiGLU: silu(first half) * second
        out.update({
            dst + "input_layernorm.weight": megatron_sd[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q.reshape(heads * head_dim, -1),
            dst + "self_attn.k_proj.weight": k.reshape(groups * head_dim, -1),
            dst + "self_attn.v_proj.weight": v.reshape(groups * head_dim, -1),
            dst + "self_attn.o_proj.weight": megatron_sd[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": megatron_sd[src + "pre_mlp_layernorm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": megatron_sd[src + "mlp.linear_fc2.weight"],
        })
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export(checkpoint: Path, out: Path, dtype: str = "float32", check: bool = True) -> dict:
    import sentencepiece as spm
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    checkpoint, out = Path(checkpoint).resolve(), Path(out)
    gpt, m, info = load_megatron(checkpoint)
    manifest_dir = Path(info["manifest"])
    tok_dir = tokenizer_dir(manifest_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    stop_ids = [sp.eos_id(), sp.piece_to_id("<|end|>")]
    config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads, hidden_act="silu",
        max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_epsilon, initializer_range=m.init_method_std,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)}, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=sp.bos_id(), eos_token_id=stop_ids,
        pad_token_id=sp.eos_id())
    hf = LlamaForCausalLM(config)
    hf.load_state_dict(llama_state_dict(gpt.state_dict(), m), strict=True)
    hf.eval()

    report = {"checkpoint": str(checkpoint), "step": info["step"], "preset": info["preset"],
              "parameters": sum(p.numel() for p in hf.parameters())}
    if check:
        tokens = validation_rows(manifest_dir, 2)["tokens"][:, :-1]
        with torch.no_grad():
            diff = (hf(tokens).logits.float() - megatron_logits(gpt, tokens)).abs().max().item()
        report["max_logit_diff"] = diff
        if not diff <= MAX_LOGIT_DIFF:
            raise RuntimeError(f"exported model disagrees with Megatron: max |logit difference| {diff:.3g} > "
                               f"{MAX_LOGIT_DIFF} on {tuple(tokens.shape)} validation tokens")

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(bos_token_id=sp.bos_id(), eos_token_id=stop_ids, pad_token_id=sp.eos_id(),
                     max_new_tokens=128, do_sample=False).save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, tmp / name)
    (tmp / "export_info.json").write_text(json.dumps({**report, "model": info["model"], "dtype": dtype,
                                                      "manifest": str(manifest_dir)}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a checkpoints/step-NNNNNN directory")
    p.add_argument("out", type=Path, help="output folder (replaced atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-check", action="store_true", help="skip the logit comparison with Megatron")
    args = p.parse_args(argv)
    report = export(args.checkpoint, args.out, args.dtype, check=not args.no_check)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

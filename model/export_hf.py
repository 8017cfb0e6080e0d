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

from model.chat import CHAT_TEMPLATE
from model.checkpoint import checkpoint_tokenizer, read_train_state
from model.config import ModelConfig, ParallelConfig, TrainConfig
from model.data import validation_rows
from model.distributed import init_single_process
from model.tokenizer import TOKENIZER_FILES, Tokenizer

MAX_LOGIT_DIFF = 1e-4  # fp32
# End-of-turn tokens of known chat templates (the project's, Llama-3's, ChatML's, Gemma's): generation stops at them.
END_OF_TURN = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>")


def checkpoint_info(checkpoint: Path) -> dict:
    """What model/train.py (or model/import_hf.py) recorded with the checkpoint: step, preset, model config..."""
    state = read_train_state(checkpoint)
    if "model" not in state:
        raise ValueError(f"{checkpoint} does not record its model config (saved by an older model/train.py); "
                         f"re-save it by resuming training for one step")
    return state


def load_megatron(checkpoint: Path):
    """(GPTModel at TP=1/PP=1 in fp32 with the checkpoint's weights, ModelConfig, checkpoint info)."""
    from model.checkpoint import load_checkpoint
    from model.gpt import build_model, transformer_config

    info = checkpoint_info(checkpoint)
    model_cfg = ModelConfig(**info["model"])
    init_single_process()
    config = transformer_config(model_cfg, ParallelConfig(), TrainConfig(precision="fp32"))
    gpt = build_model(model_cfg, config, pre_process=True, post_process=True)
    load_checkpoint(checkpoint, gpt)
    return gpt.eval(), model_cfg, info


def megatron_logits(gpt, m: ModelConfig, tokens: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[b, s, vocab] logits over the tokenizer's ids (the padding columns dropped); `attention_mask` as in
    training (True = blocked), causal when None."""
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        return gpt(tokens, positions, attention_mask).float()[..., :m.vocab_size]


def llama_state_dict(megatron_sd: dict, m: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename Megatron's local-spec weights to transformers' Llama names, splitting the fused projections and
    dropping the vocabulary's padding rows (model/import_hf.py does the reverse)."""
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    head_dim = m.hidden_size // heads
    out = {"model.embed_tokens.weight": megatron_sd["embedding.word_embeddings.weight"][:m.vocab_size],
           "model.norm.weight": megatron_sd["decoder.final_layernorm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = megatron_sd["output_layer.weight"][:m.vocab_size]
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
    # Views of Megatron's parameters where the layout allows (no copy); the split q, k and v are new tensors.
    return {k: v.detach().contiguous() for k, v in out.items()}


def hf_config(info: dict, m: ModelConfig, tokenizer: Tokenizer, stop_ids: list[int]):
    """The LlamaConfig of the exported folder: an imported model's own config.json (every field training did not
    change kept), else one built from the ModelConfig."""
    from transformers import LlamaConfig

    if "hf_config" in info:
        return LlamaConfig.from_dict({k: v for k, v in info["hf_config"].items()
                                      if k not in ("architectures", "transformers_version")})
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads, hidden_act="silu",
        max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_epsilon, initializer_range=m.init_method_std,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, bos_token_id=tokenizer.bos_id,
        eos_token_id=stop_ids, pad_token_id=tokenizer.eos_id)


def check_tokens(info: dict, m: ModelConfig) -> torch.Tensor:
    """Tokens to compare the export's logits with Megatron's on: validation rows of the data the checkpoint
    trained on, or (an import, which trained on none) random ids."""
    if info.get("manifest"):
        return validation_rows(Path(info["manifest"]), 2)["tokens"][:, :-1]
    return torch.randint(0, m.vocab_size, (2, min(m.seq_len, 64)), generator=torch.Generator().manual_seed(0))


def export(checkpoint: Path, out: Path, dtype: str = "float32", check: bool = True) -> dict:
    from transformers import GenerationConfig, LlamaForCausalLM

    checkpoint, out = Path(checkpoint).resolve(), Path(out)
    gpt, m, info = load_megatron(checkpoint)
    tok_dir = Path(checkpoint_tokenizer(checkpoint)["dir"])
    tokenizer = Tokenizer(tok_dir)
    stop_ids = [tokenizer.eos_id] + [i for t in END_OF_TURN if (i := tokenizer.token_id(t)) is not None
                                     and i != tokenizer.eos_id]
    with torch.device("meta"):  # no weights of its own: it takes Megatron's tensors (assign), not copies
        hf = LlamaForCausalLM(hf_config(info, m, tokenizer, stop_ids))
    weights = llama_state_dict(gpt.state_dict(), m)
    missing, unexpected = hf.load_state_dict(weights, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if m.tie_embeddings else set()):
        raise RuntimeError(f"export: Megatron's weights do not fill the Llama model: missing {missing}, "
                           f"unexpected {unexpected}")
    if m.tie_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)  # a buffer, not a weight: rebuilt off meta
    if any(t.is_meta for t in (*hf.parameters(), *hf.buffers())):
        raise RuntimeError("export: part of the Llama model was left without weights")
    hf.eval()

    report = {"checkpoint": str(checkpoint), "step": info["step"], "preset": info["preset"],
              "parameters": sum(p.numel() for p in hf.parameters())}
    if check:
        tokens = check_tokens(info, m)
        with torch.no_grad():
            megatron = megatron_logits(gpt, m, tokens)
            diff = (hf(tokens).logits.float() - megatron).abs().max().item()
        report["max_logit_diff"] = diff
        if not diff <= MAX_LOGIT_DIFF:
            raise RuntimeError(f"exported model disagrees with Megatron: max |logit difference| {diff:.3g} > "
                               f"{MAX_LOGIT_DIFF} on {tuple(tokens.shape)} tokens")

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(bos_token_id=tokenizer.bos_id, eos_token_id=stop_ids, pad_token_id=tokenizer.eos_id,
                     max_new_tokens=128, do_sample=False).save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, tmp / name)
    if tokenizer.chat_template is None:  # SFT used the project's template (model/chat.py): ship it
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (tmp / "export_info.json").write_text(json.dumps({**report, "model": info["model"], "dtype": dtype,
                                                      "manifest": info.get("manifest")}, indent=1))
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

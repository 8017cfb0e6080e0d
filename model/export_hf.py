"""Export a checkpoint (saved at any TP/PP) as a Hugging Face `transformers` Llama folder.

    python -m model.export_hf runs/tiny-<hash>/checkpoints/step-000300 exports/tiny [--dtype bfloat16]

The checkpoint is loaded into a single-process Megatron model in its own dtype (dist_checkpointing reshards it),
and each Llama tensor is read out of it through the one name and layout map (model/hf_map.py): a view where the
layouts agree, a copy only for q, k and v. Before anything is written, a Llama model built on those same tensors
(no copy) runs a validation row, and its logits must agree with Megatron's within a bound suited to the dtype; a
mismatch fails the export. The weights are then written one safetensors shard at a time (the embedding, each
layer, the head), cast to `--dtype` per tensor, with config.json, the tokenizer files (with the chat template)
and generation_config.json. Peak memory: the model, its q/k/v copies and one shard.
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
from model.hf_map import llama_tensor, llama_weights
from model.tokenizer import TOKENIZER_FILES, Tokenizer

# The largest |logit difference| the export's check accepts, by the checkpoint's dtype, in which both models
# compute. On CPU the two forwards run the same kernels and agree exactly (0 measured at tiny and 7B width, fp32 and
# bf16); the bounds leave room for other kernels' rounding of logits of order 10, while a layout error is O(1).
MAX_LOGIT_DIFF = {"fp32": 1e-4, "bf16": 0.25, "fp16": 0.05}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# End-of-turn tokens of known chat templates (the project's, Llama-3's, ChatML's, Gemma's): generation stops at them.
END_OF_TURN = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>")


def load_megatron(checkpoint: Path):
    """(GPTModel at TP=1/PP=1 in the checkpoint's dtype with its weights, ModelConfig, checkpoint info)."""
    from model.checkpoint import load_checkpoint
    from model.gpt import build_model, transformer_config

    info = read_train_state(checkpoint)  # what model/train.py or model/import_hf.py recorded
    model_cfg = ModelConfig(**info["model"])
    init_single_process()
    config = transformer_config(model_cfg, ParallelConfig(), TrainConfig(precision=info["dtype"]))
    config.perform_initialization = False  # every weight is loaded from the checkpoint
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


def llama_state_dict(gpt, m: ModelConfig) -> dict[str, torch.Tensor]:
    """Megatron's weights under transformers' Llama names and shapes (model/hf_map.py): views of Megatron's tensors
    where the layouts agree, copies of q, k and v. Each layer's fused QKV is released once split, so the copies
    never coexist with it: `gpt` cannot run afterwards."""
    params, weights = dict(gpt.named_parameters()), {}
    for w in llama_weights(m):
        weights[w.hf] = llama_tensor(w, params[w.megatron].detach(), m)
        if w.part == "v":  # the last of q, k, v: the fused tensor is no longer needed
            params[w.megatron].data = torch.empty(0, dtype=params[w.megatron].dtype)
    return weights


def shards(names: list[str]) -> list[list[str]]:
    """The tensors of each safetensors file: the embedding, then one file per layer, then the final norm and head
    (so writing holds one layer's bytes at a time)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else \
            "embed" if "embed_tokens" in name else "head"
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def write_weights(weights: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> int:
    """`weights` as sharded safetensors files and their index, each tensor cast to `dtype` as its shard is
    written; returns the bytes written."""
    from safetensors.torch import save_file

    groups, weight_map, total = shards(list(weights)), {}, 0
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        # safetensors writes from the tensors' memory (gate and up, halves of one Megatron tensor, included): a copy
        # only where the dtype changes.
        tensors = {name: weights[name].to(dtype).contiguous() for name in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in names})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


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


def export(checkpoint: Path, out: Path, dtype: str | None = None, check: bool = True) -> dict:
    """Write the Llama folder `out` (replaced atomically); `dtype` of its weights (float32 | bfloat16 | float16),
    default the checkpoint's. Returns a report."""
    from transformers import GenerationConfig

    checkpoint, out = Path(checkpoint).resolve(), Path(out)
    gpt, m, info = load_megatron(checkpoint)
    own = TORCH_DTYPES[info["dtype"]]
    target = HF_DTYPES[dtype] if dtype else own
    tok_dir = Path(checkpoint_tokenizer(checkpoint)["dir"])
    tokenizer = Tokenizer(tok_dir)
    stop_ids = [tokenizer.eos_id] + [i for t in END_OF_TURN if (i := tokenizer.token_id(t)) is not None
                                     and i != tokenizer.eos_id]
    config = hf_config(info, m, tokenizer, stop_ids)
    config.torch_dtype = target
    tokens = check_tokens(info, m)
    megatron = megatron_logits(gpt, m, tokens) if check else None  # before llama_state_dict releases the QKV
    weights = llama_state_dict(gpt, m)
    report = {"checkpoint": str(checkpoint), "step": info["step"], "preset": info["preset"],
              "parameters": sum(t.numel() for t in weights.values())}
    if check:
        report["max_logit_diff"] = check_logits(weights, config, m, info, tokens, megatron)

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    report["weight_bytes"] = write_weights(weights, tmp, target)
    config.save_pretrained(tmp)
    GenerationConfig(bos_token_id=tokenizer.bos_id, eos_token_id=stop_ids, pad_token_id=tokenizer.eos_id,
                     max_new_tokens=128, do_sample=False).save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, tmp / name)
    if tokenizer.chat_template is None:  # SFT used the project's template (model/chat.py): ship it
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    dtype_name = str(target).removeprefix("torch.")
    (tmp / "export_info.json").write_text(json.dumps({**report, "model": info["model"], "dtype": dtype_name,
                                                      "manifest": info.get("manifest")}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return report


def check_logits(weights: dict[str, torch.Tensor], config, m: ModelConfig, info: dict, tokens: torch.Tensor,
                 megatron: torch.Tensor) -> float:
    """Max |logit difference| between Megatron's logits and a Llama model's built on the export's own tensors
    (assigned, not copied), both in the checkpoint's dtype; fails the export beyond MAX_LOGIT_DIFF."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # no weights of its own: it takes the export's tensors
        hf = LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(weights, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if m.tie_embeddings else set()):
        raise RuntimeError(f"export: Megatron's weights do not fill the Llama model: missing {missing}, "
                           f"unexpected {unexpected}")
    if m.tie_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)  # a buffer, not a weight: rebuilt off meta
    if any(t.is_meta for t in (*hf.parameters(), *hf.buffers())):
        raise RuntimeError("export: part of the Llama model was left without weights")
    with torch.no_grad():
        logits = hf.eval()(tokens).logits.float()
    diff = (logits - megatron).abs().max().item()
    bound = MAX_LOGIT_DIFF[info["dtype"]]
    if not diff <= bound:
        raise RuntimeError(f"exported model disagrees with Megatron: max |logit difference| {diff:.3g} > {bound} "
                           f"({info['dtype']}) on {tuple(tokens.shape)} tokens; {rerun_verdict(hf, tokens, logits)}")
    return diff


def rerun_verdict(hf, tokens: torch.Tensor, logits: torch.Tensor) -> str:
    """Which side of a failed check moved (issue 30: a check that failed once in 56 runs and was not reproduced):
    the Llama forward is run twice more on the same tensors. If it repeats itself exactly, its logits are what the
    weights give, and the difference came from Megatron's forward or the weights' layout; if not, the exported
    model's own forward is not deterministic here."""
    with torch.no_grad():
        moved = max((hf(tokens).logits.float() - logits).abs().max().item() for _ in range(2))
    if moved == 0:
        return ("the Llama forward, run twice more, repeats its logits exactly: the difference is in Megatron's "
                "forward or in the weights' layout")
    return (f"the Llama forward, run twice more on the same weights, moved by up to {moved:.3g}: the exported "
            f"model's own forward is not deterministic on this machine")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a checkpoints/step-NNNNNN directory")
    p.add_argument("out", type=Path, help="output folder (replaced atomically)")
    p.add_argument("--dtype", default=None, choices=sorted(HF_DTYPES),
                   help="the weights' dtype (default: the checkpoint's)")
    p.add_argument("--no-check", action="store_true", help="skip the logit comparison with Megatron")
    args = p.parse_args(argv)
    report = export(args.checkpoint, args.out, args.dtype, check=not args.no_check)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Import a Hugging Face Llama-architecture model (Llama-2/3, TinyLlama, SmolLM...) as a Megatron-Core checkpoint.

    python -m model.import_hf models/Llama-2-7b-hf checkpoints/llama-2-7b --tp 2 --pp 1 --dtype bf16

It reads the folder's `config.json` and safetensors weights (one file, or shards listed by
`model.safetensors.index.json`) one tensor at a time, and writes a dist_checkpointing checkpoint that
a training run started from it loads at any TP/PP (the format is layout-free; `--tp/--pp` check that the model can be laid
out so before anything is written). The checkpoint's train_state.json records the model config (preset `hf`), the
original config.json (export starts from it) and the tokenizer, whose files are copied into `tokenizer/`.

Memory: the Megatron model is allocated once, uninitialised, in the target dtype, and each Hugging Face tensor is
read, copied into its place (model/hf_map.py: Megatron's fused QKV and gate/up layouts) and dropped: peak memory is the model plus one
tensor. An architecture the Megatron model cannot represent is refused, naming the config key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from model.config import ModelConfig, ParallelConfig, TrainConfig
from model.hf_map import llama_weights, megatron_part
from model.tokenizer import TOKENIZER_FILES, Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder (config.json and weights), as opposed to a checkpoint or a run directory."""
    return (Path(path) / "config.json").is_file() and not (Path(path) / "train_state.json").is_file()


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model folder: no config.json")
    return json.loads(path.read_text())


def rope_theta(config: dict) -> float:
    """`rope_theta`, or transformers 5's `rope_parameters.rope_theta`; refuses any RoPE scaling."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for key, value in (("rope_scaling", scaling), ("rope_parameters", parameters)):
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise ValueError(f"config.json {key}.rope_type {kind!r}: only plain RoPE (default) is implemented; "
                             f"this model's RoPE scaling is not")
    return float(config.get("rope_theta", parameters.get("rope_theta", 10_000.0)))


def model_config_from_hf(config: dict, source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a Llama config.json; anything else is refused with the key that differs."""
    if config.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type {config.get('model_type')!r} is not supported; only 'llama' "
                         f"(the Llama architecture: RoPE, RMSNorm, SwiGLU, no biases)")
    expected = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(f"{source}: {key} {config[key]!r} cannot be represented (the Megatron model has "
                             f"{key} {value!r})")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if config.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"{source}: head_dim {config['head_dim']} differs from hidden_size / num_attention_heads "
                         f"= {hidden // heads}, which the Megatron model uses")
    theta = rope_theta(config)
    groups = config.get("num_key_value_heads") or heads
    return ModelConfig(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups if groups != heads else None, ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"], seq_len=config.get("max_position_embeddings", 4096),
        rotary_base=int(theta) if theta.is_integer() else theta, norm_epsilon=config.get("rms_norm_eps", 1e-6),
        init_method_std=config.get("initializer_range", 0.02),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a model folder, sharded (with its index) or not."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: hf_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = hf_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{hf_dir} has no safetensors weights (model.safetensors or "
                            f"model.safetensors.index.json); re-save it with save_pretrained(..., "
                            f"safe_serialization=True)")


def import_hf(hf_dir: Path, out: Path, parallel: ParallelConfig = ParallelConfig(), dtype: str | None = None) -> dict:
    """Convert `hf_dir` into the checkpoint `out` (replaced atomically); returns a report."""
    from safetensors import safe_open

    from model.checkpoint import save_weights
    from model.distributed import init_single_process
    from model.gpt import build_model, transformer_config

    hf_dir, out = Path(hf_dir).resolve(), Path(out)
    started = time.perf_counter()
    hf_config = read_hf_config(hf_dir)
    m = model_config_from_hf(hf_config, str(hf_dir / "config.json"))
    parallel.check_split(m)  # before anything is written
    files = weight_files(hf_dir)
    if dtype is None:  # keep fp32 weights fp32; fp16 and bf16 ones become bf16 (training's precision)
        dtype = "fp32" if hf_config.get("torch_dtype", hf_config.get("dtype")) == "float32" else "bf16"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")

    init_single_process()
    config = transformer_config(m, ParallelConfig(), TrainConfig(precision=dtype))
    config.perform_initialization = False  # every weight is overwritten: allocate, do not initialise
    gpt = build_model(m, config, pre_process=True, post_process=True)
    params = dict(gpt.named_parameters())
    weights = {w.hf: w for w in llama_weights(m)}
    with torch.no_grad():
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in params:
                params[name][m.vocab_size:].zero_()  # the padded rows: never a target, exported without them
        filled, largest = set(), 0
        by_file: dict[Path, list[str]] = {}
        for name, file in files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            with safe_open(file, framework="pt") as f:
                for name in sorted(names):
                    w = weights.get(name)
                    if w is None:
                        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and m.tie_embeddings):
                            continue  # a buffer older checkpoints saved (recomputed), or the tied embedding again
                        raise ValueError(f"{file.name}: unexpected tensor {name!r}: not a Llama weight (a bias, or "
                                         f"another architecture)")
                    tensor = f.get_tensor(name)
                    largest = max(largest, tensor.numel() * tensor.element_size())
                    target = megatron_part(w, params[w.megatron], m)
                    if target.numel() != tensor.numel():
                        raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, which does not fit "
                                         f"the model config.json describes ({tuple(target.shape)} in {w.megatron})")
                    target.copy_(tensor.view(target.shape))
                    filled.add(name)
                    del tensor
    if missing := sorted(set(weights) - filled):
        raise ValueError(f"{hf_dir}: the weights lack {len(missing)} tensors the config needs, e.g. {missing[:3]}")

    tokenizer_files = {f"tokenizer/{name}": hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()}
    tokenizer = None
    if tokenizer_files:
        tok = Tokenizer(hf_dir)
        if tok.vocab_size > m.vocab_size:
            raise ValueError(f"{hf_dir}: the tokenizer has {tok.vocab_size} ids, more than config.json vocab_size "
                             f"{m.vocab_size}")
        tokenizer = {"dir": "tokenizer", "sha256": tok.sha256}
    state = {"step": 0, "consumed_samples": 0, "preset": "hf", "model": dataclasses.asdict(m), "manifest": None,
             "distributed_optimizer": False, "step_offset": 0, "hf_config": hf_config,
             "tokenizer": tokenizer, "imported_from": str(hf_dir), "dtype": dtype,
             "layout": {"tp": parallel.tensor_parallel, "pp": parallel.pipeline_parallel}}
    save_weights(out, gpt, state, tokenizer_files)
    weight_bytes = sum(p.stat().st_size for p in set(files.values()))
    import resource

    peak = {"peak_rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            "peak_rss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    return {"checkpoint": str(out.resolve()), "parameters": m.num_parameters(), "dtype": dtype, **peak,
            "tokenizer": tokenizer is not None, "weight_bytes": weight_bytes, "largest_tensor_bytes": largest,
            "seconds": round(time.perf_counter() - started, 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", type=Path, help="a transformers Llama folder: config.json and safetensors weights")
    p.add_argument("out", type=Path, help="the checkpoint directory to write (replaced atomically)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size it must load at (checked)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size it must load at (checked)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights' dtype (default: fp32 for an fp32 model, else bf16)")
    args = p.parse_args(argv)
    print(json.dumps(import_hf(args.hf_dir, args.out, ParallelConfig(args.tp, args.pp), args.dtype)))


if __name__ == "__main__":
    main()

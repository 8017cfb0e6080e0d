"""Conversion benchmark: Hugging Face -> Megatron-Core import and the export back, on a Llama-7B-width checkpoint
with few layers (hidden 4096, FFN 11008, 32 heads, vocab 32000; bf16 safetensors in one shard per layer).

In the same run it measures:
  baseline   a plain `safetensors` read of every tensor and write of them to new files: the cost of the bytes alone
  import     `python -m model.import_hf` (a subprocess: its own peak RSS)
  export     `python -m model.export_hf`, with its logit check (loads the model in fp32, as export does)
and prints seconds per GB against the baseline, and each peak RSS against the checkpoint's size and its largest
tensor, then extrapolates the import to the full 32-layer model.

    python bench/convert.py [--layers 2] [--work /tmp/convert-bench] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.config import llama2_7b  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, FFN, HEADS, VOCAB = 4096, 11008, 32, 32000


def write_checkpoint(out: Path, layers: int) -> dict:
    """A 7B-width Llama folder: random bf16 weights (one safetensors file per layer, plus embeddings and head),
    its index, config.json and a word-level tokenizer.json of the same vocabulary."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    groups = {"embed": {"model.embed_tokens.weight": tensor(VOCAB, HIDDEN)},
              "head": {"lm_head.weight": tensor(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN).bfloat16()}}
    weight_map = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        groups[f"layer-{i}"] = {p + "input_layernorm.weight": torch.ones(HIDDEN).bfloat16(),
                                p + "post_attention_layernorm.weight": torch.ones(HIDDEN).bfloat16(),
                                **{p + f"self_attn.{x}_proj.weight": tensor(HIDDEN, HIDDEN) for x in "qkvo"},
                                p + "mlp.gate_proj.weight": tensor(FFN, HIDDEN),
                                p + "mlp.up_proj.weight": tensor(FFN, HIDDEN),
                                p + "mlp.down_proj.weight": tensor(HIDDEN, FFN)}
    largest = 0
    for name, tensors in groups.items():
        save_file(tensors, out / f"{name}.safetensors", metadata={"format": "pt"})
        weight_map.update({t: f"{name}.safetensors" for t in tensors})
        largest = max([largest] + [t.numel() * t.element_size() for t in tensors.values()])
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2}))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"bytes": size, "largest_tensor_bytes": largest}


def plain_copy(src: Path, dst: Path) -> float:
    """Seconds to read every tensor with safe_open and write them to new files: the baseline."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        save_file(tensors, dst / file.name)
        del tensors
    return time.perf_counter() - started


# Runs a command and prints its peak RSS: RUSAGE_CHILDREN of this wrapper covers that one command alone.
PEAK_RSS_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def measured(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in bytes, stdout) of `python <args>` in a fresh process."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, sys.executable, *args], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    return seconds, int(lines[-1].split()[1]) * 1024, "\n".join(lines[:-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    shutil.rmtree(work, ignore_errors=True)
    hf = work / "hf"
    info = write_checkpoint(hf, args.layers)
    gb = info["bytes"] / 1e9
    print(f"checkpoint: {args.layers} layers of Llama-7B width, bf16, {gb:.2f} GB in "
          f"{len(list(hf.glob('*.safetensors')))} files; largest tensor {info['largest_tensor_bytes'] / 1e6:.0f} MB")

    baseline = plain_copy(hf, work / "copy")
    shutil.rmtree(work / "copy")
    import_s, import_rss, _ = measured(["-m", "model.import_hf", str(hf), str(work / "megatron"), "--dtype", "bf16"])
    export_s, export_rss, stdout = measured(["-m", "model.export_hf", str(work / "megatron"), str(work / "export"),
                                            "--dtype", "bfloat16"])
    report = json.loads(stdout.strip().splitlines()[-1])
    rows = {"baseline (safetensors read + write)": (baseline, None), "import (model.import_hf)": (import_s, import_rss),
            "export (model.export_hf, fp32 check)": (export_s, export_rss)}
    print(f"{'':40s} {'s/GB':>7s} {'x base':>7s} {'peak RSS GB':>12s} {'x ckpt':>7s} {'x largest':>10s}")
    for name, (seconds, rss) in rows.items():
        rss_cols = (f"{rss / 1e9:12.2f} {rss / info['bytes']:7.2f} {rss / info['largest_tensor_bytes']:10.1f}"
                    if rss else f"{'':12s} {'':7s} {'':10s}")
        print(f"{name:40s} {seconds / gb:7.2f} {seconds / baseline:7.2f} {rss_cols}")
    print(f"export's logit check: max |difference| {report['max_logit_diff']:.2e}")

    # Extrapolation: the libraries' memory is fixed, the rest grows with the model (the model itself, one tensor
    # while filling it, and the copies Megatron's checkpoint writer makes of non-contiguous shards: fc1's halves).
    _, libraries, _ = measured(["-c", "import model.import_hf, megatron.core.dist_checkpointing, safetensors"])
    per_byte = (import_rss - libraries) / info["bytes"]
    full_bytes = 2 * llama2_7b().num_parameters()
    full_rss = libraries + per_byte * full_bytes
    print(f"full Llama-2-7B (bf16, {full_bytes / 1e9:.1f} GB): import about {import_s / gb * full_bytes / 1e9:.0f} s "
          f"here, peak RSS about {full_rss / 1e9:.1f} GB ({libraries / 1e9:.2f} GB of libraries, then "
          f"{per_byte:.2f} x the checkpoint)")
    results = {"layers": args.layers, "checkpoint_bytes": info["bytes"],
               "largest_tensor_bytes": info["largest_tensor_bytes"], "baseline_s": baseline, "import_s": import_s,
               "import_peak_rss": import_rss, "export_s": export_s, "export_peak_rss": export_rss,
               "max_logit_diff": report["max_logit_diff"],
               "libraries_rss": libraries, "full_7b_import_s": import_s / gb * full_bytes / 1e9,
               "full_7b_import_rss": full_rss}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

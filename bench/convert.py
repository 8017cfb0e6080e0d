"""Conversion benchmark: Hugging Face -> Megatron-Core import and the export back, on a Llama-7B-width checkpoint
with few layers (hidden 4096, FFN 11008, 32 heads, vocab 32000; bf16 safetensors in one shard per layer).

In the same run it measures:
  baseline   a plain `safetensors` read of every tensor and write of them to new files: the cost of the bytes alone
  import     `python -m model.import_hf` (a subprocess: its own peak RSS)
  export     `python -m model.export_hf`, in the checkpoint's bf16, with its logit check
and prints seconds per GB against the baseline, and each peak RSS against the checkpoint's size and its largest
tensor (goal: export at most 1.5x the checkpoint), checks that the round trip gives back every tensor bit for
bit, then extrapolates the import to the full 32-layer model.

    python bench/convert.py [--layers 4] [--work /tmp/convert-bench] [--json results.json]
    python bench/convert.py --tiny     # the same at hidden 256 (the test suite runs it; memory is the libraries')
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
WIDTH_7B = {"hidden": 4096, "ffn": 11008, "heads": 32, "vocab": 32000}
WIDTH_TINY = {"hidden": 256, "ffn": 768, "heads": 4, "vocab": 1024}


def write_checkpoint(out: Path, layers: int, width: dict = WIDTH_7B) -> dict:
    """A 7B-width Llama folder: random bf16 weights (one safetensors file per layer, plus embeddings and head),
    its index, config.json and a word-level tokenizer.json of the same vocabulary."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    HIDDEN, FFN, HEADS, VOCAB = width["hidden"], width["ffn"], width["heads"], width["vocab"]
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


def round_trip_differences(original: Path, exported: Path) -> list[str]:
    """The tensors of `original` that `exported` lacks or holds with other bits (dtype, shape or any value)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        return {name: folder / file for name, file in index.items()}

    theirs, ours = tensors(original), tensors(exported)
    differ = []
    for name, file in sorted(theirs.items()):
        if name not in ours:
            differ.append(f"{name}: missing")
            continue
        with safe_open(file, framework="pt") as a, safe_open(ours[name], framework="pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            differ.append(f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
    return differ


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
    # 4 by default: at 2 the fixed costs (0.4 GB of libraries, one embedding-sized read buffer) are half the
    # checkpoint, and its ratios say little about a 7B's
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="hidden 256 instead of Llama-7B's 4096")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    shutil.rmtree(work, ignore_errors=True)
    hf = work / "hf"
    info = write_checkpoint(hf, args.layers, WIDTH_TINY if args.tiny else WIDTH_7B)
    gb = info["bytes"] / 1e9
    print(f"checkpoint: {args.layers} layers of {'tiny' if args.tiny else 'Llama-7B'} width, bf16, {gb:.2f} GB in "
          f"{len(list(hf.glob('*.safetensors')))} files; largest tensor {info['largest_tensor_bytes'] / 1e6:.0f} MB")

    baseline = plain_copy(hf, work / "copy")
    shutil.rmtree(work / "copy")
    import_s, import_rss, _ = measured(["-m", "model.import_hf", str(hf), str(work / "megatron"), "--dtype", "bf16"])
    export_s, export_rss, stdout = measured(["-m", "model.export_hf", str(work / "megatron"), str(work / "export")])
    report = json.loads(stdout.strip().splitlines()[-1])
    rows = {"baseline (safetensors read + write)": (baseline, None), "import (model.import_hf)": (import_s, import_rss),
            "export (model.export_hf, bf16 check)": (export_s, export_rss)}
    print(f"{'':40s} {'s/GB':>7s} {'x base':>7s} {'peak RSS GB':>12s} {'x ckpt':>7s} {'x largest':>10s}")
    for name, (seconds, rss) in rows.items():
        rss_cols = (f"{rss / 1e9:12.2f} {rss / info['bytes']:7.2f} {rss / info['largest_tensor_bytes']:10.1f}"
                    if rss else f"{'':12s} {'':7s} {'':10s}")
        print(f"{name:40s} {seconds / gb:7.2f} {seconds / baseline:7.2f} {rss_cols}")
    print(f"export's logit check (bf16): max |difference| {report['max_logit_diff']:.2e}")
    print(f"export peak RSS / checkpoint: {export_rss / info['bytes']:.2f}  (goal <= 1.5)")
    differ = round_trip_differences(hf, work / "export")
    print(f"round trip: {len(differ)} of {len(json.loads((hf / 'model.safetensors.index.json').read_text())['weight_map'])}"
          f" tensors differ from the original" + (f": {differ[:5]}" if differ else " (bit-identical)"))

    results = {"layers": args.layers, "checkpoint_bytes": info["bytes"],
               "largest_tensor_bytes": info["largest_tensor_bytes"], "baseline_s": baseline, "import_s": import_s,
               "import_peak_rss": import_rss, "export_s": export_s, "export_peak_rss": export_rss,
               "max_logit_diff": report["max_logit_diff"], "round_trip_differences": differ}
    if not args.tiny:  # at the tiny width the libraries are the whole of the memory: nothing to extrapolate
        results.update(extrapolate(info, import_s, import_rss, export_rss))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def extrapolate(info: dict, import_s: float, import_rss: int, export_rss: int) -> dict:
    """The full 32-layer model, from this one's seconds and peak RSS: the libraries' memory is fixed, the rest grows
    with the model (import: the model, one tensor while filling it, and the copies Megatron's checkpoint writer
    makes of non-contiguous shards, fc1's halves; export: the model, and one tensor while reading it)."""
    gb, full_bytes = info["bytes"] / 1e9, 2 * llama2_7b().num_parameters()
    _, import_libraries, _ = measured(["-c", "import model.import_hf, megatron.core.dist_checkpointing, safetensors"])
    _, export_libraries, _ = measured(["-c", "import model.export_hf, megatron.core.dist_checkpointing, transformers"])
    out = {}
    for what, rss, libraries in (("import", import_rss, import_libraries), ("export", export_rss, export_libraries)):
        per_byte = (rss - libraries) / info["bytes"]
        full_rss = libraries + per_byte * full_bytes
        print(f"full Llama-2-7B (bf16, {full_bytes / 1e9:.1f} GB): {what} peak RSS about {full_rss / 1e9:.1f} GB "
              f"({full_rss / full_bytes:.2f} x; {libraries / 1e9:.2f} GB of libraries, then {per_byte:.2f} x the "
              f"checkpoint)" + (f", about {import_s / gb * full_bytes / 1e9:.0f} s here" if what == "import" else ""))
        out.update({f"{what}_libraries_rss": libraries, f"full_7b_{what}_rss": full_rss})
    return {**out, "full_7b_import_s": import_s / gb * full_bytes / 1e9}


if __name__ == "__main__":
    main()

"""Quantization benchmark: `python -m model.quantize` on a Llama-7B-width checkpoint with few layers (hidden 4096,
FFN 11008, 32 heads, vocab 32000; random bf16 weights, as bench/convert.py writes them).

In the same run it measures:
  baseline   a plain `safetensors` read of every tensor and write of them to new files: the cost of the bytes alone
  quantize   each scheme, in a subprocess of its own: seconds (against the baseline) and peak RSS (against the
             bf16 checkpoint), and the size of its weights on disk against the bf16 weights
  generate   CPU greedy generation (one prompt, a fixed number of new tokens) with the bf16 model and each
             quantized one, in tokens/s and as a ratio to bf16

    python bench/quantize.py [--layers 2] [--schemes int8,int4-g32,int4-g128] [--json results.json]
    python bench/quantize.py --tiny     # hidden 256 (the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.convert import WIDTH_7B, WIDTH_TINY, measured, plain_copy, write_checkpoint  # noqa: E402


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@torch.no_grad()
def generation_speed(folder: Path, new_tokens: int) -> float:
    """Greedy tokens/s of one prompt on CPU, after one untimed warm-up generation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = torch.arange(3, 19).unsqueeze(0)
    settings = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                "attention_mask": torch.ones_like(prompt), "pad_token_id": 2}
    model.generate(prompt, **{**settings, "max_new_tokens": 2, "min_new_tokens": 2})
    started = time.perf_counter()
    out = model.generate(prompt, **settings)
    seconds = time.perf_counter() - started
    assert out.shape[1] - prompt.shape[1] == new_tokens
    return new_tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="hidden 256 instead of Llama-7B's 4096")
    p.add_argument("--schemes", default="int8,int4-g32,int4-g128")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--work", type=Path, default=None, help="default: a temporary folder, removed after")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="quantize-bench-"))
    schemes = args.schemes.split(",")
    try:
        hf = work / "bf16"
        shutil.rmtree(work, ignore_errors=True)
        info = write_checkpoint(hf, args.layers, WIDTH_TINY if args.tiny else WIDTH_7B)
        gb = info["bytes"] / 1e9
        print(f"checkpoint: {args.layers} layers of {'tiny' if args.tiny else 'Llama-7B'} width, bf16, "
              f"{gb:.3f} GB of weights")
        base_s = plain_copy(hf, work / "copy")
        print(f"{'':32s}{'s/GB':>8s}{'x base':>8s}{'peak RSS GB':>13s}{'x ckpt':>8s}{'weights GB':>12s}{'x bf16':>8s}")
        print(f"{'baseline (safetensors copy)':32s}{base_s / gb:8.2f}{1:8.2f}")
        results = {"layers": args.layers, "checkpoint_bytes": info["bytes"], "baseline_s": base_s, "schemes": {}}
        for scheme in schemes:
            out = work / scheme
            seconds, rss, _ = measured(["-m", "model.quantize", str(hf), str(out), "--scheme", scheme])
            size = weight_bytes(out)
            print(f"{'quantize ' + scheme:32s}{seconds / gb:8.2f}{seconds / base_s:8.2f}{rss / 1e9:13.2f}"
                  f"{rss / info['bytes']:8.2f}{size / 1e9:12.3f}{size / info['bytes']:8.2f}")
            results["schemes"][scheme] = {"seconds": seconds, "peak_rss": rss, "weight_bytes": size,
                                          **json.loads((out / "quantize_info.json").read_text())}
        speeds = {"bf16": generation_speed(hf, args.new_tokens)}
        speeds.update({scheme: generation_speed(work / scheme, args.new_tokens) for scheme in schemes})
        print(f"CPU greedy generation, {args.new_tokens} new tokens, {torch.get_num_threads()} threads:")
        for name, speed in speeds.items():
            print(f"  {name:10s} {speed:8.1f} tokens/s  {speed / speeds['bf16']:5.2f} x bf16")
        results["tokens_per_s"] = speeds
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

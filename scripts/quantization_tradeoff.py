"""What quantization costs, and what quantization-aware training wins back, measured on a model large enough
to show it (issue 29, docs/performance.md "Quantization").

A 4-layer, 256-wide preset of the tiny model is pretrained on the `make run` shards, then trained further twice
from the same checkpoint for the same steps: plainly, and with `qat` in the int4 scheme. Each is exported in
bfloat16 and quantized; every model is scored on the same held-out validation rows (GPTQ calibrates on others).
Equal extra training on both sides, so the QAT row differs from the round-to-nearest row only by QAT and by
chance (`--seed` reruns both with another data order, to measure that).

    .venv/bin/python scripts/quantization_tradeoff.py artifacts/shard/<fingerprint>/manifest.json

About 40 minutes on 2 CPU cores (15 for another --seed); runs and exports go under --runs-dir, re-runs reuse the finished ones.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from model.checkpoint import resolve_checkpoint
from model.evaluate import heldout_loss, load
from model.export_hf import export
from model.quantize import folder_bytes
from model.run_config import RunConfig, Start
from tasks.quantize import quantize_export
from tasks.train import train

MODEL = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "ffn_hidden_size": 768}
PRETRAIN = {"steps": 400, "global_batch": 16, "micro_batch": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 30,
            "eval_every": 200, "save_every": 200, "log_every": 50}
FURTHER = {"steps": 100, "global_batch": 16, "micro_batch": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10,
           "eval_every": 100, "save_every": 100, "log_every": 50}


def exported(run_dir: Path) -> Path:
    checkpoint = resolve_checkpoint(run_dir)
    out = run_dir / "hf" / f"{checkpoint.name}-bfloat16"
    if not (out / "export_info.json").is_file():
        export(checkpoint, out, dtype="bfloat16")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path, help="a pretraining manifest.json (make run builds one)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/quantization-tradeoff"))
    p.add_argument("--scheme", default="int4-g128", help="the int4 scheme of round-to-nearest, GPTQ and QAT")
    p.add_argument("--rows", type=int, default=200, help="held-out validation rows scored")
    p.add_argument("--seed", type=int, default=1234,
                   help="the further training's seed (data order), for both runs: rerun with others to see how much "
                        "two trainings differ by chance")
    args = p.parse_args()
    manifest_dir, runs = args.manifest.parent, str(args.runs_dir)

    base = train("pretrain", str(args.manifest), RunConfig(model_overrides=MODEL, train=PRETRAIN), runs).run_dir
    start = Start(kind="checkpoint", checkpoint=str(resolve_checkpoint(base)))
    further = {**FURTHER, "seed": args.seed}
    plain = train("pretrain", str(args.manifest), RunConfig(train=further), runs, start).run_dir
    qat = train("pretrain", str(args.manifest), RunConfig(train={**further, "qat": args.scheme}), runs, start).run_dir

    plain_hf, qat_hf = exported(plain), exported(qat)

    def quantized(hf_dir: Path, scheme: str) -> Path:  # the quantize stage; GPTQ beside the scored rows
        return Path(quantize_export(str(hf_dir), scheme, hf_dir.parents[1].name, str(manifest_dir), args.rows))

    models = {"bf16": plain_hf, "int8": quantized(plain_hf, "int8"),
              f"{args.scheme} round-to-nearest": quantized(plain_hf, args.scheme),
              f"{args.scheme} GPTQ": quantized(plain_hf, f"{args.scheme}-gptq"),
              f"QAT, then {args.scheme}": quantized(qat_hf, args.scheme),
              "QAT run, bf16 (not quantized)": qat_hf}
    rows = []
    for name, folder in models.items():
        model, _ = load(folder)
        scored = heldout_loss(model, manifest_dir, args.rows)
        rows.append({"model": name, "loss": scored["loss"], "perplexity": scored["perplexity"],
                     "weights_mb": folder_bytes(folder) / 1e6, "tokens": scored["tokens"]})
        print(json.dumps(rows[-1]), flush=True)
    reference, nearest = rows[0]["perplexity"], rows[2]["perplexity"]
    print("\n| model | held-out perplexity | vs bf16 | weights on disk |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['perplexity']:.3f} | {row['perplexity'] - reference:+.3f} | "
              f"{row['weights_mb']:.2f} MB |")
    lost, after_qat = nearest - reference, rows[4]["perplexity"] - reference
    print(f"\n{args.scheme} round-to-nearest loses {lost:.3f} perplexity; QAT then {args.scheme} loses {after_qat:.3f}: "
          f"QAT recovers {(1 - after_qat / lost) * 100 if lost > 0 else math.nan:.0f}% of the loss "
          f"({rows[0]['tokens']} tokens scored)")


if __name__ == "__main__":
    main()

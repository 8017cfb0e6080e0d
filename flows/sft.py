"""Instruction-tuning flow: SFT shards from an instruction spec (cached), then fine-tuning from a pretraining
checkpoint (saved at any TP/PP).

    python -m flows.sft --pretrained runs/tiny-<hash>        # default: the newest pretraining run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from flows.data import require_server
from model.checkpoint import read_train_state, resolve_checkpoint
from model.data import load_manifest
from model.export_hf import tokenizer_dir
from tasks.lib.artifacts import ArtifactRef, run_stage
from tasks.download import resolve
from tasks.lib.launch import PretrainConfig
from tasks.lib.runs import newest_run
from tasks.pretrain import preflight
from tasks.sft import SFT_TRAIN_DEFAULTS, sft
from tasks.sft_data import sft_data
from tasks.spec import SFTSpec, load_spec, resolve_path


@flow(name="sft")
def sft_flow(sft_spec_path: str = "data_specs/sft_default.yaml", pretrained: str | None = None, tp: int = 1,
             pp: int = 1, nproc: int | None = None, gpus_required: bool = False, train: dict | None = None,
             runs_dir: str = "runs", launch: dict | None = None) -> str:
    """Fine-tune `pretrained` (a run directory or checkpoint; default the newest pretraining run) on the
    instruction set of `sft_spec_path`; returns the SFT run directory. `launch` sets PretrainConfig's launch
    fields, as in the pretrain flow (e.g. max_restarts, step_timeout_s)."""
    config = PretrainConfig(tp=tp, pp=pp, nproc=nproc, gpus_required=gpus_required,
                            train={**SFT_TRAIN_DEFAULTS, **(train or {})}, **(launch or {}))
    preflight(config)
    runs = resolve_path(runs_dir)
    checkpoint = resolve_checkpoint(resolve_path(pretrained) if pretrained else newest_run(runs, "pretrain"))
    manifest_dir = Path(read_train_state(checkpoint)["manifest"])
    manifest = load_manifest(manifest_dir)
    spec = load_spec(sft_spec_path, SFTSpec)
    tokenizer = ArtifactRef(stage="tokenizer", fingerprint=manifest["lineage"].get("tokenizer", "unknown"),
                            path=str(tokenizer_dir(manifest_dir)))
    shards = run_stage(sft_data, resolved=[resolve(s) for s in spec.sources], spec=spec, tokenizer=tokenizer,
                       seq_len=manifest["seq_len"], artifacts_dir=str(manifest_dir.parents[1]))
    return sft(str(shards.dir / "manifest.json"), str(checkpoint), config, str(runs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="data_specs/sft_default.yaml")
    parser.add_argument("--pretrained", default=None, help="run directory or checkpoint (default: newest run)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    require_server()
    print(sft_flow(args.spec, args.pretrained, train={"steps": args.steps} if args.steps else None))

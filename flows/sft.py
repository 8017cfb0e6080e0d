"""Instruction-tuning flow: SFT shards from an instruction spec (cached), then fine-tuning from a pretraining
checkpoint (saved at any TP/PP) or a Hugging Face Llama folder (imported first).

    python -m flows.sft --pretrained runs/tiny-<hash>        # default: the newest pretraining run
    python -m flows.sft --pretrained models/TinyLlama --seq-len 1024
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from flows.data import require_server
from model.checkpoint import checkpoint_tokenizer, read_train_state, resolve_checkpoint
from model.data import load_manifest
from tasks.download import resolve
from tasks.import_hf import checkpoint_of, import_hf, is_hf_folder, pin_hf_model
from tasks.lib.artifacts import ArtifactRef, run_stage, store_of
from tasks.lib.launch import PretrainConfig
from tasks.lib.runs import newest_run
from tasks.pretrain import preflight
from tasks.sft import SFT_TRAIN_DEFAULTS, sft
from tasks.sft_data import sft_data
from tasks.spec import SFTSpec, load_spec, resolve_path


@flow(name="sft")
def sft_flow(sft_spec_path: str = "data_specs/sft_default.yaml", pretrained: str | None = None, tp: int = 1,
             pp: int = 1, sequence_parallel: bool | None = None, virtual_pipeline: int | None = None,
             nproc: int | None = None, gpus_required: bool = False, train: dict | None = None,
             runs_dir: str = "runs", launch: dict | None = None, seq_len: int | None = None,
             artifacts_dir: str = "artifacts", hf_dtype: str | None = None) -> str:
    """Fine-tune `pretrained` on the instruction set of `sft_spec_path`; returns the SFT run directory.

    `pretrained`: a run directory or checkpoint (default: the newest pretraining run), or a Hugging Face Llama
    folder, imported first (a cached stage under `artifacts_dir`, in `hf_dtype`) and tokenized with its own
    tokenizer and chat template. `seq_len`: the SFT rows' length; default the base's pretraining length, or for a
    Hugging Face model 2048 (at most its max_position_embeddings). `launch` sets PretrainConfig's launch fields, as
    in the pretrain flow (e.g. max_restarts, step_timeout_s); the layout fields are the pretrain flow's."""
    config = PretrainConfig(tp=tp, pp=pp, sequence_parallel=sequence_parallel, virtual_pipeline=virtual_pipeline,
                            nproc=nproc, gpus_required=gpus_required, train={**SFT_TRAIN_DEFAULTS, **(train or {})},
                            **(launch or {}))
    runs = resolve_path(runs_dir)
    pretrained = pretrained or str(newest_run(runs, "pretrain"))
    hf = is_hf_folder(pretrained)
    preflight(config, pretrained, "pretrained" if hf else None)
    spec = load_spec(sft_spec_path, SFTSpec)
    if hf:
        imported = run_stage(import_hf, model=pin_hf_model(pretrained, "pretrained"), tp=tp, pp=pp, dtype=hf_dtype,
                             artifacts_dir=str(resolve_path(artifacts_dir)))
        checkpoint = Path(checkpoint_of(imported))
        store = resolve_path(artifacts_dir)
        seq_len = seq_len or min(2048, read_train_state(checkpoint)["hf_config"].get("max_position_embeddings", 2048))
    else:
        checkpoint = resolve_checkpoint(resolve_path(pretrained))
        manifest_dir = Path(read_train_state(checkpoint)["manifest"])
        store = store_of(manifest_dir)
        seq_len = seq_len or load_manifest(manifest_dir)["seq_len"]
    recorded = checkpoint_tokenizer(checkpoint)  # keyed by content: the same tokenizer wherever it is stored
    tokenizer = ArtifactRef(stage="tokenizer", fingerprint=recorded["sha256"][:20], path=recorded["dir"])
    shards = run_stage(sft_data, resolved=[resolve(s) for s in spec.sources], spec=spec, tokenizer=tokenizer,
                       seq_len=seq_len, artifacts_dir=str(store))
    return sft(str(shards.dir / "manifest.json"), str(checkpoint), config, str(runs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="data_specs/sft_default.yaml")
    parser.add_argument("--pretrained", default=None,
                        help="run directory, checkpoint or Hugging Face folder (default: the newest pretraining run)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    args = parser.parse_args()
    require_server()
    print(sft_flow(args.spec, args.pretrained, train={"steps": args.steps} if args.steps else None,
                   seq_len=args.seq_len))

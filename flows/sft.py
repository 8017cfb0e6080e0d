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
from model.checkpoint import checkpoint_tokenizer, read_train_state
from tasks.lib.manifest import ShardManifest
from model.import_hf import is_hf_folder
from model.run_config import RunConfig
from tasks.import_hf import checkpoint_of, pin_hf_model
from tasks.lib.artifacts import ArtifactRef, store_of
from tasks.lib.runs import decide_start, newest_run
from tasks.lib.steps import step
from tasks.prefect_tasks import preflight, resolve, run_step, sft
from tasks.spec import SFTSpec, load_spec, resolve_path
from tasks.train import SFT_TRAIN


@flow(name="sft")
def sft_flow(sft_spec_path: str = "data_specs/sft_default.yaml", pretrained: str | None = None,
             run: RunConfig = RunConfig(train=SFT_TRAIN), runs_dir: str = "runs", seq_len: int | None = None,
             artifacts_dir: str = "artifacts", hf_dtype: str | None = None) -> str:
    """Fine-tune `pretrained` on the instruction set of `sft_spec_path`; returns the SFT run directory.

    `pretrained`: a run directory or checkpoint (default: the newest pretraining run), or a Hugging Face Llama
    folder, imported first (a cached stage under `artifacts_dir`, in `hf_dtype`) and tokenized with its own
    tokenizer and chat template. `run` as in the pretrain flow (model/run_config.py); the train settings it gives
    go on top of SFT's defaults (tasks/train.py SFT_TRAIN). `seq_len`: the SFT rows' length; default the base's
    pretraining length, or for a Hugging Face model 2048 (at most its max_position_embeddings)."""
    run = run.replace(train=run.train.over(SFT_TRAIN))
    runs = resolve_path(runs_dir)
    pretrained = pretrained or str(newest_run(runs, "pretrain"))
    hf = is_hf_folder(resolve_path(pretrained))
    preflight(run, pretrained, "pretrained" if hf else None)
    spec = load_spec(sft_spec_path, SFTSpec)

    def imported(folder: str) -> str:
        tp, pp = run.parallel.tensor_parallel, run.parallel.pipeline_parallel
        return checkpoint_of(run_step(step("import_hf", f"{tp}x{pp}", model=pin_hf_model(folder, "pretrained"), tp=tp,
                                           pp=pp, dtype=hf_dtype, artifacts_dir=str(resolve_path(artifacts_dir)))))

    start = decide_start(pretrained, None, runs, imported)  # SFT data is tokenized with the checkpoint's tokenizer
    checkpoint = Path(start.checkpoint)
    state = read_train_state(checkpoint)
    if hf:
        store = resolve_path(artifacts_dir)
        seq_len = seq_len or min(2048, state["hf_config"].get("max_position_embeddings", 2048))
    else:
        store = store_of(state["manifest"])
        seq_len = seq_len or ShardManifest.load(state["manifest"]).seq_len
    recorded = checkpoint_tokenizer(checkpoint)  # keyed by content: the same tokenizer wherever it is stored
    tokenizer = ArtifactRef(stage="tokenizer", fingerprint=recorded["sha256"][:20], path=recorded["dir"])
    shards = run_step(step("sft_data", resolved=[resolve(s) for s in spec.sources], spec=spec, tokenizer=tokenizer,
                           seq_len=seq_len, artifacts_dir=str(store)))
    return sft(str(shards.dir / "manifest.json"), run, str(runs), start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="data_specs/sft_default.yaml")
    parser.add_argument("--pretrained", default=None,
                        help="run directory, checkpoint or Hugging Face folder (default: the newest pretraining run)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    args = parser.parse_args()
    require_server()
    train = SFT_TRAIN.replace(steps=args.steps) if args.steps else SFT_TRAIN
    print(sft_flow(args.spec, args.pretrained, RunConfig(train=train), seq_len=args.seq_len))

"""Pretraining flow: the (cached) data flow, then Megatron-Core training launched with torchrun.

    python -m flows.pretrain --preset tiny
    python -m flows.pretrain --manifest artifacts/append/<fp>/manifest.json --continue-from latest
    python -m flows.pretrain --spec data_specs/my_hf.yaml --init-from-hf models/TinyLlama   # continued pretraining
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from flows.data import data_flow, require_server
from tasks.import_hf import checkpoint_of, import_hf, pin_hf_model
from tasks.lib.artifacts import run_stage, store_of
from tasks.lib.launch import PretrainConfig
from tasks.pretrain import continue_from_task, preflight, pretrain
from tasks.spec import resolve_path


@flow(name="pretrain")
def pretrain_flow(spec_path: str = "data_specs/default.yaml", preset: str = "tiny", tp: int = 1, pp: int = 1,
                  sequence_parallel: bool | None = None, virtual_pipeline: int | None = None,
                  nproc: int | None = None, gpus_required: bool = False, train: dict | None = None,
                  runs_dir: str = "runs", launch: dict | None = None, manifest: str | None = None,
                  continue_from: str | None = None, init_from_hf: str | None = None,
                  hf_dtype: str | None = None) -> str:
    """Build (or reuse) the shards for `spec_path`, then train `preset` on them; returns the run directory.

    The layout: `tp`, `pp`, `sequence_parallel` (default on when tp > 1) and `virtual_pipeline` (model chunks per
    pipeline rank, the interleaved schedule); `nproc` ranks per node (default tp x pp), the rest data parallel.

    `launch` sets PretrainConfig's launch fields: multi-node (nnodes, launcher, rdzv_endpoint, node_rank, slurm)
    and fault handling (max_restarts, step_timeout_s); none of them is in the run's key.
    `manifest`: train on this manifest.json instead of running the data flow (the new-manifest event passes it).
    `continue_from`: continued pretraining from a run directory or checkpoint's weights; "latest" takes the
    newest finished pretraining run on an earlier manifest with the same tokenizer (or trains from scratch).
    `init_from_hf`: continued pretraining of a Hugging Face Llama folder, imported (a cached stage) in `hf_dtype`
    (model/import_hf.py; default fp32 for fp32 weights, else bf16). The data flow tokenizes with the model's own
    tokenizer, and `preset` is the model's own architecture."""
    if continue_from and init_from_hf:
        raise ValueError("give continue_from or init_from_hf, not both")
    config = PretrainConfig(preset=preset, tp=tp, pp=pp, sequence_parallel=sequence_parallel,
                            virtual_pipeline=virtual_pipeline, nproc=nproc, gpus_required=gpus_required,
                            train=train or {}, **(launch or {}))
    preflight(config, init_from_hf or continue_from, "init_from_hf" if init_from_hf else None)
    hf_model = pin_hf_model(init_from_hf) if init_from_hf else None  # fails now, not after the data flow
    runs = str(resolve_path(runs_dir))
    # A new string, not the subflow's return value itself: Prefect would record that as a `flow_run` input of the
    # pretrain task, and the UI's task-run page cannot show those (it stays blank; Prefect 3.9).
    manifest = str(resolve_path(manifest or data_flow(spec_path, tokenizer_from=init_from_hf)))
    if hf_model:  # the store that holds the manifest (<artifacts>/<stage>/<fingerprint>/manifest.json)
        imported = run_stage(import_hf, model=hf_model, tp=tp, pp=pp, dtype=hf_dtype,
                             artifacts_dir=str(store_of(Path(manifest).parent)))
        continue_from = checkpoint_of(imported)
    init_from = continue_from_task(continue_from, manifest, runs) if continue_from else None
    return pretrain(manifest, config, runs, init_from)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="data_specs/default.yaml")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--manifest", default=None, help="train on this manifest.json (skips the data flow)")
    parser.add_argument("--continue-from", default=None, metavar="RUN|CHECKPOINT|latest",
                        help="continued pretraining from these weights")
    parser.add_argument("--init-from-hf", default=None, metavar="HF_DIR",
                        help="continued pretraining of a Hugging Face Llama folder (imported first)")
    args = parser.parse_args()
    require_server()
    print(pretrain_flow(args.spec, args.preset, args.tp, args.pp, train={"steps": args.steps} if args.steps else None,
                        manifest=args.manifest, continue_from=args.continue_from, init_from_hf=args.init_from_hf))

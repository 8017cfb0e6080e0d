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
from model.run_config import RunConfig
from tasks.import_hf import checkpoint_of, pin_hf_model
from tasks.lib.artifacts import store_of
from tasks.lib.runs import decide_start
from tasks.lib.steps import step
from tasks.prefect_tasks import preflight, pretrain, run_step
from tasks.spec import resolve_path


@flow(name="pretrain")
def pretrain_flow(spec_path: str = "data_specs/default.yaml", run: RunConfig = RunConfig(), runs_dir: str = "runs",
                  manifest: str | None = None, continue_from: str | None = None, init_from_hf: str | None = None,
                  hf_dtype: str | None = None) -> str:
    """Build (or reuse) the shards for `spec_path`, then train on them as `run` says; returns the run directory.

    `run` (model/run_config.py): the model preset and overrides, the parallel layout, every train setting, and
    the launch (nproc, nodes, Slurm, restarts, step timeout). It is checked before any data work.
    `manifest`: train on this manifest.json instead of running the data flow (the new-manifest event passes it).
    `continue_from`: continued pretraining from a run directory or checkpoint's weights; "latest" takes the
    newest finished pretraining run on an earlier manifest with the same tokenizer (or trains from scratch).
    `init_from_hf`: continued pretraining of a Hugging Face Llama folder, imported (a cached stage) in `hf_dtype`
    (model/import_hf.py; default fp32 for fp32 weights, else bf16). The data flow tokenizes with the model's own
    tokenizer, and the model is the folder's own architecture."""
    if continue_from and init_from_hf:
        raise ValueError("give continue_from or init_from_hf, not both")
    preflight(run, init_from_hf or continue_from, "init_from_hf" if init_from_hf else None)
    hf_model = pin_hf_model(init_from_hf) if init_from_hf else None  # fails now, not after the data flow
    runs = str(resolve_path(runs_dir))
    # A new string, not the subflow's return value itself: Prefect would record that as a `flow_run` input of the
    # pretrain task, and the UI's task-run page cannot show those (it stays blank; Prefect 3.9).
    manifest = str(resolve_path(manifest or data_flow(spec_path, tokenizer_from=init_from_hf)))

    def imported(folder: str) -> str:  # the store that holds the manifest: <store>/<stage>/<fingerprint>/
        tp, pp = run.parallel.tensor_parallel, run.parallel.pipeline_parallel
        return checkpoint_of(run_step(step("import_hf", f"{tp}x{pp}", model=hf_model, tp=tp, pp=pp, dtype=hf_dtype,
                                           artifacts_dir=str(store_of(Path(manifest).parent)))))

    start = decide_start(init_from_hf or continue_from, manifest, runs, imported)
    return pretrain(manifest, run, runs, start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="data_specs/default.yaml")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--manifest", default=None, help="train on this manifest.json (skips the data flow)")
    parser.add_argument("--continue-from", default=None, metavar="RUN|CHECKPOINT|latest",
                        help="continued pretraining from these weights")
    parser.add_argument("--init-from-hf", default=None, metavar="HF_DIR",
                        help="continued pretraining of a Hugging Face Llama folder (imported first)")
    args = parser.parse_args()
    require_server()
    run = RunConfig(preset=args.preset, **({"train": {"steps": args.steps}} if args.steps else {}))
    print(pretrain_flow(args.spec, run, manifest=args.manifest, continue_from=args.continue_from,
                        init_from_hf=args.init_from_hf))

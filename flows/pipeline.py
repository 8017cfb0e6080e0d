"""The whole pipeline: data -> pretrain -> instruction tuning -> evaluation, each step cached or resumed.

    python -m flows.pipeline                      # bundled data, tiny model, CPU
"""

from __future__ import annotations

import argparse

from prefect import flow

from flows.data import data_flow, require_server
from flows.evaluate import evaluate_flow
from flows.pretrain import pretrain_flow
from flows.sft import sft_flow
from tasks.lib.log import progress


@flow(name="pipeline")
def pipeline_flow(data_spec_path: str = "data_specs/default.yaml", sft_spec_path: str = "data_specs/sft_default.yaml",
                  eval_spec_path: str = "data_specs/eval_default.yaml", preset: str = "tiny", tp: int = 1,
                  pp: int = 1, sequence_parallel: bool | None = None, virtual_pipeline: int | None = None,
                  nproc: int | None = None, gpus_required: bool = False,
                  pretrain_train: dict | None = None, sft_train: dict | None = None, runs_dir: str = "runs",
                  reports_dir: str = "reports", plan: bool = False, init_from_hf: str | None = None) -> str:
    """Returns the evaluation report directory (report.md, results.json).

    `init_from_hf`: start from a Hugging Face Llama folder: continued pretraining (the data tokenized with the
    model's own tokenizer), then SFT and evaluation.

    `plan`: build and train nothing; return the data flow's plan (per stage, reuse or build and why). The
    training steps need no plan of their own: a run keyed like a finished one returns it at once, and an
    unfinished one resumes from its latest checkpoint."""
    if plan:
        return data_flow(data_spec_path, plan=True, tokenizer_from=init_from_hf)
    layout = dict(tp=tp, pp=pp, sequence_parallel=sequence_parallel, virtual_pipeline=virtual_pipeline, nproc=nproc,
                  gpus_required=gpus_required)
    pretrained = pretrain_flow(data_spec_path, preset, **layout, train=pretrain_train, runs_dir=runs_dir,
                               init_from_hf=init_from_hf)
    tuned = sft_flow(sft_spec_path, pretrained, **layout, train=sft_train, runs_dir=runs_dir)
    report = evaluate_flow(pretrained, tuned, eval_spec_path, runs_dir, reports_dir)
    progress(f"pipeline done; evaluation report: {report}/report.md")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--plan", action="store_true", help="run nothing: print the data stages' plan")
    args = parser.parse_args()
    require_server()
    print(pipeline_flow(pretrain_train={"steps": args.pretrain_steps} if args.pretrain_steps else None,
                        sft_train={"steps": args.sft_steps} if args.sft_steps else None, plan=args.plan))

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
from model.run_config import RunConfig
from tasks.lib.log import progress
from tasks.quantize import check_schemes
from tasks.train import SFT_TRAIN


@flow(name="pipeline")
def pipeline_flow(data_spec_path: str = "data_specs/default.yaml", sft_spec_path: str = "data_specs/sft_default.yaml",
                  eval_spec_path: str = "data_specs/eval_default.yaml", pretrain: RunConfig = RunConfig(),
                  sft: RunConfig = RunConfig(train=SFT_TRAIN), runs_dir: str = "runs", reports_dir: str = "reports",
                  plan: bool = False, init_from_hf: str | None = None, hf_dtype: str | None = None,
                  sft_seq_len: int | None = None, quantize: list[str] = []) -> str:
    """Returns the evaluation report directory (report.md, results.json).

    `pretrain` and `sft`: the two training runs' configs (model/run_config.py), as the pretrain and sft flows take
    them: layout, train settings and launch each. `init_from_hf`: start from a Hugging Face Llama folder (imported
    in `hf_dtype`): continued pretraining (the data tokenized with the model's own tokenizer), then SFT (rows of
    `sft_seq_len` tokens, default the pretraining length) and evaluation.

    `quantize`: schemes of model/quantize.py; both exports are also quantized in each and scored beside them.

    `plan`: build and train nothing; return the data flow's plan (per stage, reuse or build and why). The
    training steps need no plan of their own: a run keyed like a finished one returns it at once, and an
    unfinished one resumes from its latest checkpoint."""
    if plan:
        return data_flow(data_spec_path, plan=True, tokenizer_from=init_from_hf)
    check_schemes(quantize)  # before hours of training, not after
    pretrained = pretrain_flow(data_spec_path, pretrain, runs_dir=runs_dir, init_from_hf=init_from_hf,
                               hf_dtype=hf_dtype)
    tuned = sft_flow(sft_spec_path, pretrained, sft, runs_dir=runs_dir, seq_len=sft_seq_len)
    report = evaluate_flow(pretrained, tuned, eval_spec_path, runs_dir, reports_dir, quantize)
    progress(f"pipeline done; evaluation report: {report}/report.md")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--plan", action="store_true", help="run nothing: print the data stages' plan")
    parser.add_argument("--quantize", action="append", default=[], help="a scheme of model/quantize.py")
    args = parser.parse_args()
    require_server()
    pretrain = RunConfig(train={"steps": args.pretrain_steps}) if args.pretrain_steps else RunConfig()
    sft = RunConfig(train=SFT_TRAIN.replace(steps=args.sft_steps) if args.sft_steps else SFT_TRAIN)
    print(pipeline_flow(pretrain=pretrain, sft=sft, plan=args.plan, quantize=args.quantize))

"""Instruction-tuning stage: `model.train` again, on SFT shards (loss on replies only, packed examples kept
apart), starting from a pretraining checkpoint's weights. Checkpoints and resume work exactly as in pretraining.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.lib.log import progress
from tasks.lib.launch import TRAINING_TASK_OPTIONS, PretrainConfig, check_resources, run_training
from tasks.lib.runs import checkpoint_architecture, finished_summary, run_key, write_summary
from tasks.lib.training_report import final_validation, publish_training

# A short run with a lower peak learning rate than pretraining: the data is small and the model already trained.
SFT_TRAIN_DEFAULTS = {"steps": 80, "global_batch": 16, "micro_batch": 4, "lr": 1e-3, "min_lr": 1e-4,
                      "warmup_steps": 8, "log_every": 10, "eval_every": 20, "save_every": 40, "eval_batches": 4}


@task(name="sft", **TRAINING_TASK_OPTIONS)
def sft(sft_manifest: str, init_checkpoint: str, config: PretrainConfig, runs_dir: str) -> str:
    """Fine-tune from `init_checkpoint` on the SFT shards; returns the run directory. The architecture is the
    checkpoint's own, so it cannot drift from what was pretrained."""
    config = checkpoint_architecture(config, init_checkpoint).model_copy(
        update={"train": {**SFT_TRAIN_DEFAULTS, **config.train}})
    check_resources(config)  # against the architecture it will train
    manifest_dir = Path(sft_manifest).parent
    key = run_key(manifest=str(manifest_dir), init=str(init_checkpoint), config=config)
    run_dir = Path(runs_dir) / f"sft-{config.preset}-{key}"
    if (done := finished_summary(run_dir)) is not None:  # the same request again: nothing to launch or rewrite
        progress(f"sft: {run_dir} already finished at step {done['steps']} (held-out reply loss "
                 f"{done['final_val_loss']:.3f}); returning it")
        return str(run_dir)
    records = run_training(config, manifest_dir, run_dir, extra=("--init-from", str(init_checkpoint)), stage="sft")
    publish_training(records, run_dir, baseline=None, stage="sft")
    summary = {"run_dir": str(run_dir), "init_checkpoint": str(init_checkpoint), "steps": records[-1]["step"],
               "final_val_loss": final_validation(records).get("val_loss")}
    write_summary(run_dir, summary)
    progress(f"sft: {run_dir} finished at step {summary['steps']}, held-out reply loss "
             f"{summary['final_val_loss']:.3f}; curves: tensorboard --logdir {runs_dir}")
    return str(run_dir)

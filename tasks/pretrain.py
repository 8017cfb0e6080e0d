"""Pretraining stage: train (or resume) `model.train` on a manifest's shards, launched by tasks/lib/launch.py,
and publish its metrics and loss curve. The run directory is keyed by the manifest and the training config, so
re-running the same deployment resumes (or, if finished, returns at once) instead of starting over.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.lib.log import progress
from tasks.lib.launch import (TRAINING_TASK_OPTIONS, PretrainConfig, check_gpus, check_resources,
                              check_train_settings, run_training)
from tasks.lib.runs import (checkpoint_architecture, continuation_checkpoint, finished_summary, run_key,
                            starting_architecture, write_summary)
from tasks.lib.training_report import final_validation, publish_training


@task(name="preflight")
def preflight(config: PretrainConfig, start: str | None = None, hf_setting: str | None = None) -> None:
    """Runs before the data flow, so a layout that cannot run here, or a bad training setting, fails in seconds,
    not after hours of data. The GPUs first; then the layout against the model the run starts from, where that is
    known (`start`: a checkpoint or run directory, or the Hugging Face folder the setting `hf_setting` names)."""
    check_train_settings(config.train)
    check_gpus(config)
    check_resources(starting_architecture(config, start, hf_setting))


continue_from_task = task(name="continue-from")(continuation_checkpoint)


@task(name="pretrain", **TRAINING_TASK_OPTIONS)
def pretrain(manifest_path: str, config: PretrainConfig, runs_dir: str, init_from: str | None = None) -> str:
    """Train (or resume) on the shards of `manifest_path`, from scratch or (continued pretraining) from the
    weights of checkpoint `init_from`; returns the run directory."""
    from model.data import unigram_entropy

    if init_from:
        config = checkpoint_architecture(config, init_from)
    check_resources(config)  # against the architecture it will train
    manifest_dir = Path(manifest_path).parent
    key = run_key(manifest=str(manifest_dir), config=config, **({"init": init_from} if init_from else {}))
    run_dir = Path(runs_dir) / f"{config.preset}-{key}"
    if (done := finished_summary(run_dir)) is not None:  # the same request again: nothing to launch or rewrite
        progress(f"pretrain: {run_dir} already finished at step {done['steps']} (validation loss "
                 f"{done['final_val_loss']:.3f}); returning it")
        return str(run_dir)
    records = run_training(config, manifest_dir, run_dir, extra=("--init-from", init_from) if init_from else ())
    baseline, sample_tokens = unigram_entropy(manifest_dir)
    publish_training(records, run_dir, baseline)
    summary = {"run_dir": str(run_dir), "steps": records[-1]["step"],
               "final_val_loss": final_validation(records).get("val_loss"),
               "unigram_entropy": baseline, "unigram_sample_tokens": sample_tokens,
               **({"continued_from": init_from} if init_from else {})}
    write_summary(run_dir, summary)
    progress(f"pretrain: {run_dir} finished at step {summary['steps']}, validation loss "
             f"{summary['final_val_loss']:.3f} (unigram baseline {baseline:.3f}); curves: tensorboard --logdir {runs_dir}")
    return str(run_dir)

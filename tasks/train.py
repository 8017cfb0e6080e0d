"""The training stages, pretrain and sft: train (or resume) `model.train` on a manifest's shards, launched and
supervised by tasks/lib/supervise.py, and publish its metrics and loss curve.

The run directory is keyed by the manifest, the run config (model/run_config.py: what decides the trained model,
not how it is launched) and the checkpoint it starts from, so running the same deployment again resumes it, or,
if it finished, returns it at once, instead of starting over. Instruction tuning is the same program on SFT shards
(loss on replies only, packed examples kept apart), from a pretrained checkpoint's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from model.run_config import RunConfig, Start, TrainJob
from model.config import TrainConfig
from tasks.lib.log import progress
from tasks.lib.preflight import check_layout
from tasks.lib.runs import checkpoint_architecture, finished_summary, run_key, write_summary
from tasks.lib.supervise import run_training
from tasks.lib.training_report import final_validation

# A short run with a lower peak learning rate than pretraining: the data is small and the model already trained.
# A deployment's `train` settings go on top of these (TrainConfig.over).
SFT_TRAIN = TrainConfig(steps=80, global_batch=16, micro_batch=4, lr=1e-3, min_lr=1e-4, warmup_steps=8,
                        log_every=10, eval_every=20, save_every=40, eval_batches=4)


@dataclass
class Trained:
    run_dir: Path
    records: list[dict] | None  # the metrics of the training this call did; None when it found the run finished
    baseline: float | None  # pretraining: the unigram entropy of the data, the loss of a context-free model


def train(stage: str, manifest_path: str, config: RunConfig, runs_dir: str, start: Start = Start(),
          on_line: Callable[[str], None] = lambda line: None) -> Trained:
    """Train (or resume) `stage` ("pretrain" or "sft") on the shards of `manifest_path`, from `start`. Started from
    a checkpoint, the architecture is the checkpoint's own, so it cannot drift. `on_line`: each of rank 0's
    lines."""
    from model.data import unigram_entropy

    if start.checkpoint:
        config = checkpoint_architecture(config, start.checkpoint)
        check_layout(config)  # against the architecture it will train, known now for `latest`
    manifest_dir = Path(manifest_path).parent
    key = run_key(manifest=str(manifest_dir), config=config, start=start)
    run_dir = Path(runs_dir) / f"{'sft-' if stage == 'sft' else ''}{config.preset}-{key}"
    what = "validation loss" if stage == "pretrain" else "held-out reply loss"
    if (done := finished_summary(run_dir)) is not None:  # the same request again: nothing to launch or rewrite
        progress(f"{stage}: {run_dir} already finished at step {done['steps']} ({what} "
                 f"{done['final_val_loss']:.3f}); returning it")
        return Trained(run_dir, None, done.get("unigram_entropy"))
    job = TrainJob(config=config, manifest=str(manifest_dir), start=start, inputs=store_inputs(manifest_dir, start))
    records = run_training(job, run_dir, stage, on_line)
    baseline, sample_tokens = unigram_entropy(manifest_dir) if stage == "pretrain" else (None, None)
    summary = {"run_dir": str(run_dir), "stage": stage, "start": start.model_dump(), "steps": records[-1]["step"],
               "final_val_loss": final_validation(records).get("val_loss"),
               **({"unigram_entropy": baseline, "unigram_sample_tokens": sample_tokens} if baseline else {})}
    write_summary(run_dir, summary)
    progress(f"{stage}: {run_dir} finished at step {summary['steps']}, {what} {summary['final_val_loss']:.3f}"
             + (f" (unigram baseline {baseline:.3f})" if baseline else "")
             + f"; curves: tensorboard --logdir {runs_dir}")
    return Trained(run_dir, records, baseline)


def store_inputs(manifest_dir: Path, start: Start) -> list[str]:
    """The store's artifacts a run reads, as `stage/fingerprint` (tasks.gc keeps them): its manifest's, and for an
    imported model the import's (`<store>/import_hf/<fingerprint>/checkpoint`)."""
    inputs = [f"{manifest_dir.parent.name}/{manifest_dir.name}"]
    if start.kind == "hf_import":
        imported = Path(start.checkpoint).parent
        inputs.append(f"{imported.parent.name}/{imported.name}")
    return inputs

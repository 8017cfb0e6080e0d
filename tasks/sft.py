"""Instruction-tuning stage: `model.train` again, on SFT shards (loss on replies only, packed examples kept
apart), starting from a pretraining checkpoint's weights. Checkpoints and resume work exactly as in pretraining.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from tasks.artifacts import get_logger
from tasks.pretrain import (PretrainConfig, check_resources, checkpoint_architecture, final_validation,
                           publish_training, run_key, run_training)

# A short run with a lower peak learning rate than pretraining: the data is small and the model already trained.
SFT_TRAIN_DEFAULTS = {"steps": 80, "global_batch": 16, "micro_batch": 4, "lr": 1e-3, "min_lr": 1e-4,
                      "warmup_steps": 8, "log_every": 10, "eval_every": 20, "save_every": 40, "eval_batches": 4}


@task(name="sft")
def sft(sft_manifest: str, init_checkpoint: str, config: PretrainConfig, runs_dir: str) -> str:
    """Fine-tune from `init_checkpoint` on the SFT shards; returns the run directory. The architecture is the
    checkpoint's own, so it cannot drift from what was pretrained."""
    check_resources(config)
    config = checkpoint_architecture(config, init_checkpoint).model_copy(
        update={"train": {**SFT_TRAIN_DEFAULTS, **config.train}})
    manifest_dir = Path(sft_manifest).parent
    key = run_key(manifest=str(manifest_dir), init=str(init_checkpoint), config=config)
    run_dir = Path(runs_dir) / f"sft-{config.preset}-{key}"
    records = run_training(config, manifest_dir, run_dir, extra=("--init-from", str(init_checkpoint)), stage="sft")
    publish_training(records, run_dir, baseline=None, stage="sft")
    summary = {"run_dir": str(run_dir), "init_checkpoint": str(init_checkpoint), "steps": records[-1]["step"],
               "final_val_loss": final_validation(records).get("val_loss")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    get_logger().info(f"sft: {summary}")
    return str(run_dir)


def finished_runs(runs_dir: str | Path, kind: str) -> list[Path]:
    """The finished runs of a kind ("pretrain" or "sft") under runs_dir, newest first."""
    runs = [p.parent for p in Path(runs_dir).glob("*/summary.json")
            if ("init_checkpoint" in json.loads(p.read_text())) == (kind == "sft")]
    return sorted(runs, key=lambda p: (p / "summary.json").stat().st_mtime, reverse=True)


def newest_run(runs_dir: str | Path, kind: str) -> Path:
    """The most recently finished run of a kind under runs_dir, for flows given no run."""
    runs = finished_runs(runs_dir, kind)
    if not runs:
        raise FileNotFoundError(f"no finished {kind} run under {runs_dir}: run `prefect deployment run "
                                f"{'pretrain/tiny' if kind == 'pretrain' else 'sft/default'}` (or pipeline/default) "
                                f"first, or pass the run directory explicitly")
    return runs[0]

"""The Prefect tasks of the training stages: thin wrappers over plain functions, which run and are tested without
Prefect. (The training tasks retry when the launcher itself was killed; a retry resumes the run directory.)"""

from __future__ import annotations

from prefect import task

from model.run_config import RunConfig, Start
from tasks.lib.preflight import preflight as check_before_work
from tasks.lib.supervise import TRAINING_TASK_OPTIONS
from tasks.train import train


@task(name="preflight")
def preflight(config: RunConfig, start: str | None = None, hf_setting: str | None = None) -> None:
    """Runs before the data flow: the GPUs, the layout against the starting model, fp8 (tasks/lib/preflight.py)."""
    check_before_work(config, start, hf_setting)


@task(name="pretrain", **TRAINING_TASK_OPTIONS)
def pretrain(manifest_path: str, config: RunConfig, runs_dir: str, start: Start = Start()) -> str:
    return train("pretrain", manifest_path, config, runs_dir, start)


@task(name="sft", **TRAINING_TASK_OPTIONS)
def sft(manifest_path: str, config: RunConfig, runs_dir: str, start: Start) -> str:
    return train("sft", manifest_path, config, runs_dir, start)

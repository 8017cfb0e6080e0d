"""Checks made once before any work, so that a run that cannot run here fails in seconds, not after hours of
data: the GPUs it needs, its layout against the model it will train, and fp8's requirements. The settings
themselves were validated when the RunConfig was made (model/run_config.py)."""

from __future__ import annotations

from pathlib import Path

from model.run_config import RunConfig


def preflight(config: RunConfig, start: str | Path | None = None, hf_setting: str | None = None) -> None:
    """The GPUs first (a missing machine is the first thing said, before any model folder is read); then the
    layout against the model the run starts from, where that is known (`start`: a checkpoint or run directory, or
    the Hugging Face folder the setting `hf_setting` names); then fp8."""
    check_gpus(config)
    if start is None:
        check_layout(config)
    else:
        from tasks.lib.runs import starting_architecture

        check_layout(starting_architecture(config, start, hf_setting))
    if config.train.precision == "fp8" and config.launch.launcher == "torchrun":  # here, where torchrun will run
        from model.gpt import check_fp8_available

        check_fp8_available()


def check_gpus(config: RunConfig) -> None:
    """Fail when the layout needs more GPUs than this machine has, saying what it needs. (A Slurm launch runs on
    the cluster's nodes, not here.)"""
    import torch

    have, launch, parallel = torch.cuda.device_count(), config.launch, config.parallel
    if launch.gpus_required and launch.launcher == "torchrun" and have < config.ranks:
        dp = config.world_size // (parallel.tensor_parallel * parallel.pipeline_parallel)
        raise RuntimeError(
            f"preset '{config.preset}' is set to run on {config.ranks} GPUs"
            f"{f' on each of {launch.nnodes} nodes' if launch.nnodes > 1 else ''} "
            f"(TP {parallel.tensor_parallel} x PP {parallel.pipeline_parallel} x DP {dp}), but this machine has "
            f"{have} CUDA device(s). Run it where {config.ranks} GPUs are available (see `python -m model.memory_plan "
            f"--preset {config.preset}` for memory per GPU), submit it with launch.launcher: slurm, or run "
            f"pretrain/tiny here.")


def check_layout(config: RunConfig) -> None:
    """The parallel layout against the model's layers and the batch, as model.train will check them."""
    parallel = config.parallel
    parallel.check_schedule(config.model(), config.train, parallel.data_parallel(config.world_size))

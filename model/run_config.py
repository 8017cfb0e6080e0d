"""One typed config for a training run, from the deployment to every rank.

    RunConfig   what a deployment sets: the model (preset and overrides), the parallel layout, the train settings
                and how it is launched. The pretrain, sft and pipeline flows take it as a parameter (the Prefect UI
                renders it as a form); it is validated once, when the flow starts.
    Start       where a run's weights come from: scratch, a checkpoint, or a Hugging Face import.
    TrainJob    one run as the launcher writes it to `<run_dir>/train_job.json`: the RunConfig, the manifest it
                trains on and its Start. Every rank reads that file (`python -m model.train <file>`); no setting
                travels as a command-line flag.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.config import ModelConfig, ParallelConfig, TrainConfig, preset
from tasks.spec import SlurmConfig

JOB_FILE = "train_job.json"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class LaunchConfig(Strict):
    """Where and how the ranks run, and how failures are handled. Only `nproc` and `nnodes` (the world size) are
    in the run's key: raising a Slurm time limit or moving partitions resumes the same run."""

    nproc: int | None = Field(default=None, ge=1)
    """Ranks per node; default tensor_parallel x pipeline_parallel (data parallel 1)."""
    nnodes: int = Field(default=1, ge=1)
    """Nodes, each running `nproc` ranks."""
    launcher: Literal["torchrun", "slurm"] = "torchrun"
    """torchrun from this process (one node, or this node of several), or an sbatch job that runs torchrun on every
    node."""
    node_rank: int = Field(default=0, ge=0)
    """torchrun launcher with nnodes > 1: this node's rank."""
    rdzv_endpoint: str | None = None
    """torchrun launcher with nnodes > 1: host:port of the c10d rendezvous, reachable from every node."""
    slurm: SlurmConfig = SlurmConfig()
    gpus_required: bool = False
    """Fail fast unless nproc CUDA devices are present."""
    max_restarts: int | None = Field(default=None, ge=0)
    """Times the whole group is restarted, from the latest checkpoint, after a rank dies or stalls; default 3 with
    gpus_required, else 1. A rank that fails with a Python error before the attempt's first step ends is not
    restarted: it would fail the same way."""
    step_timeout_s: float = Field(default=900, gt=0)
    """A step (with its evaluation and checkpoint save) in which no rank makes progress for this long is a stall:
    the group is killed and restarted."""

    @property
    def restarts(self) -> int:
        return self.max_restarts if self.max_restarts is not None else 3 if self.gpus_required else 1


class RunConfig(Strict):
    """What to train, how to lay it out, how to train it and how to launch it."""

    preset: str = "tiny"
    """Model preset (model/config.py): tiny or 7b; a run started from a checkpoint or an import takes its own."""
    model_overrides: dict[str, Any] = {}
    """ModelConfig fields to override (the vocabulary and sequence length come from the data)."""
    parallel: ParallelConfig = ParallelConfig()
    train: TrainConfig = TrainConfig()
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _model_is_known(self) -> RunConfig:
        try:
            self.model()
        except TypeError as err:  # an unknown ModelConfig field
            raise ValueError(f"model_overrides: {err}; ModelConfig's fields are "
                             f"{', '.join(f.name for f in ModelConfig.__dataclass_fields__.values())}") from None
        return self

    def model(self, **data: Any) -> ModelConfig:
        """The preset with its overrides, and with `data` (the manifest's seq_len and vocab_size) over both."""
        return preset(self.preset, **{**self.model_overrides, **data})

    def fingerprint_payload(self) -> dict:
        """What decides the trained model, for the run's key: not how it is launched, except the world size."""
        payload = self.model_dump(mode="json", exclude={"launch"})
        return {**payload, "launch": {"nproc": self.launch.nproc, "nnodes": self.launch.nnodes}}

    @property
    def ranks(self) -> int:
        """Ranks per node."""
        return self.launch.nproc or self.parallel.tensor_parallel * self.parallel.pipeline_parallel

    @property
    def world_size(self) -> int:
        return self.ranks * self.launch.nnodes

    def replace(self, **changes) -> RunConfig:
        """A copy with `changes`, validated again."""
        return RunConfig(**{**dict(self), **changes})


class Start(Strict):
    """Where a run's weights come from. `checkpoint` is the checkpoint they are loaded from: a pretraining or
    SFT run's, or for `hf_import` the checkpoint the import stage wrote (model/import_hf.py), whose train state
    names the Hugging Face folder."""

    kind: Literal["scratch", "checkpoint", "hf_import"] = "scratch"
    checkpoint: str | None = None

    @model_validator(mode="after")
    def _checkpoint_given(self) -> Start:
        if (self.kind == "scratch") != (self.checkpoint is None):
            raise ValueError(f"start {self.kind!r} {'takes no' if self.kind == 'scratch' else 'needs a'} checkpoint")
        return self


class TrainJob(Strict):
    """One training run as every rank reads it from `<run_dir>/train_job.json`."""

    config: RunConfig
    manifest: str
    """The manifest directory (holding manifest.json) it trains on."""
    start: Start = Start()
    inputs: list[str] = []
    """The artifacts of the store it reads, as `stage/fingerprint` (its manifest's, an import's): recorded in each
    checkpoint's train state, where the store's garbage collection (tasks/gc.py) finds them."""

    def write(self, run_dir: Path) -> Path:
        """`<run_dir>/train_job.json`, replaced atomically."""
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{JOB_FILE}.tmp"
        tmp.write_text(self.model_dump_json(indent=1))
        os.replace(tmp, run_dir / JOB_FILE)
        return run_dir / JOB_FILE

    @classmethod
    def read(cls, path: str | Path) -> TrainJob:
        return cls.model_validate_json(Path(path).read_text())

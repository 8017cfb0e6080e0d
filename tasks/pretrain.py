"""Pretraining stage: launch `model.train` under torchrun and report it to Prefect.

Rank 0's progress lines stream into the task's log; every rank's stderr goes to `<run_dir>/ranks.log`, and a
failed rank turns into a failed task whose message quotes that rank's traceback. Metrics become a Prefect table
and a loss-curve image. The run directory is keyed by the manifest and the training config, so re-running the
same deployment resumes (or, if finished, returns at once) instead of starting over.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import BaseModel, Field

from model.distributed import free_port
from tasks.artifacts import canonical, get_logger
from tasks.spec import PROJECT_ROOT, resolve_path

FAILURE = re.compile(r"^\[rank (\d+)\] training failed:\n(.*?)(?=^\[rank \d+\] training failed:|\Z)", re.M | re.S)


class SlurmLaunch(BaseModel):
    """How the pretrain task submits training to Slurm (launcher: slurm)."""

    partition: str | None = Field(default=None, description="partition to submit to")
    time: str = Field(default="48:00:00", description="time limit")
    cpus_per_node: int = Field(default=16, ge=1)
    sbatch_args: dict[str, str] = Field(default={}, description="extra #SBATCH directives, e.g. {account: llm}")
    env_command: str | None = Field(default=None, description="shell line run first, e.g. module load ...")
    rdzv_port: int = Field(default=29500, description="c10d rendezvous port on the job's first node")


class PretrainConfig(BaseModel):
    """What to train and how to lay it out; fields map onto `python -m model.train` flags."""

    preset: str = Field(default="tiny", description="model preset (model/config.py): tiny or 7b")
    tp: int = Field(default=1, ge=1, description="tensor-parallel size")
    pp: int = Field(default=1, ge=1, description="pipeline-parallel size")
    nproc: int | None = Field(default=None, ge=1, description="ranks per node; default tp x pp (DP 1)")
    gpus_required: bool = Field(default=False, description="fail fast unless nproc CUDA devices are present")
    train: dict = Field(default={}, description="TrainConfig overrides, e.g. {steps: 300, global_batch: 16}")
    model_overrides: dict = Field(default={}, description="ModelConfig overrides (vocab/seq come from the data)")
    nnodes: int = Field(default=1, ge=1, description="nodes, each running `nproc` ranks")
    launcher: Literal["torchrun", "slurm"] = Field(
        default="torchrun", description="torchrun from this process (one node, or this node of several), or an "
                                        "sbatch job that runs torchrun on every node")
    node_rank: int = Field(default=0, ge=0, description="torchrun launcher with nnodes > 1: this node's rank")
    rdzv_endpoint: str | None = Field(default=None, description="torchrun launcher with nnodes > 1: host:port of "
                                                                "the c10d rendezvous, reachable from every node")
    slurm: SlurmLaunch = SlurmLaunch()

    @property
    def ranks(self) -> int:
        return self.nproc or self.tp * self.pp

    @property
    def world_size(self) -> int:
        return self.ranks * self.nnodes


def train_args(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """`model.train`'s own arguments."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in config.train.items()] + list(extra)
    return ["-m", "model.train", "--manifest", str(manifest_dir), "--run-dir", str(run_dir),
            "--preset", config.preset, "--tp", str(config.tp), "--pp", str(config.pp),
            "--model-overrides", json.dumps(config.model_overrides), *flags]


def launch_command(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """torchrun for this node: a private loopback rendezvous on one node; c10d across nodes."""
    if config.nnodes == 1:
        rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    elif not config.rdzv_endpoint:
        raise ValueError(f"nnodes={config.nnodes} with the torchrun launcher needs rdzv_endpoint (host:port on "
                         f"the first node, reachable from all), or launcher: slurm")
    else:
        rendezvous = ["--nnodes", str(config.nnodes), "--node-rank", str(config.node_rank), "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", config.rdzv_endpoint, "--rdzv-id", run_dir.name]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(config.ranks), *rendezvous,
            *train_args(config, manifest_dir, run_dir, extra)]


def slurm_script(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...] = ()) -> str:
    """An sbatch script that starts one torchrun agent per node; the agents meet at a c10d rendezvous on the
    job's first node. Paths are this machine's, so the project must sit on a filesystem every node mounts."""
    slurm = config.slurm
    if not slurm.partition:
        raise ValueError("launcher: slurm needs slurm.partition")
    directives = {"job-name": f"pretrain-{run_dir.name}", "nodes": config.nnodes, "ntasks-per-node": 1,
                  "cpus-per-task": slurm.cpus_per_node, "partition": slurm.partition, "time": slurm.time,
                  "output": str(run_dir / "slurm-%j.out"),
                  **({"gpus-per-node": config.ranks} if config.gpus_required else {}), **slurm.sbatch_args}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "$SLURM_NNODES", "--node-rank",
                "$SLURM_NODEID", "--nproc-per-node", str(config.ranks), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"$head:{slurm.rdzv_port}", "--rdzv-id", "$SLURM_JOB_ID",
                *train_args(config, manifest_dir, run_dir, extra)]
    quoted = " ".join(a if a.startswith("$") else shlex.quote(a) for a in torchrun).replace("$head", '"$head"')
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH --{k}={v}" for k, v in directives.items()),
        "set -euo pipefail",
        *([slurm.env_command] if slurm.env_command else []),
        f"cd {shlex.quote(str(PROJECT_ROOT))}",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export OMP_NUM_THREADS={max(1, slurm.cpus_per_node // config.ranks)} PYTHONUNBUFFERED=1",
        # srun's $SLURM_NODEID must be expanded on each node, not here: hence the single quotes.
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(quoted)}",
        ""])


def check_resources(config: PretrainConfig) -> None:
    """Fail before launching when the layout cannot run here, saying what it needs. (A Slurm launch runs on
    the cluster's nodes, not here.)"""
    import torch

    have = torch.cuda.device_count()
    if config.gpus_required and config.launcher == "torchrun" and have < config.ranks:
        dp = config.world_size // (config.tp * config.pp)
        raise RuntimeError(
            f"preset '{config.preset}' is set to run on {config.ranks} GPUs"
            f"{f' on each of {config.nnodes} nodes' if config.nnodes > 1 else ''} "
            f"(TP {config.tp} x PP {config.pp} x DP {dp}), but this machine has {have} CUDA device(s). Run it "
            f"where {config.ranks} GPUs are available (see `python -m model.plan --preset {config.preset}` for "
            f"memory per GPU), submit it with launcher: slurm, or run pretrain/tiny here.")


class TrainingProgress:
    """A Prefect progress artifact (`<stage>-progress`, percent of steps done) that follows rank 0's `step=N`
    lines; a no-op outside a Prefect run."""

    STEP = re.compile(r"^step=(\d+) ")

    def __init__(self, stage: str, total_steps: int):
        self.total, self.id = total_steps, None
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import get_run_context

            get_run_context()
        except Exception:
            return
        self.id = create_progress_artifact(progress=0.0, key=f"{stage}-progress",
                                           description=f"{stage}: percent of {total_steps} steps done")

    def line(self, text: str) -> None:
        match = self.STEP.match(text)
        if self.id and match:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, progress=min(100.0, 100.0 * int(match.group(1)) / self.total))


def run_training(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...] = (),
                 stage: str = "pretrain") -> list[dict]:
    """Run training to completion, streaming rank 0's lines to the log and a progress artifact; returns the
    metrics records."""
    from model.config import TrainConfig

    log = get_logger()
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = TrainingProgress(stage, config.train.get("steps", TrainConfig.steps))
    if config.launcher == "slurm":
        code, output = run_slurm_job(config, manifest_dir, run_dir, extra, progress)
    else:
        cmd = launch_command(config, manifest_dir, run_dir, extra)
        log.info("launching: " + " ".join(cmd))
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // config.ranks)),
               "PYTHONUNBUFFERED": "1"}
        output = run_dir / "ranks.log"
        with open(output, "w") as ranks_log:
            proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=ranks_log, text=True,
                                    bufsize=1, env=env)
            for line in iter(proc.stdout.readline, ""):
                log.info(line.rstrip())
                progress.line(line)
            code = proc.wait()
    if code != 0:
        failures = FAILURE.findall(output.read_text())
        if failures:
            rank, trace = failures[0]
            trace = trace.split("\n[rank")[0]  # torch's elastic agent repeats it with [rankN]: prefixes
            raise RuntimeError(f"training failed on rank {rank} (exit code {code}); its traceback:\n{trace.strip()}"
                               f"\nAll ranks' output: {output}")
        raise RuntimeError(f"training exited with code {code}; last output:\n{output.read_text()[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_slurm_job(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...],
                  progress: TrainingProgress) -> tuple[int, Path]:
    """Submit the training job with `sbatch --wait` and follow its output file into the log until it ends."""
    log = get_logger()
    script = run_dir / "pretrain.sbatch"
    script.write_text(slurm_script(config, manifest_dir, run_dir, extra))
    proc = subprocess.Popen(["sbatch", "--parsable", "--wait", str(script)], stdout=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    output = run_dir / f"slurm-{job_id}.out"
    log.info(f"submitted Slurm job {job_id} ({config.nnodes} nodes x {config.ranks} ranks): {script}; "
             f"output {output}")
    position = 0
    while True:
        finished = proc.poll() is not None
        if output.exists():
            with open(output) as f:
                f.seek(position)
                for line in f:
                    log.info(line.rstrip())
                    progress.line(line)
                position = f.tell()
        if finished:
            return proc.returncode, output
        time.sleep(5)


def loss_curve_png(records: list[dict], path: Path, baseline: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", lw=1)
    val = [r for r in records if r.get("val_loss") is not None]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="grey", label=f"unigram entropy {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def final_validation(records: list[dict]) -> dict:
    """The last record that has a validation loss (the final step always evaluates)."""
    return next((r for r in reversed(records) if r.get("val_loss") is not None), records[-1])


def publish_training(records: list[dict], run_dir: Path, baseline: float | None, stage: str = "pretrain") -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    shown = [r for r in records if "tokens_per_s" in r or r.get("val_loss") is not None]
    create_table_artifact(key=f"{stage}-metrics", description=f"{stage} metrics at each log step",
                          table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in shown])
    png = loss_curve_png(records, run_dir / "loss_curve.png", baseline)
    final = final_validation(records)
    reference = f" (unigram-entropy baseline {baseline:.3f})" if baseline is not None else ""
    create_markdown_artifact(key=f"{stage}-loss-curve", markdown=(
        f"# {stage}: {run_dir.name}\n\nFinal validation loss **{final.get('val_loss', float('nan')):.3f}** at "
        f"step {final['step']}{reference}.\n\n"
        f"![loss curve](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})\n\n"
        f"Run directory: `{run_dir}`"))


@task(name="preflight")
def preflight(config: PretrainConfig) -> None:
    """Runs before the data flow, so a layout that cannot run here fails in seconds, not after hours of data."""
    check_resources(config)


def continuation_checkpoint(continue_from: str, manifest_path: str, runs_dir: str) -> str | None:
    """The checkpoint continued pretraining on `manifest_path` starts from: `continue_from` (a run directory or
    checkpoint), or for "latest" the newest finished pretraining run on another manifest with the same tokenizer
    (None when there is none: the run trains from scratch). Fails when the tokenizers differ: the ids would mean
    other pieces."""
    from model.checkpoint import read_train_state, resolve_checkpoint
    from model.data import load_manifest
    from tasks.sft import finished_runs

    log = get_logger()
    manifest_dir = Path(manifest_path).parent.resolve()
    tokenizer = load_manifest(manifest_dir)["tokenizer_sha256"]

    def trained_on(checkpoint: Path) -> Path:
        return Path(read_train_state(checkpoint)["manifest"]).resolve()

    if continue_from != "latest":
        checkpoint = resolve_checkpoint(resolve_path(continue_from))
        if load_manifest(trained_on(checkpoint))["tokenizer_sha256"] != tokenizer:
            raise ValueError(f"cannot continue {checkpoint} on {manifest_path}: it was trained with another "
                             f"tokenizer (a rebuilt manifest retrains it). Continue on a manifest that extends "
                             f"the one it trained on ({trained_on(checkpoint)}), or pretrain from scratch.")
        return str(checkpoint)
    for run in finished_runs(runs_dir, "pretrain"):
        checkpoint = resolve_checkpoint(run)
        source = trained_on(checkpoint)
        # Not a run on this very manifest: a repeated trigger must resume the same continuation, not chain one.
        if source != manifest_dir and source.is_dir() and load_manifest(source)["tokenizer_sha256"] == tokenizer:
            log.info(f"continued pretraining from {checkpoint}")
            return str(checkpoint)
    log.warning(f"continue_from=latest: no finished pretraining run under {runs_dir} used this manifest's "
                f"tokenizer; training from scratch")
    return None


continue_from_task = task(name="continue-from")(continuation_checkpoint)


def checkpoint_architecture(config: PretrainConfig, checkpoint: str | Path) -> PretrainConfig:
    """`config` with the checkpoint's own preset and model, so a run started from it cannot drift from it."""
    from model.checkpoint import read_train_state

    state = read_train_state(Path(checkpoint))
    return config.model_copy(update={"preset": state["preset"], "model_overrides": state["model"]})


def run_key(**parts) -> str:
    """A run directory's key: the hash of what decides its result (manifest, config, starting checkpoint), so
    the same request finds (and resumes or returns) the same run."""
    return hashlib.sha256(json.dumps(canonical(parts), sort_keys=True).encode()).hexdigest()[:16]


@task(name="pretrain")
def pretrain(manifest_path: str, config: PretrainConfig, runs_dir: str, init_from: str | None = None) -> str:
    """Train (or resume) on the shards of `manifest_path`, from scratch or (continued pretraining) from the
    weights of checkpoint `init_from`; returns the run directory."""
    from model.data import unigram_entropy

    check_resources(config)
    if init_from:
        config = checkpoint_architecture(config, init_from)
    manifest_dir = Path(manifest_path).parent
    key = run_key(manifest=str(manifest_dir), config=config, **({"init": init_from} if init_from else {}))
    run_dir = Path(runs_dir) / f"{config.preset}-{key}"
    records = run_training(config, manifest_dir, run_dir, extra=("--init-from", init_from) if init_from else ())
    baseline = unigram_entropy(manifest_dir)
    publish_training(records, run_dir, baseline)
    summary = {"run_dir": str(run_dir), "steps": records[-1]["step"],
               "final_val_loss": final_validation(records).get("val_loss"),
               "unigram_entropy": baseline, **({"continued_from": init_from} if init_from else {})}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    get_logger().info(f"pretrain: {summary}")
    return str(run_dir)

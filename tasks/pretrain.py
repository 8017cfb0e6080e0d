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
import socket
import subprocess
import sys
from pathlib import Path

from prefect import task
from pydantic import BaseModel, Field

from tasks.artifacts import canonical, get_logger
from tasks.spec import PROJECT_ROOT

FAILURE = re.compile(r"^\[rank (\d+)\] training failed:\n(.*?)(?=^\[rank \d+\] training failed:|\Z)", re.M | re.S)


class PretrainConfig(BaseModel):
    """What to train and how to lay it out; fields map onto `python -m model.train` flags."""

    preset: str = Field(default="tiny", description="model preset (model/config.py): tiny or 7b")
    tp: int = Field(default=1, ge=1, description="tensor-parallel size")
    pp: int = Field(default=1, ge=1, description="pipeline-parallel size")
    nproc: int | None = Field(default=None, ge=1, description="ranks on this node; default tp x pp (DP 1)")
    gpus_required: bool = Field(default=False, description="fail fast unless nproc CUDA devices are present")
    train: dict = Field(default={}, description="TrainConfig overrides, e.g. {steps: 300, global_batch: 16}")
    model_overrides: dict = Field(default={}, description="ModelConfig overrides (vocab/seq come from the data)")

    @property
    def ranks(self) -> int:
        return self.nproc or self.tp * self.pp


def free_port() -> int:
    """torchrun's static rendezvous hangs with --master-port 0, so pick a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in config.train.items()] + list(extra)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(config.ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "model.train", "--manifest", str(manifest_dir), "--run-dir", str(run_dir),
            "--preset", config.preset, "--tp", str(config.tp), "--pp", str(config.pp),
            "--model-overrides", json.dumps(config.model_overrides), *flags]


def check_resources(config: PretrainConfig) -> None:
    """Fail before launching when the layout cannot run here, saying what it needs."""
    import torch

    have = torch.cuda.device_count()
    if config.gpus_required and have < config.ranks:
        dp = config.ranks // (config.tp * config.pp)
        raise RuntimeError(
            f"preset '{config.preset}' is set to run on {config.ranks} GPUs (TP {config.tp} x PP {config.pp} x "
            f"DP {dp}), but this machine has {have} CUDA device(s). Run it where {config.ranks} GPUs are "
            f"available (see `python -m model.plan --preset {config.preset}` for memory per GPU), or run "
            f"pretrain/tiny here.")


def run_training(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...] = ()) -> list[dict]:
    """Run torchrun to completion, streaming rank 0's lines to the log; returns the metrics records."""
    log = get_logger()
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(config, manifest_dir, run_dir, extra)
    log.info("launching: " + " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // config.ranks)),
           "PYTHONUNBUFFERED": "1"}
    with open(run_dir / "ranks.log", "w") as ranks_log:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=ranks_log, text=True,
                                bufsize=1, env=env)
        for line in iter(proc.stdout.readline, ""):
            log.info(line.rstrip())
        code = proc.wait()
    if code != 0:
        failures = FAILURE.findall((run_dir / "ranks.log").read_text())
        if failures:
            rank, trace = failures[0]
            trace = trace.split("\n[rank")[0]  # torch's elastic agent repeats it with [rankN]: prefixes
            raise RuntimeError(f"training failed on rank {rank} (exit code {code}); its traceback:\n{trace.strip()}"
                               f"\nAll ranks' output: {run_dir / 'ranks.log'}")
        tail = (run_dir / "ranks.log").read_text()[-3000:]
        raise RuntimeError(f"torchrun exited with code {code}; last output:\n{tail}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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


@task(name="pretrain")
def pretrain(manifest_path: str, config: PretrainConfig, runs_dir: str) -> str:
    """Train (or resume) on the shards of `manifest_path`; returns the run directory."""
    from model.data import unigram_entropy

    check_resources(config)
    manifest_dir = Path(manifest_path).parent
    key = hashlib.sha256(json.dumps(canonical({"manifest": str(manifest_dir), "config": config}),
                                    sort_keys=True).encode()).hexdigest()[:16]
    run_dir = Path(runs_dir) / f"{config.preset}-{key}"
    records = run_training(config, manifest_dir, run_dir)
    baseline = unigram_entropy(manifest_dir)
    publish_training(records, run_dir, baseline)
    summary = {"run_dir": str(run_dir), "steps": records[-1]["step"],
               "final_val_loss": final_validation(records).get("val_loss"),
               "unigram_entropy": baseline}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    get_logger().info(f"pretrain: {summary}")
    return str(run_dir)

"""Launching `model.train`: torchrun on this node (one node, or one of several meeting at a c10d rendezvous), or
an sbatch job that runs torchrun on every node. Rank 0's lines stream into the run's log (and a progress
artifact); every rank's stderr goes to `<run_dir>/ranks.log`, and a failed rank becomes an exception quoting its
traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from model.distributed import free_port
from tasks.lib.log import get_logger, progress
from tasks.lib.training_report import TrainingProgress
from tasks.spec import PROJECT_ROOT

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
    virtual_pipeline: int | None = Field(
        default=None, ge=2, description="model chunks per pipeline rank: Megatron's interleaved 1F1B schedule, a "
                                        "smaller pipeline bubble (needs pp > 1)")
    sequence_parallel: bool | None = Field(
        default=None, description="split the norms' and residuals' activations over the TP ranks; default on "
                                  "when tp > 1 (model/config.py ParallelConfig)")
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
    max_restarts: int | None = Field(
        default=None, ge=0, description="times the whole group is restarted, from the latest checkpoint, after a "
                                        "rank dies or stalls; default 3 with gpus_required, else 1. A rank that "
                                        "fails with a Python error before the attempt's first step ends is not "
                                        "restarted: it would fail the same way")
    step_timeout_s: float = Field(
        default=900, gt=0, description="a step (with its evaluation and checkpoint save) in which no rank makes "
                                       "progress for this long is a stall: the group is killed and restarted")

    def fingerprint_payload(self) -> dict:
        """What of the config decides the trained model, for the run's key: not how it is launched, so raising a
        Slurm time limit or moving partitions resumes the same run."""
        return self.model_dump(mode="json", exclude={"launcher", "slurm", "node_rank", "rdzv_endpoint",
                                                      "gpus_required", "max_restarts", "step_timeout_s"})

    @property
    def restarts(self) -> int:
        return self.max_restarts if self.max_restarts is not None else 3 if self.gpus_required else 1

    @property
    def ranks(self) -> int:
        return self.nproc or self.tp * self.pp

    @property
    def world_size(self) -> int:
        return self.ranks * self.nnodes


def train_flag(name: str, value) -> str:
    """One TrainConfig override as a `model.train` flag: `--micro-batch=2`; booleans as `--bf16` / `--no-bf16`."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag}={value}"


def train_args(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """`model.train`'s own arguments."""
    flags = [train_flag(k, v) for k, v in config.train.items() if v is not None] + list(extra)
    return ["-m", "model.train", "--manifest", str(manifest_dir), "--run-dir", str(run_dir),
            "--preset", config.preset, "--tp", str(config.tp), "--pp", str(config.pp),
            *([train_flag("sequence_parallel", config.sequence_parallel)] if config.sequence_parallel is not None
              else []),
            *([f"--virtual-pipeline={config.virtual_pipeline}"] if config.virtual_pipeline else []),
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


def check_train_settings(train: dict):
    """The `train:` settings as model.train will read them, validated as its TrainConfig now, before any work:
    an unknown name or a bad value fails naming the field. Returns that TrainConfig."""
    import dataclasses

    from model.config import TrainConfig

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(train) - set(fields))
    if unknown:
        raise ValueError(f"train: unknown setting {unknown[0]!r}; TrainConfig's settings are {', '.join(fields)}")
    try:
        return TrainConfig(**{k: tuple(v) if k == "adam_betas" else v for k, v in train.items() if v is not None})
    except TypeError as err:  # a value of the wrong type, e.g. steps: "ten"
        raise ValueError(f"train: {err}") from None


def check_gpus(config: PretrainConfig) -> None:
    """Fail when the layout needs more GPUs than this machine has, saying what it needs. (A Slurm launch runs on
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


def check_resources(config: PretrainConfig) -> None:
    """Fail before launching when the layout cannot run here or cannot split the model, saying what it needs."""
    check_gpus(config)
    check_layout(config)
    if config.train.get("precision") == "fp8" and config.launcher == "torchrun":  # here, where torchrun will run
        from model.gpt import check_fp8_available

        check_fp8_available()


def check_layout(config: PretrainConfig) -> None:
    """The parallel layout against the model and batch, as model.train will check them, before any work."""
    from model.config import ParallelConfig, preset

    parallel = ParallelConfig(config.tp, config.pp, config.sequence_parallel, config.virtual_pipeline)
    train = check_train_settings(config.train)
    layers = preset(config.preset, **config.model_overrides).num_layers
    dp = parallel.data_parallel(config.world_size)
    parallel.check_schedule(layers, train, dp)


class LauncherDied(RuntimeError):
    """torchrun itself (not a rank) was killed: the pretrain and sft tasks retry on this (Prefect retries)."""


def launcher_died(task, task_run, state) -> bool:
    """Prefect's retry condition of the training tasks: retry (and so resume) when the launcher was killed, not
    when training failed on its own (that has had its restarts) or a setting is wrong."""
    try:
        state.result()
    except LauncherDied:
        return True
    except Exception:
        return False
    return False


# The training tasks' Prefect options: a retry re-runs the task, which resumes its run directory.
TRAINING_TASK_OPTIONS = dict(retries=2, retry_delay_seconds=5, retry_condition_fn=launcher_died)


def run_training(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...] = (),
                 stage: str = "pretrain") -> list[dict]:
    """Run training to completion, streaming rank 0's lines to the log and a progress artifact; returns the
    metrics records.

    A rank that dies, or a step that stalls (no rank makes progress for `step_timeout_s`), ends the attempt;
    the whole group is then started again, up to `max_restarts` times, and resumes from the run's latest
    checkpoint. (Restarts are a fresh torchrun each, on a fresh port: with torchrun's own `--max-restarts` the
    restarted ranks of torch 2.13 could not form a gloo group again, see docs/scaling.md.)"""
    from model.checkpoint import latest_checkpoint
    from model.config import TrainConfig

    log = get_logger()
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = TrainingProgress(stage, config.train.get("steps", TrainConfig.steps))
    watch = StallWatch(run_dir, config.step_timeout_s)
    for attempt in range(config.restarts + 1):
        watch.reset()
        code, output, offset, stalled = launch_once(config, manifest_dir, run_dir, extra, tracker, watch, attempt)
        if code == 0:
            return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        error = stalled or describe_failure(code, output.read_bytes()[offset:].decode(errors="replace"), output)
        if config.launcher == "torchrun" and code < 0 and not stalled:
            raise LauncherDied(f"the torchrun launcher was killed (signal {-code}); ranks' output: {output}")
        # A Python error before any step of this attempt (a setting, a missing file, a shape) would recur.
        stepped = any(beat["done"] for beat in watch.beats())
        if attempt == config.restarts or (error.startswith("training failed on rank") and not stepped):
            raise RuntimeError(error + (f"\n(after {attempt} restart{'s' * (attempt != 1)})" if attempt else ""))
        resume = latest_checkpoint(run_dir)
        progress(f"{stage}: {error.splitlines()[0]}; restarting the group ({attempt + 1} of {config.restarts}) "
                 f"from {resume.name if resume else 'step 0'}")
        log.warning(error)
    raise AssertionError("unreachable")


def launch_once(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...],
                tracker: TrainingProgress, watch: StallWatch, attempt: int) -> tuple[int, Path, int, str | None]:
    """One attempt: (exit code, the ranks' output file, where this attempt's output starts in it, the stall
    that ended it or None)."""
    if config.launcher == "slurm":
        return run_slurm_job(config, manifest_dir, run_dir, extra, tracker, watch)
    cmd = launch_command(config, manifest_dir, run_dir, extra)
    get_logger().info("launching: " + " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // config.ranks)),
           "PYTHONUNBUFFERED": "1"}
    output = run_dir / "ranks.log"
    with open(output, "a") as ranks_log:  # every attempt's output, a retried task's included
        ranks_log.write(f"=== launch attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        ranks_log.flush()
        offset = ranks_log.tell()
        code, stalled = follow_launcher(cmd, env, ranks_log, tracker, watch)
    return code, output, offset, stalled


def describe_failure(code: int, text: str, output: Path) -> str:
    """A failed attempt in a sentence or two: the rank torchrun saw fail first, with its traceback if it printed
    one (a rank killed by a signal prints none; the others then fail on a broken connection)."""
    root = re.search(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", text.split("Root Cause")[-1], re.S) \
        if "Root Cause" in text else None
    if root and int(root[2]) < 0:
        return f"rank {root[1]} died (exit code {root[2]}); training exited with code {code}. " \
               f"All ranks' output: {output}"
    failures = FAILURE.findall(text)
    if failures:
        rank, trace = next((f for f in failures if root and f[0] == root[1]), failures[0])
        trace = trace.split("\n[rank")[0]  # torch's elastic agent repeats it with [rankN]: prefixes
        return f"training failed on rank {rank} (exit code {code}); its traceback:\n{trace.strip()}\n" \
               f"All ranks' output: {output}"
    return f"training exited with code {code}; last output:\n{text[-3000:]}"


class StallWatch:
    """Finds a stalled step from the ranks' heartbeats (model/train.py): when no rank has made progress for
    `timeout` seconds, names the step and the ranks furthest behind. Quiet until the first heartbeat, so
    start-up (imports, loading a checkpoint) is not timed."""

    def __init__(self, run_dir: Path, timeout: float):
        self.dir, self.timeout = run_dir / "heartbeats", timeout

    def reset(self) -> None:
        """Before an attempt: the last attempt's heartbeats would look stalled."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def beats(self) -> list[dict]:
        found = []
        for path in self.dir.glob("rank-*.json"):
            with contextlib.suppress(ValueError, OSError):
                found.append(json.loads(path.read_text()))
        return found

    def check(self) -> str | None:
        beats = self.beats()
        if not beats:
            return None
        idle = time.time() - max(b["time"] for b in beats)
        if idle < self.timeout:
            return None
        behind = min((b["step"], b["done"]) for b in beats)
        ranks = sorted(b["rank"] for b in beats if (b["step"], b["done"]) == behind)
        where = f"after step {behind[0]}" if behind[1] else f"in step {behind[0]}"
        others = len(beats) - len(ranks)
        return (f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))} stalled {where}: no rank made "
                f"progress for {idle:.0f} s (step_timeout_s {self.timeout:g})"
                + (f"; {others} other rank{'s wait' if others > 1 else ' waits'} for it further on"
                   if others else ""))


def follow_launcher(cmd: list[str], env: dict, ranks_log, tracker: TrainingProgress,
                    watch: StallWatch) -> tuple[int, str | None]:
    """Run torchrun in a session of its own, streaming its stdout (rank 0's lines) into the log until it exits
    or `watch` finds a stalled step; returns (its exit code, the stall or None). torchrun starts each rank in a
    session of the rank's own, so the sessions of its descendants are noted as they appear; when the launcher
    exits, however it exits (or this process is interrupted), every process left in any of those sessions is
    killed: a rank's orphaned children (checkpoint writers) would otherwise live on, holding the output pipe
    open, and a read-until-end-of-output would wait forever."""
    import psutil

    lines: queue.Queue[str | None] = queue.Queue()
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=ranks_log, text=True, bufsize=1,
                            env=env, start_new_session=True)
    sessions = {proc.pid}

    def read() -> None:
        for line in iter(proc.stdout.readline, ""):
            lines.put(line)
        lines.put(None)  # end of output: every writer is gone

    threading.Thread(target=read, daemon=True, name="launcher-output").start()
    try:
        ended, noted = None, 0.0
        while True:
            if time.monotonic() - noted > 1 and proc.poll() is None:  # once a second, not on every line
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    sessions |= {os.getsid(p.pid) for p in psutil.Process(proc.pid).children(recursive=True)}
                noted = time.monotonic()
                if stalled := watch.check():
                    get_logger().error(f"{stalled}: killing the group")
                    kill_sessions(sessions)  # reaps torchrun too, so its exit code is lost: report a failure
                    proc.wait()
                    return 1, stalled
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                progress(line.rstrip())
                tracker.line(line)
            if proc.poll() is not None:
                # The launcher is gone: take what its ranks printed before it, but wait no longer than a few
                # seconds for an end of output that orphans may never give. Killed itself, it leaves orphan ranks
                # still training: stop them at once.
                ended = ended or time.monotonic()
                if time.monotonic() - ended > 5 or proc.returncode < 0:
                    break
        return proc.wait(), None
    finally:
        kill_sessions(sessions)


def kill_sessions(sessions: set[int]) -> None:
    """SIGKILL every process in these sessions and wait until they are gone; sweep again for any that a dying
    process forked meanwhile."""
    import psutil

    def members() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["status"]):
            try:
                if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) in sessions:
                    found.append(p)
            except (ProcessLookupError, PermissionError):
                continue
        return found

    for _ in range(10):
        left = members()
        if not left:
            return
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=5)
    get_logger().warning(f"processes of the training launch still running after SIGKILL: {members()}")


def run_slurm_job(config: PretrainConfig, manifest_dir: Path, run_dir: Path, extra: tuple[str, ...],
                  tracker: TrainingProgress, watch: StallWatch) -> tuple[int, Path, int, str | None]:
    """Submit the training job with `sbatch --wait` and follow its output file into the log until it ends, or
    cancel it when `watch` finds a stalled step."""
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
                    progress(line.rstrip())
                    tracker.line(line)
                position = f.tell()
        if finished:
            return proc.returncode, output, 0, None
        if stalled := watch.check():
            get_logger().error(f"{stalled}: cancelling Slurm job {job_id}")
            subprocess.run(["scancel", job_id], check=False)
            proc.wait()
            return proc.returncode or 1, output, 0, stalled
        time.sleep(5)

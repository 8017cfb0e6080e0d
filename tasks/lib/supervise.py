"""Supervising a training launch: torchrun in a session of its own (or a Slurm job), rank 0's lines streamed into
the log and a progress artifact, every rank's stderr in `<run_dir>/ranks.log`, a stalled step found from the ranks'
heartbeats, a failed rank turned into an exception quoting its traceback, and the whole group restarted from the
latest checkpoint after a rank dies or stalls."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from model.run_config import RunConfig, TrainJob
from tasks.lib.commands import launch_command, slurm_script
from tasks.lib.slurm import exit_code, wait_for_job
from tasks.lib.log import get_logger, progress
from tasks.spec import PROJECT_ROOT

FAILURE = re.compile(r"^\[rank (\d+)\] training failed:\n(.*?)(?=^\[rank \d+\] training failed:|\Z)", re.M | re.S)


class LauncherDied(RuntimeError):
    """torchrun itself (not a rank) was killed: the pretrain and sft tasks retry on this (Prefect retries, which
    resume the run directory)."""


def run_training(job: TrainJob, run_dir: Path, stage: str = "pretrain",
                 on_line: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Write the run's `train_job.json` and run training to completion, streaming rank 0's lines to the log and to
    `on_line` (the Prefect task's progress artifact); returns the metrics records.

    A rank that dies, or a step that stalls (no rank makes progress for `step_timeout_s`), ends the attempt;
    the whole group is then started again, up to `max_restarts` times, and resumes from the run's latest
    checkpoint. (Restarts are a fresh torchrun each, on a fresh port: with torchrun's own `--max-restarts` the
    restarted ranks of torch 2.13 could not form a gloo group again, see docs/scaling.md.)"""
    from model.checkpoint import latest_checkpoint

    log = get_logger()
    config, launch = job.config, job.config.launch
    job.write(run_dir)
    watch = StallWatch(run_dir, launch.step_timeout_s)
    for attempt in range(launch.restarts + 1):
        watch.reset()
        code, output, offset, stalled = launch_once(config, run_dir, stage, on_line, watch, attempt)
        if code == 0:
            return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        error = stalled or describe_failure(code, output.read_bytes()[offset:].decode(errors="replace"), output)
        if launch.launcher == "torchrun" and code < 0 and not stalled:
            raise LauncherDied(f"the torchrun launcher was killed (signal {-code}); ranks' output: {output}")
        # A Python error before any step of this attempt (a setting, a missing file, a shape) would recur.
        stepped = any(beat["done"] for beat in watch.beats())
        if attempt == launch.restarts or (error.startswith("training failed on rank") and not stepped):
            raise RuntimeError(error + (f"\n(after {attempt} restart{'s' * (attempt != 1)})" if attempt else ""))
        resume = latest_checkpoint(run_dir)
        progress(f"{stage}: {error.splitlines()[0]}; restarting the group ({attempt + 1} of {launch.restarts}) "
                 f"from {resume.name if resume else 'step 0'}")
        log.warning(error)
    raise AssertionError("unreachable")


def launch_once(config: RunConfig, run_dir: Path, stage: str, on_line: Callable[[str], None], watch: StallWatch,
                attempt: int) -> tuple[int, Path, int, str | None]:
    """One attempt: (exit code, the ranks' output file, where this attempt's output starts in it, the stall
    that ended it or None)."""
    if config.launch.launcher == "slurm":
        return run_slurm_job(config, run_dir, stage, on_line, watch)
    cmd = launch_command(config, run_dir)
    get_logger().info("launching: " + " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // config.ranks)),
           "PYTHONUNBUFFERED": "1"}
    output = run_dir / "ranks.log"
    with open(output, "a") as ranks_log:  # every attempt's output, a retried task's included
        ranks_log.write(f"=== launch attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        ranks_log.flush()
        offset = ranks_log.tell()
        code, stalled = follow_launcher(cmd, env, ranks_log, on_line, watch)
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


def follow_launcher(cmd: list[str], env: dict, ranks_log, on_line: Callable[[str], None],
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
                on_line(line)
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


def run_slurm_job(config: RunConfig, run_dir: Path, stage: str, on_line: Callable[[str], None],
                  watch: StallWatch) -> tuple[int, Path, int, str | None]:
    """Submit the training job with sbatch and follow its output file into the log until it has left the queue
    (tasks/lib/slurm.py), or cancel it when `watch` finds a stalled step."""
    log, slurm = get_logger(), config.launch.slurm
    script = run_dir / f"{stage}.sbatch"
    script.write_text(slurm_script(config, run_dir, stage))
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if submitted.returncode != 0:
        raise RuntimeError(f"sbatch refused {script} (exit {submitted.returncode}): {submitted.stderr.strip()}")
    job_id = submitted.stdout.strip().split(";")[0]
    output = run_dir / f"slurm-{job_id}.out"
    log.info(f"submitted Slurm job {job_id} ({config.launch.nnodes} nodes x {config.ranks} ranks): {script}; "
             f"output {output}")
    position, stalled = 0, None

    def follow_and_watch() -> None:
        nonlocal position, stalled
        if output.exists():
            with open(output) as f:
                f.seek(position)
                for line in f:
                    progress(line.rstrip())
                    on_line(line)
                position = f.tell()
        if stalled is None and (stalled := watch.check()):
            log.error(f"{stalled}: cancelling Slurm job {job_id}")
            subprocess.run(["scancel", job_id], check=False)

    wait_for_job(job_id, slurm.poll_seconds, follow_and_watch)
    follow_and_watch()
    return (1 if stalled else exit_code(job_id)), output, 0, stalled

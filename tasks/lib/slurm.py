"""Waiting for a Slurm job: the one way the datatrove executors (tasks/lib/blocks.py) and the training launcher
(tasks/lib/supervise.py) both do it. squeue is asked until the job has left the queue; then scontrol (which keeps
a finished job for a few minutes) or sacct (where accounting is on) says how it ended."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from typing import Callable


def still_queued(job_id: str) -> bool:
    """Whether squeue still lists the job (pending or running). Only squeue's "Invalid job id" (a job purged after
    it ended) means gone; any other failure is an error in squeue's own words."""
    queued = subprocess.run(["squeue", "--noheader", "--format=%i", "--jobs", str(job_id)],
                            capture_output=True, text=True)
    if queued.returncode != 0 and "Invalid job id" not in queued.stderr:
        raise RuntimeError(f"squeue failed (exit {queued.returncode}) while waiting for Slurm job {job_id}: "
                           f"{queued.stderr.strip() or queued.stdout.strip()}")
    return queued.returncode == 0 and bool(queued.stdout.strip())


def wait_for_job(job_id: str, poll_seconds: float, each_poll: Callable[[], None] = lambda: None) -> None:
    """Block until the job has left the queue, calling `each_poll` before each look (to follow its output, or to
    cancel it)."""
    while True:
        each_poll()
        if not still_queued(job_id):
            return
        time.sleep(poll_seconds)


def exit_code(job_id: str) -> int:
    """A finished job's exit code (128 + the signal for a job killed by one)."""
    shown = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True)
    found = re.search(r"\bExitCode=(\d+):(\d+)", shown.stdout)
    if not found and shutil.which("sacct"):
        accounted = subprocess.run(["sacct", "--noheader", "--allocations", "--parsable2", "--format=ExitCode",
                                    "--jobs", str(job_id)], capture_output=True, text=True)
        found = re.match(r"(\d+):(\d+)", accounted.stdout.strip()) if accounted.returncode == 0 else None
    if not found:
        raise RuntimeError(f"Slurm job {job_id} has ended, but neither scontrol nor sacct knows how "
                           f"(scontrol said: {(shown.stdout + shown.stderr).strip() or 'nothing'}); see its output file")
    code, signal = int(found[1]), int(found[2])
    return code or (128 + signal if signal else 0)

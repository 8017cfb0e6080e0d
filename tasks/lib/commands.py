"""The commands that start training: torchrun on this node (one node, or one of several meeting at a c10d
rendezvous), or an sbatch script that runs torchrun on every node. Each runs `python -m model.train` on the run's
`train_job.json` (model/run_config.py), which the launcher writes first: no setting travels as a flag."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from model.distributed import free_port
from model.run_config import JOB_FILE, RunConfig
from tasks.spec import PROJECT_ROOT


def trainer(run_dir: Path) -> list[str]:
    """The trainer's own command line: the module and the run's job file."""
    return ["-m", "model.train", str(run_dir / JOB_FILE)]


def launch_command(config: RunConfig, run_dir: Path) -> list[str]:
    """torchrun for this node: a private loopback rendezvous on one node; c10d across nodes."""
    launch = config.launch
    if launch.nnodes == 1:
        rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    elif not launch.rdzv_endpoint:
        raise ValueError(f"launch.nnodes={launch.nnodes} with the torchrun launcher needs launch.rdzv_endpoint "
                         f"(host:port on the first node, reachable from all), or launch.launcher: slurm")
    else:
        rendezvous = ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank), "--rdzv-backend",
                      "c10d", "--rdzv-endpoint", launch.rdzv_endpoint, "--rdzv-id", run_dir.name]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(config.ranks), *rendezvous,
            *trainer(run_dir)]


TRAINING_JOB_TIME = "48:00:00"  # unless launch.slurm.time says otherwise


def slurm_script(config: RunConfig, run_dir: Path, stage: str) -> str:
    """An sbatch script that starts one torchrun agent per node; the agents meet at a c10d rendezvous on the
    job's first node. Paths are this machine's, so the project must sit on a filesystem every node mounts."""
    launch, slurm = config.launch, config.launch.slurm
    if not slurm.partition:
        raise ValueError("launch.launcher: slurm needs launch.slurm.partition")
    directives = {"job-name": f"{stage}-{run_dir.name}", "nodes": launch.nnodes, "ntasks-per-node": 1,
                  "cpus-per-task": slurm.cpus_per_node, "partition": slurm.partition, "time": slurm.time or TRAINING_JOB_TIME,
                  "output": str(run_dir / "slurm-%j.out"),
                  **({"gpus-per-node": config.ranks} if launch.gpus_required else {}), **slurm.sbatch_args}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "$SLURM_NNODES", "--node-rank",
                "$SLURM_NODEID", "--nproc-per-node", str(config.ranks), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"$RDZV_HOST:{slurm.rdzv_port}", "--rdzv-id", "$SLURM_JOB_ID", *trainer(run_dir)]
    quoted = " ".join(a if a.startswith("$") else shlex.quote(a) for a in torchrun).replace("$RDZV_HOST",
                                                                                           '"$RDZV_HOST"')
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH --{k}={v}" for k, v in directives.items()),
        "set -euo pipefail",
        *([slurm.env_command] if slurm.env_command else []),
        f"cd {shlex.quote(str(PROJECT_ROOT))}",
        # Exported: srun's command is expanded by each node's shell, which sees only the environment.
        'export RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export OMP_NUM_THREADS={max(1, slurm.cpus_per_node // config.ranks)} PYTHONUNBUFFERED=1",
        # srun's $SLURM_NODEID must be expanded on each node, not here: hence the single quotes.
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(quoted)}",
        ""])

"""Launching training beyond one process group: torchrun c10d across nodes, and Slurm job scripts."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from model.config import llama2_7b
from model.memory_plan import recommend
from model.distributed import free_port
from model.run_config import JOB_FILE, RunConfig, TrainJob
from tasks.lib.commands import launch_command, slurm_script

from conftest import FAST, ROOT, fault_drill_env, metrics, tensorboard_scalars


def test_launch_command_per_layout(tmp_path):
    one = launch_command(RunConfig(parallel={"tensor_parallel": 2, "pipeline_parallel": 2}), tmp_path / "run")
    assert one[one.index("--nproc-per-node") + 1] == "4" and one[one.index("--master-addr") + 1] == "127.0.0.1"
    with pytest.raises(ValueError, match="launch.rdzv_endpoint"):
        launch_command(RunConfig(launch={"nnodes": 2}), tmp_path / "run")
    two = launch_command(RunConfig(parallel={"tensor_parallel": 2}, launch={
        "nproc": 8, "nnodes": 2, "node_rank": 1, "rdzv_endpoint": "node0:29400"}), tmp_path / "run")
    flags = dict(zip(two[3:-3:2], two[4:-3:2]))
    assert {k: flags[k] for k in ("--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id")} == {
        "--nnodes": "2", "--node-rank": "1", "--rdzv-backend": "c10d", "--rdzv-endpoint": "node0:29400",
        "--rdzv-id": "run"}
    assert "--master-addr" not in two
    # The trainer gets its job file and nothing else: no setting travels as a flag.
    assert two[-3:] == ["-m", "model.train", str(tmp_path / "run" / JOB_FILE)]


def deployment_runs() -> list[dict]:
    """Every RunConfig that prefect.yaml gives a flow (`run`, and the pipeline's `pretrain` and `sft`)."""
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    return [value for d in deployments for key, value in d["parameters"].items() if key in ("run", "pretrain", "sft")]


def test_every_deployments_run_config_is_what_every_rank_reads(tmp_path):
    """Each `run` of prefect.yaml validates as RunConfig, and the train_job.json the launcher writes for it is read
    back by the trainer as the same config, with every train setting the deployment gave."""
    runs = deployment_runs()
    assert len(runs) >= 10 and any("recompute_activations" in r.get("train", {}) for r in runs)
    for i, given in enumerate(runs):
        config = RunConfig.model_validate(given)
        read = TrainJob.read(TrainJob(config=config, manifest="m").write(tmp_path / str(i))).config
        assert read == config
        assert {k: getattr(read.train, k) for k in given.get("train", {})} == given.get("train", {})


def test_slurm_script_for_7b_on_two_nodes_of_eight_h100(tmp_path):
    """The worked example of docs/scaling.md: the planner's layout for 16 x 80 GiB, as an sbatch script. Run by
    bash on a "node" (scontrol from tests/scripts/fake_slurm, an srun that prints the command as the node's shell
    expands it), it starts torchrun with that node's rank and the first node as the rendezvous host."""
    best, _ = recommend(llama2_7b(), gpus=16, gpu_mem_gib=80, global_batch=256)
    layout = best.layout
    config = RunConfig(preset="7b", parallel={"tensor_parallel": layout.tp, "pipeline_parallel": layout.pp},
                       train={"micro_batch": layout.micro_batch, "recompute_activations": layout.recompute},
                       launch={"nproc": 8, "nnodes": 2, "gpus_required": True, "launcher": "slurm",
                               "slurm": {"partition": "h100", "sbatch_args": {"account": "llm"}}})
    script = slurm_script(config, tmp_path / "run", "pretrain")
    for line in ("#SBATCH --job-name=pretrain-run", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --partition=h100", "#SBATCH --account=llm",
                 f"#SBATCH --output={tmp_path}/run/slurm-%j.out"):
        assert line in script.splitlines(), line

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(ROOT / "tests/scripts/fake_slurm/scontrol", bin_dir / "scontrol")
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\n"
                                  "exec bash -c \"printf '%s\\n' $3\"\n")  # $@ is: bash -c COMMAND
    (bin_dir / "srun").chmod(0o755)
    node = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env={
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
        "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node7,node8"})
    assert node.returncode == 0, node.stderr
    args = node.stdout.split()
    flags = dict(zip(args[3:-3:2], args[4:-3:2]))
    assert flags == {"--nnodes": "2", "--node-rank": "1", "--nproc-per-node": "8", "--rdzv-backend": "c10d",
                     "--rdzv-endpoint": "node7:29500", "--rdzv-id": "77"}
    assert args[-3:] == ["-m", "model.train", str(tmp_path / "run" / JOB_FILE)]
    with pytest.raises(ValueError, match="launch.slurm.partition"):
        slurm_script(config.replace(launch={"launcher": "slurm"}), tmp_path, "pretrain")


@pytest.mark.slow
def test_a_slurm_launch_trains_follows_its_output_and_reads_its_exit_code(tiny_manifest, tp1_run, tmp_path,
                                                                         monkeypatch):
    """launch.launcher: slurm through stand-ins for sbatch, srun, squeue and scontrol (tests/scripts/fake_slurm)
    that run the job at once on this machine: the sbatch script trains as torchrun does, its output file reaches
    `on_line`, and the wait (tasks/lib/slurm.py, the data executors' too) reads the job's exit code: a job that fails
    is a failed attempt."""
    from tasks.lib.supervise import run_training

    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", f"{ROOT / 'tests/scripts/fake_slurm'}:{os.environ['PATH']}")
    config = RunConfig(train=FAST, launch={"launcher": "slurm", "max_restarts": 0, "slurm": {
        "partition": "cpu", "poll_seconds": 0.1, "cpus_per_node": 2, "rdzv_port": free_port()}})
    lines = []
    records = run_training(TrainJob(config=config, manifest=str(tiny_manifest)), tmp_path / "run", "pretrain",
                           lines.append)
    assert [r["loss"] for r in records] == [r["loss"] for r in tp1_run.metrics()]
    assert any("checkpoint: step 6" in line for line in lines)
    assert "#SBATCH --time=48:00:00" in (tmp_path / "run" / "pretrain.sbatch").read_text()

    with pytest.raises(RuntimeError, match=r"(?s)training failed on rank 0 \(exit code 1\).*No such file"):
        run_training(TrainJob(config=config, manifest=str(tmp_path / "missing")), tmp_path / "failing")


@pytest.mark.slow
def test_two_nodes_over_loopback_train_like_one(tiny_manifest, tp2_run, tmp_path):
    """Two torchrun agents (node ranks 0 and 1, one rank each) meet at a c10d rendezvous and train TP=2 with the
    same losses as one agent running both ranks (the shared tp2_run)."""
    endpoint = f"127.0.0.1:{free_port()}"
    agents = []
    for node in (0, 1):
        config = RunConfig(parallel={"tensor_parallel": 2}, train=FAST, launch={
            "nproc": 1, "nnodes": 2, "node_rank": node, "rdzv_endpoint": endpoint})
        TrainJob(config=config, manifest=str(tiny_manifest)).write(tmp_path / "two")
        cmd = launch_command(config, tmp_path / "two")
        agents.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "TP 2 x PP 1 x DP 1" in "".join(outputs)
    one, two = tp2_run.metrics(), metrics(tmp_path / "two")
    assert [r["loss"] for r in two] == [r["loss"] for r in one]
    assert [r["val_loss"] for r in two if "val_loss" in r] == [r["val_loss"] for r in one if "val_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_a_rank_that_dies_or_stalls_restarts_the_group_and_the_run_ends_as_if_uninterrupted(
        fault, tiny_manifest, tp2_run, tmp_path, monkeypatch, caplog):
    """Rank 1 of a TP-2 run SIGKILLs itself after step 4, or sleeps there past step_timeout_s (the fault drill,
    installed from tests/fault_drill); the checkpoint is at step 3. The launch restarts the group, which resumes from
    step 3, and the run ends with the uninterrupted run's losses, one continuous curve."""
    import time

    import psutil

    from tasks.lib.supervise import run_training

    for name, value in fault_drill_env(f"{fault}:1:4").items():
        monkeypatch.setenv(name, value)
    caplog.set_level("INFO", logger="llm_pipeline")
    run_dir = tmp_path / "run"
    started = time.monotonic()
    config = RunConfig(parallel={"tensor_parallel": 2}, train=FAST, launch={"max_restarts": 1, "step_timeout_s": 8})
    records = run_training(TrainJob(config=config, manifest=str(tiny_manifest)), run_dir)
    print(f"{fault}: finished in {time.monotonic() - started:.1f} s; final loss {records[-1]['loss']:.6f} "
          f"(uninterrupted {tp2_run.metrics()[-1]['loss']:.6f})")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == [r["loss"] for r in tp2_run.metrics()]
    assert [r.get("val_loss") for r in records] == [r.get("val_loss") for r in tp2_run.metrics()]
    log = (run_dir / "ranks.log").read_text()
    assert log.count("=== launch attempt") == 2 and f"fault drill: {fault} after step 4" in log
    left = [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert not left, left  # no rank, checkpoint writer or launcher of either attempt outlives the launch
    said = {"kill": "rank 1 died (exit code -9)", "stall": "rank 1 stalled after step 4: no rank made progress"}
    assert any(said[fault] in m and "restarting the group (1 of 1) from step-000003" in m for m in caplog.messages)
    assert [s for s, _ in tensorboard_scalars(run_dir, "train/loss")] == [1, 2, 3, 4, 5, 6]

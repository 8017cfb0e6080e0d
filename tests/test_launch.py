"""Launching training beyond one process group: torchrun c10d across nodes, and Slurm job scripts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from model.config import TrainConfig, llama2_7b
from model.plan import recommend
from model.distributed import free_port
from tasks.lib.launch import PretrainConfig, SlurmLaunch, launch_command, slurm_script, train_args

from conftest import FAST, ROOT, metrics, tensorboard_scalars


def test_launch_command_per_layout(tmp_path):
    one = launch_command(PretrainConfig(tp=2, pp=2), Path("m"), tmp_path / "run")
    assert one[one.index("--nproc-per-node") + 1] == "4" and one[one.index("--master-addr") + 1] == "127.0.0.1"
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        launch_command(PretrainConfig(nnodes=2), Path("m"), tmp_path / "run")
    two = launch_command(PretrainConfig(tp=2, nproc=8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29400"),
                         Path("m"), tmp_path / "run")
    flags = dict(zip(two[3:-1:2], two[4::2]))
    assert {k: flags[k] for k in ("--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id")} == {
        "--nnodes": "2", "--node-rank": "1", "--rdzv-backend": "c10d", "--rdzv-endpoint": "node0:29400",
        "--rdzv-id": "run"}
    assert "--master-addr" not in two


def test_every_deployments_train_settings_reach_model_train():
    """Each `train` dict of prefect.yaml becomes model.train flags that its own parser reads back as the same
    TrainConfig values (booleans included: `--no-recompute-activations`, not `--recompute-activations=False`)."""
    from model.train import parse_args

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    train_dicts = [value for d in deployments for key, value in d["parameters"].items()
                   if key in ("train", "pretrain_train", "sft_train") and value]
    train_dicts.append({"precision": "bf16", "distributed_optimizer": True, "overlap_param_gather": False,
                        "grad_reduce_dtype": "bf16"})
    assert any("recompute_activations" in t for t in train_dicts)
    for train in train_dicts:
        args = parse_args(train_args(PretrainConfig(train=train), Path("m"), Path("run"))[2:])
        assert {k: getattr(args, k) for k in train} == train
        TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})


def test_slurm_script_for_7b_on_two_nodes_of_eight_h100(tmp_path):
    """The worked example of docs/scaling.md: the planner's layout for 16 x 80 GiB, as an sbatch script."""
    best, _ = recommend(llama2_7b(), gpus=16, gpu_mem_gib=80, global_batch=256)
    layout = best.layout
    config = PretrainConfig(preset="7b", tp=layout.tp, pp=layout.pp, nproc=8, nnodes=2, gpus_required=True,
                            launcher="slurm", train={"micro_batch": layout.micro_batch,
                                                     "recompute_activations": layout.recompute},
                            slurm=SlurmLaunch(partition="h100", sbatch_args={"account": "llm"}))
    script = slurm_script(config, Path("/shared/artifacts/shard/abc"), tmp_path / "run")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=h100", "#SBATCH --account=llm", f"#SBATCH --output={tmp_path}/run/slurm-%j.out"):
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    for part in ("--nnodes $SLURM_NNODES", "--node-rank $SLURM_NODEID", "--nproc-per-node 8", "--rdzv-backend c10d",
                 '--rdzv-endpoint "$head":29500', "--rdzv-id $SLURM_JOB_ID", f"--tp {layout.tp}",
                 "--preset 7b", f"--micro-batch={layout.micro_batch}"):
        assert part in srun, part
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell
    with pytest.raises(ValueError, match="partition"):
        slurm_script(config.model_copy(update={"slurm": SlurmLaunch()}), Path("m"), tmp_path)


@pytest.mark.slow
def test_two_nodes_over_loopback_train_like_one(tiny_manifest, tp2_run, tmp_path):
    """Two torchrun agents (node ranks 0 and 1, one rank each) meet at a c10d rendezvous and train TP=2 with the
    same losses as one agent running both ranks (the shared tp2_run)."""
    endpoint = f"127.0.0.1:{free_port()}"
    agents = []
    for node in (0, 1):
        config = PretrainConfig(tp=2, nproc=1, nnodes=2, node_rank=node, rdzv_endpoint=endpoint)
        cmd = launch_command(config, tiny_manifest, tmp_path / "two")
        cmd = cmd[:cmd.index("--manifest")] + ["--manifest", str(tiny_manifest), "--run-dir", str(tmp_path / "two"),
                                                "--tp", "2", *FAST]
        agents.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "TP 2 x PP 1 x DP 1" in "".join(outputs)
    one, two = tp2_run.metrics(), metrics(tmp_path / "two")
    assert [r["loss"] for r in two] == [r["loss"] for r in one]
    assert [r["val_loss"] for r in two if "val_loss" in r] == [r["val_loss"] for r in one if "val_loss" in r]


# FAST as the launcher's train settings, for runs that must match the tp2_run fixture step for step.
FAST_TRAIN = {"steps": 6, "warmup_steps": 1, "global_batch": 8, "micro_batch": 2, "log_every": 1, "eval_every": 3,
              "eval_batches": 4, "save_every": 3, "lr": 3e-3}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_a_rank_that_dies_or_stalls_restarts_the_group_and_the_run_ends_as_if_uninterrupted(
        fault, tiny_manifest, tp2_run, tmp_path, monkeypatch, caplog):
    """Rank 1 of a TP-2 run SIGKILLs itself after step 4, or sleeps there past step_timeout_s (model/train.py's
    fault drill); the checkpoint is at step 3. The launch restarts the group, which resumes from step 3, and the
    run ends with the uninterrupted run's losses, one continuous curve."""
    import time

    import psutil

    from tasks.lib.launch import run_training

    monkeypatch.setenv("TRAIN_FAULT", f"{fault}:1:4")
    caplog.set_level("INFO", logger="llm_pipeline")
    run_dir = tmp_path / "run"
    started = time.monotonic()
    records = run_training(PretrainConfig(tp=2, max_restarts=1, step_timeout_s=8, train=FAST_TRAIN), tiny_manifest,
                           run_dir)
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

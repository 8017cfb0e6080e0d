"""Megatron-Core on CPU: real tensor/pipeline-parallel training through gloo ranks under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from model.config import TrainConfig, llama2_7b, tiny

from conftest import ROOT, gradient_reduction, launch_cmd, metrics, tensorboard_scalars, torchrun, train, write_job


def test_7b_preset_has_llama2_parameter_count():
    assert llama2_7b().num_parameters() == pytest.approx(6.74e9, rel=0.002)
    assert tiny().num_parameters() < 5e6


def test_7b_builds_on_meta_device_with_matching_count():
    """Megatron's own GPTModel, built on the meta device (no memory), has exactly the preset's parameters."""
    script = ROOT / "tests" / "scripts" / "count_params.py"
    out = subprocess.run([sys.executable, str(script), "7b"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counted = json.loads(out.stdout.strip().splitlines()[-1])
    assert counted["megatron"] == counted["formula"] == llama2_7b().num_parameters()


def test_bad_train_config_says_what_to_change():
    with pytest.raises(ValueError, match=r"warmup_steps \(50\) must be below steps \(10\)"):
        TrainConfig(steps=10, warmup_steps=50)
    with pytest.raises(ValueError, match="global_batch .* multiple of micro_batch"):
        TrainConfig(global_batch=10, micro_batch=4)
    with pytest.raises(ValueError, match="grad_reduce_dtype bf16 needs bf16 parameters; set precision bf16"):
        TrainConfig(grad_reduce_dtype="bf16").for_device(gpu=False)
    with pytest.raises(ValueError, match="overlap_param_gather needs distributed_optimizer"):
        TrainConfig(overlap_param_gather=True).for_device(gpu=False)


def test_precision_and_communication_settings_default_by_device():
    names = ("precision", "distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather")
    assert [getattr(TrainConfig().for_device(gpu=True), n) for n in names] == ["bf16", True, True, True]
    assert [getattr(TrainConfig().for_device(gpu=False), n) for n in names] == ["fp32", False, False, False]
    # Explicit settings win on either device; the parameter-gather overlap follows the distributed optimizer.
    assert TrainConfig(precision="bf16", distributed_optimizer=True).for_device(gpu=False).precision == "bf16"
    gpu_without_distopt = TrainConfig(distributed_optimizer=False).for_device(gpu=True)
    assert (gpu_without_distopt.precision, gpu_without_distopt.overlap_param_gather) == ("bf16", False)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_layouts_train(tiny_manifest, tp2_run, tmp_path, tp, pp):
    if (tp, pp) == (2, 1):  # the session's shared TP-2 run
        stdout, run_dir = tp2_run.stdout, tp2_run.dir
    else:
        parallel = {"tensor_parallel": tp, "pipeline_parallel": pp}
        stdout, run_dir = train(tp * pp, tmp_path, tiny_manifest, parallel=parallel).stdout, tmp_path
    assert f"TP {tp} x PP {pp} x DP 1" in stdout
    m = metrics(run_dir)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    assert m[-1]["loss"] < m[0]["loss"] - 0.3  # it learns
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000006"


@pytest.mark.slow
def test_same_weights_same_loss_at_tp1_tp2_and_pp2(tp1_run, tp1_evaluations):
    """Trained at TP=1, that checkpoint evaluated resharded to TP=2 and to PP=2: identical validation loss."""
    reference = tp1_run.metrics()[-1]["val_loss"]
    for layout in ("tp2", "pp2"):
        result = tp1_evaluations[layout, "sdpa", "pretrain"]
        assert result["step"] == 6 and result["layout"]["tp" if layout == "tp2" else "pp"] == 2
        assert abs(result["val_loss"] - reference) < 1e-5, (layout, result["val_loss"], reference)


def kill_after_step_4(nproc: int, job: Path) -> None:
    """Run training until step 4 has run (checkpoint at 3, none since), then SIGKILL the launcher and every rank,
    like a crash. torchrun puts ranks in their own process groups, so killing the launcher's group is not enough."""
    run_dir = job.parent
    cmd = launch_cmd(nproc, str(job))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in iter(proc.stdout.readline, ""):  # readline, not iteration: no read-ahead buffering
        if line.startswith("step=4/"):
            ranks = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            for p in ranks:
                p.kill()
            psutil.wait_procs(ranks, timeout=30)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000003"


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_uninterrupted_losses(tiny_manifest, tp2_run, tmp_path):
    run_dir = tmp_path / "killed"
    job = write_job(run_dir, tiny_manifest, parallel={"tensor_parallel": 2})  # as the uninterrupted tp2_run
    expected = tp2_run.metrics()

    kill_after_step_4(2, job)
    assert [s for s, _ in tensorboard_scalars(run_dir, "train/loss")] == [1, 2, 3, 4]  # step 4: after the checkpoint

    resumed = torchrun(2, str(job))
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    got = metrics(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, got):
        for key in ("loss", "lr", "grad_norm", "val_loss"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))

    # TensorBoard: the killed run logged step 4 before dying, the resumed run logged 4-6 again; the curve has each
    # step once, with the resumed run's values (float32 in the event file).
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("val/loss", "val_loss")):
        logged = tensorboard_scalars(run_dir, tag)
        assert [step for step, _ in logged] == [r["step"] for r in got if r.get(key) is not None], tag
        assert [v for _, v in logged] == pytest.approx([r[key] for r in got if r.get(key) is not None], rel=1e-6)
    assert [s for s, _ in tensorboard_scalars(run_dir, "perf/tokens_per_s")] == [1, 2, 3, 4, 5, 6]
    # The input pipeline reads ahead: the share of step time spent waiting for data is logged at each log step.
    assert all(0 <= r["data_wait"] < 0.5 for r in got) and all("data_wait=" in line for line in
                                                               resumed.stdout.splitlines() if line.startswith("step="))


# What a GPU run turns on by default (TrainConfig.for_device), asked for explicitly so that gloo ranks run it.
GPU_SETTINGS = {"precision": "bf16", "distributed_optimizer": True, "overlap_grad_reduce": True,
                "overlap_param_gather": True, "grad_reduce_dtype": "bf16"}


@pytest.mark.slow
def test_gpu_settings_on_two_data_parallel_ranks(tiny_manifest, tp1_run, tmp_path):
    """DP=2 with bf16, the distributed optimizer, both overlaps and bf16 gradient reduction trains like fp32 at
    DP=1 (same global batch; within 2e-3 of loss, about 20x what bf16 rounding gave here, while unaveraged
    gradients were 0.06 off by step 6). A SIGKILL and resume continues bit for bit, and its step-3 checkpoint
    resumes at DP=1 where the DP=2 run went on."""
    reference = tp1_run.metrics()  # fp32 at DP 1

    proc = train(2, tmp_path / "straight", tiny_manifest, train=GPU_SETTINGS)
    assert "TP 1 x PP 1 x DP 2" in proc.stdout
    assert "bf16, gradients reduced in bf16, distributed optimizer, overlap grad reduce, overlap param gather" \
        in proc.stdout
    # bf16 reduction: 2 B per parameter (half of fp32's 4, tests/test_precision.py), reduce-scattered: (DP-1)/DP.
    size, dtype, sent = gradient_reduction(proc.stdout)
    assert dtype == "bfloat16" and size == pytest.approx(2 * tiny(vocab_size=1024).num_parameters() / 2**20,
                                                         rel=0.02) and sent == pytest.approx(size / 2, abs=0.01)
    straight = metrics(tmp_path / "straight")
    for key in ("loss", "val_loss"):
        assert [r.get(key) for r in straight] == pytest.approx([r.get(key) for r in reference], abs=2e-3), key
    assert [r["loss"] for r in straight] != [r["loss"] for r in reference]  # bf16 did round

    killed = write_job(tmp_path / "killed", tiny_manifest, train=GPU_SETTINGS)
    kill_after_step_4(2, killed)
    torchrun(2, str(killed))
    for a, b in zip(straight, metrics(tmp_path / "killed"), strict=True):
        for key in ("loss", "lr", "grad_norm", "val_loss"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))

    resumed = tmp_path / "dp2-then-dp1"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003")
    (resumed / "checkpoints" / "latest").write_text("step-000003")
    proc = train(1, resumed, tiny_manifest, train=GPU_SETTINGS)
    assert "DP 1" in proc.stdout and "at step 3" in proc.stdout
    after = metrics(resumed)
    assert [r["step"] for r in after] == [4, 5, 6]
    for key in ("loss", "val_loss"):
        assert [r.get(key) for r in after] == pytest.approx([r.get(key) for r in straight[3:]], abs=1e-3), key


def test_prefetched_batches_are_the_batches_in_order(tiny_manifest):
    """The background reader hands out exactly what a direct read gives, step after step, after a jump (as on
    resume) and when the next step was not announced; a batch read ahead costs the step no wait, one that was not
    costs the read (each read here takes at least 0.2 s)."""
    import time

    import torch

    from model.data import BatchPrefetcher, TrainSamples

    direct, slow = TrainSamples(tiny_manifest, seed=3), TrainSamples(tiny_manifest, seed=3)
    read = slow.batch
    slow.batch = lambda start, count: time.sleep(0.2) or read(start, count)
    prefetch = BatchPrefetcher(slow)
    try:
        # (this step's first sample, the next step's as announced); 24 announces 32 but 200 comes (a resume).
        steps = [(0, 8), (8, 16), (16, 24), (24, 32), (200, 208), (208, 216), (216, None)]
        for start, following in steps:
            announced = prefetch.pending is not None and prefetch.pending[0] == (start, 8)
            if prefetch.pending is not None:
                prefetch.pending[1].result()  # the step's compute outlasted the read ahead
            got, waited = prefetch.get(start, 8, following)
            want = direct.batch(start, 8)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), start
            assert waited < 0.1 if announced else waited >= 0.2, (start, announced, waited)
    finally:
        prefetch.close()

"""Precision as one setting (`TrainConfig.precision`): fp16 with Megatron's dynamic loss scaler on 2 gloo ranks
(tracking fp32, skipping overflowing steps, resuming with the scaler's state), fp8 refused without Transformer
Engine, and the older `bf16` switch as an alias."""

from __future__ import annotations

import shutil
import time

import pytest

from model.config import TrainConfig, tiny
from model.run_config import RunConfig
from tasks.lib.preflight import preflight

from conftest import gradient_reduction, metrics, tensorboard_scalars, train

STEPS = {"steps": 8, "eval_every": 4, "eval_batches": 2, "save_every": 4}  # on top of conftest's FAST
PARAMETERS = tiny(vocab_size=1024).num_parameters()  # the tests' vocabulary of 1000, padded to 1024
# A scale that grows after 2 clean steps, so overflows, skipped steps and halvings happen within 8 steps.
DYNAMIC = {"precision": "fp16", "initial_loss_scale": 2**20, "loss_scale_window": 2}


@pytest.fixture(scope="module")
def fp16_run(tiny_manifest, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fp16")
    proc = train(2, run_dir, tiny_manifest, train={**STEPS, **DYNAMIC})
    return run_dir, proc.stdout


def test_fp16_tracks_fp32_at_dp2(tiny_manifest, tmp_path):
    """With a loss scale that never overflows here, fp16 losses stay within 0.01 of fp32's (both DP 2)."""
    runs, logs = {}, {}
    for precision, extra in (("fp32", {}), ("fp16", {"initial_loss_scale": 1024})):
        logs[precision] = train(2, tmp_path / precision, tiny_manifest,
                                train={**STEPS, "precision": precision, **extra}).stdout
        runs[precision] = metrics(tmp_path / precision)
    # Both reduce gradients in fp32 (fp16 parameters too): 4 B per parameter, all-reduced (2 x (DP-1)/DP = 1 x).
    for log in logs.values():
        size, dtype, sent = gradient_reduction(log)
        assert dtype == "float32" and size == pytest.approx(4 * PARAMETERS / 2**20, rel=0.02) and sent == size
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(runs["fp16"], runs["fp32"])]
    print(f"fp16 vs fp32 losses: max |difference| {max(gaps):.2e} over {len(gaps)} steps")
    assert len(gaps) == 8 and max(gaps) < 0.01
    assert not any(r["skipped"] for r in runs["fp16"]) and runs["fp16"][-1]["loss"] < runs["fp16"][0]["loss"] - 0.3


def test_an_overflowing_step_is_skipped_and_the_scale_halves(fp16_run):
    run_dir, stdout = fp16_run
    records = metrics(run_dir)
    skipped = [r["step"] for r in records if r["skipped"]]
    assert skipped and len(skipped) < len(records)  # some steps overflowed, training went on
    # A skipped step updates nothing, and the LR schedule waits for it (as Megatron-LM's loop does).
    assert all(after["lr"] == before["lr"] for before, after in zip(records, records[1:]) if after["skipped"])
    # Megatron's scaler: hysteresis 2, so the second overflow in a row halves the scale, and so does each after it.
    scales = [r["loss_scale"] for r in records]
    halvings = [i for i in range(1, len(records)) if scales[i] == scales[i - 1] / 2]
    assert halvings and all(records[i - 1]["skipped"] for i in halvings)
    assert records[-1]["skipped_steps"] == len(skipped)  # counted and shown, not hidden
    assert f"skipped_steps={len(skipped)}" in stdout
    assert [v for _, v in tensorboard_scalars(run_dir, "train/loss_scale")] == scales


def test_fp16_resume_is_exact_with_the_scalers_state(fp16_run, tiny_manifest, tmp_path):
    """A run resumed from the step-4 checkpoint (scale, growth and hysteresis trackers saved with the
    optimizer) repeats the uninterrupted run's steps 5-8 exactly: losses, scales and skips."""
    run_dir, _ = fp16_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004")
    (resumed / "checkpoints" / "latest").write_text("step-000004")
    train(2, resumed, tiny_manifest, train={**STEPS, **DYNAMIC})
    keys = ("step", "loss", "lr", "loss_scale", "skipped", "skipped_steps", "val_loss")
    original = [{k: r.get(k) for k in keys} for r in metrics(run_dir)[4:]]
    assert [{k: r.get(k) for k in keys} for r in metrics(resumed)] == original
    assert len({r["loss_scale"] for r in original}) > 1  # the scale moved after the checkpoint


def test_fp8_without_transformer_engine_is_refused_in_seconds():
    started = time.perf_counter()
    with pytest.raises(ValueError, match="precision fp8 needs a GPU with fp8 tensor cores .* Set precision bf16"):
        preflight(RunConfig(train={"precision": "fp8"}))
    assert time.perf_counter() - started < 5


def test_precision_settings_say_what_to_change():
    assert TrainConfig().for_device(gpu=True).precision == "bf16"
    assert TrainConfig().for_device(gpu=False).precision == "fp32"
    with pytest.raises(ValueError, match="precision 'fp4' must be one of fp32, bf16, fp16, fp8"):
        TrainConfig(precision="fp4")
    with pytest.raises(ValueError, match="bf16"):  # the older switch, an alias of precision, is gone
        TrainConfig(bf16=True)
    with pytest.raises(ValueError, match="fp8_recipe 'mxfp8' must be one of delayed, tensorwise"):
        TrainConfig(fp8_recipe="mxfp8")
    with pytest.raises(ValueError, match="grad_reduce_dtype bf16 needs bf16 parameters; set precision bf16"):
        TrainConfig(precision="fp16", grad_reduce_dtype="bf16")

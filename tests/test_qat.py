"""Quantization-aware training (model/qat.py) of the tiny model on gloo ranks: it trains on the grid that
post-training quantization deploys (bit for bit), at TP 1, TP 2 and PP 2, evaluates alike at each, and resumes
exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from model.config import ParallelConfig, TrainConfig, tiny

from conftest import ROOT, eval_checkpoint, eval_lines, metrics, train, write_job

QAT = {"qat": "int4-g32"}
FFN_384 = {"ffn_hidden_size": 384}  # FC2's input split over 2 TP ranks is 192: groups of 32 tile it (352 would not)


@pytest.fixture(scope="module")
def qat_runs(tiny_manifest, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qat")
    runs = {}
    for name, parallel in (("tp1", {}), ("tp2", {"tensor_parallel": 2}), ("pp2", {"pipeline_parallel": 2})):
        nproc = max(parallel.values(), default=1)
        stdout = train(nproc, root / name, tiny_manifest, train=QAT, model_overrides=FFN_384,
                       parallel=parallel).stdout
        runs[name] = (root / name, stdout)
    return runs


@pytest.mark.slow
def test_qat_trains_at_tp1_tp2_and_pp2_and_resumes_exactly(qat_runs, tiny_manifest, tmp_path):
    losses = {name: [r["loss"] for r in metrics(run_dir)] for name, (run_dir, _) in qat_runs.items()}
    for name, (_, stdout) in qat_runs.items():
        assert "quantization-aware training on the int4-g32 grid" in stdout, name
        assert losses[name][-1] < losses[name][0] - 0.3, name  # it learns through the fake-quantized weights
    # TP 2 starts from the same weights (Megatron initialises the whole matrix, then splits it) on the same grid:
    # the first step's loss is the same to the bit. After it, TP's reductions sum in another order, and a weight
    # that moves by one ulp across a rounding boundary of the grid moves by a whole grid step: the curves part by
    # about 4e-4 in 6 steps (without QAT they stay equal). PP 2 initialises each stage from its own seed.
    assert losses["tp2"][0] == losses["tp1"][0]
    assert losses["tp2"] == pytest.approx(losses["tp1"], abs=2e-3)
    # The TP-2 run's step-3 checkpoint, resumed: steps 4-6 exactly as the uninterrupted run had them.
    resumed = tmp_path / "resumed"
    shutil.copytree(qat_runs["tp2"][0] / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003")
    (resumed / "checkpoints" / "latest").write_text("step-000003")
    train(2, resumed, tiny_manifest, train=QAT, model_overrides=FFN_384, parallel={"tensor_parallel": 2})
    assert [r["loss"] for r in metrics(resumed)] == losses["tp2"][3:]


@pytest.mark.slow
def test_the_grid_qat_trains_on_is_the_grid_ptq_deploys(qat_runs, tmp_path):
    """The TP-1 run's last checkpoint, exported and quantized with the same scheme: every quantized weight equals
    the QAT forward's fake-quantized weight bit for bit, and the two models' logits agree."""
    checkpoint = qat_runs["tp1"][0] / "checkpoints" / "step-000006"
    for cmd in (["-m", "model.export_hf", str(checkpoint), str(tmp_path / "hf")],
                ["-m", "model.quantize", str(tmp_path / "hf"), str(tmp_path / "int4"), "--scheme", "int4-g32"],
                ["tests/scripts/qat_grid.py", str(checkpoint), str(tmp_path / "int4"), "int4-g32"]):
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    grid = json.loads(done.stdout.strip().splitlines()[-1])
    assert grid["layers"] == 2 * 4 and len(grid["equal"]) == 2 * 7 and all(grid["equal"].values()), grid
    # The QAT forward is the deployed model (the same kernels on both sides); the unquantized one is not.
    assert grid["qat_vs_ptq"] < 1e-4 < grid["plain_vs_ptq"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [{"tensor_parallel": 2}, {"pipeline_parallel": 2}], ids=["tp2", "pp2"])
def test_a_qat_checkpoint_evaluates_alike_resharded(qat_runs, tiny_manifest, parallel, tmp_path):
    """The same weights on the same grid: the TP-1 run's last checkpoint evaluated at TP 2 (each rank quantizing
    its own shard of the row-parallel layers) and at PP 2 gives the TP-1 validation loss."""
    job = write_job(tmp_path, tiny_manifest, train=QAT, model_overrides=FFN_384, parallel=parallel)
    (result,) = eval_lines(eval_checkpoint(2, job, qat_runs["tp1"][0] / "checkpoints" / "step-000006").stdout)
    assert result["step"] == 6
    assert abs(result["val_loss"] - metrics(qat_runs["tp1"][0])[-1]["val_loss"]) < 1e-5


@pytest.mark.parametrize("qat, parallel, message", [
    ("int4-g32", {"tensor_parallel": 2}, "qat int4-g32: groups of 32 weights do not tile mlp.linear_fc2's input "
                                         "of 176 on each of 2 tensor-parallel rank(s)"),
    ("int4-g128", {}, "qat int4-g128: groups of 128 weights do not tile mlp.linear_fc2's input of 352"),
])
def test_a_group_that_does_not_tile_a_shard_is_refused_before_launch(qat, parallel, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelConfig(**parallel).check_schedule(tiny(), TrainConfig(qat=qat), data_parallel=1)


def test_an_unknown_qat_scheme_names_the_setting_and_the_choices():
    with pytest.raises(ValueError, match="qat 'int3' must be one of int8, int4-g32, int4-g64, int4-g128"):
        TrainConfig(qat="int3")
    with pytest.raises(ValueError, match="qat 'int4-g128-cuda' must be one of"):
        TrainConfig(qat="int4-g128-cuda")

"""Sequence parallelism (`ParallelConfig.sequence_parallel`, on by default at TP > 1) on 2 gloo ranks: the same
training as TP 2 without it, and checkpoints that load either way."""

from __future__ import annotations

import shutil

import pytest

from model.config import ParallelConfig

from conftest import FAST, metrics, torchrun


def test_sequence_parallel_trains_like_plain_tp2_and_its_checkpoint_resumes_without_it(tiny_manifest, tp2_run,
                                                                                       tmp_path):
    assert "TP 2 x PP 1 x DP 1 (sequence parallel)" in tp2_run.stdout  # the default at TP 2
    common = ["--manifest", str(tiny_manifest), "--tp", "2", *FAST, "--no-sequence-parallel"]
    proc = torchrun(2, *common, "--run-dir", str(tmp_path / "plain"))
    assert "(sequence parallel)" not in proc.stdout
    with_sp, without = tp2_run.metrics(), metrics(tmp_path / "plain")
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r.get(key) for r in with_sp] == pytest.approx([r.get(key) for r in without], abs=1e-5), key

    # The step-3 checkpoint of the sequence-parallel run, resumed without it: steps 4-6 as the SP run had them.
    resumed = tmp_path / "resumed"
    shutil.copytree(tp2_run.checkpoint.parent / "step-000003", resumed / "checkpoints" / "step-000003")
    (resumed / "checkpoints" / "latest").write_text("step-000003")
    torchrun(2, *common, "--run-dir", str(resumed))
    for key in ("loss", "val_loss"):
        assert [r.get(key) for r in metrics(resumed)] == pytest.approx([r.get(key) for r in with_sp[3:]],
                                                                        abs=1e-5), key


def test_sequence_parallel_without_tensor_parallel_is_refused():
    with pytest.raises(ValueError, match="sequence_parallel needs tensor_parallel > 1"):
        ParallelConfig(1, 2, sequence_parallel=True)
    assert not ParallelConfig(1, 2).uses_sequence_parallel and ParallelConfig(2, 1).uses_sequence_parallel

"""The rest of Megatron's parallelism on 2 gloo ranks: sequence parallelism (`ParallelConfig.sequence_parallel`, on by
default at TP > 1) trains as plain TP 2 does, and the interleaved pipeline schedule (`virtual_pipeline`) as PP 1
does; checkpoints load either way, and bad combinations are refused before launch."""

from __future__ import annotations

import json
import shutil

import pytest

from model.config import ParallelConfig
from model.run_config import RunConfig
from tasks.lib.preflight import preflight

from conftest import eval_checkpoint, eval_lines, metrics, torchrun, train, write_job


def test_sequence_parallel_trains_like_plain_tp2_and_its_checkpoint_resumes_without_it(tiny_manifest, tp2_run,
                                                                                       tmp_path):
    assert "TP 2 x PP 1 x DP 1 (sequence parallel)" in tp2_run.stdout  # the default at TP 2
    plain = {"tensor_parallel": 2, "sequence_parallel": False}
    proc = train(2, tmp_path / "plain", tiny_manifest, parallel=plain)
    assert "(sequence parallel)" not in proc.stdout
    with_sp, without = tp2_run.metrics(), metrics(tmp_path / "plain")
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r.get(key) for r in with_sp] == pytest.approx([r.get(key) for r in without], abs=1e-5), key

    # The step-3 checkpoint of the sequence-parallel run, resumed without it: steps 4-6 as the SP run had them.
    resumed = tmp_path / "resumed"
    shutil.copytree(tp2_run.checkpoint.parent / "step-000003", resumed / "checkpoints" / "step-000003")
    (resumed / "checkpoints" / "latest").write_text("step-000003")
    train(2, resumed, tiny_manifest, parallel=plain)
    for key in ("loss", "val_loss"):
        assert [r.get(key) for r in metrics(resumed)] == pytest.approx([r.get(key) for r in with_sp[3:]],
                                                                        abs=1e-5), key


def test_sequence_parallel_without_tensor_parallel_is_refused():
    with pytest.raises(ValueError, match="sequence_parallel needs tensor_parallel > 1"):
        ParallelConfig(1, 2, sequence_parallel=True)
    assert not ParallelConfig(1, 2).uses_sequence_parallel and ParallelConfig(2, 1).uses_sequence_parallel


# Four layers, so PP 2 x 2 chunks gives each virtual stage one; all runs start from the same weights.
FOUR_LAYERS = {"num_layers": 4}
INTERLEAVED = {"pipeline_parallel": 2, "virtual_pipeline": 2}


def test_interleaved_pipeline_trains_like_pp1_and_resumes_exactly(tiny_manifest, tmp_path):
    train(1, tmp_path / "init", tiny_manifest, model_overrides=FOUR_LAYERS, train={"steps": 3, "save_every": 3})
    start = tmp_path / "init" / "checkpoints" / "step-000003"
    train(1, tmp_path / "pp1", tiny_manifest, model_overrides=FOUR_LAYERS, start=start)
    vpp_job = write_job(tmp_path / "vpp", tiny_manifest, model_overrides=FOUR_LAYERS, start=start,
                        parallel=INTERLEAVED)
    proc = torchrun(2, str(vpp_job))
    assert "TP 1 x PP 2 x DP 1 (interleaved, 2 chunks per rank)" in proc.stdout
    pp1, vpp = metrics(tmp_path / "pp1"), metrics(tmp_path / "vpp")
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r.get(key) for r in vpp] == pytest.approx([r.get(key) for r in pp1], abs=1e-5), key

    # Its step-3 checkpoint (both chunks of both ranks), resumed: steps 4-6 exactly as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "vpp" / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003")
    (resumed / "checkpoints" / "latest").write_text("step-000003")
    train(2, resumed, tiny_manifest, model_overrides=FOUR_LAYERS, start=start, parallel=INTERLEAVED)
    keys = ("loss", "lr", "grad_norm", "val_loss")
    assert [{k: r.get(k) for k in keys} for r in metrics(resumed)] == [{k: r.get(k) for k in keys} for r in vpp[3:]]

    # The chunked checkpoint loads at another layout: evaluated at PP 1, the validation loss the VPP run logged.
    job = write_job(tmp_path / "eval", tiny_manifest, model_overrides=FOUR_LAYERS)
    proc = eval_checkpoint(1, job, tmp_path / "vpp" / "checkpoints" / "step-000006")
    assert eval_lines(proc.stdout)[0]["val_loss"] == pytest.approx(vpp[-1]["val_loss"], abs=1e-5)


@pytest.mark.parametrize("config,message", [
    (dict(parallel=INTERLEAVED), r"num_layers 2 is not divisible by pipeline_parallel x virtual_pipeline = 2 x 2"),
    (dict(parallel=INTERLEAVED, model_overrides=FOUR_LAYERS, train={"global_batch": 6, "micro_batch": 2}),
     r"interleaved schedule needs a multiple of pipeline_parallel \(2\) micro-batches per step; the global batch "
     r"makes 3"),
    (dict(parallel={"pipeline_parallel": 1, "virtual_pipeline": 2}), r"virtual_pipeline 2 needs pipeline_parallel > 1"),
])
def test_bad_pipeline_combinations_are_refused_before_launch(config, message):
    with pytest.raises(ValueError, match=message):
        preflight(RunConfig.model_validate(config))


def test_a_layout_is_checked_against_the_layers_of_the_model_it_starts_from(tp2_run, tmp_path):
    """The flows' preflight checks the layout against the model they will train (a Hugging Face folder's
    config.json, a checkpoint's train state), not the preset they were given: a layout that fits the starting model
    passes, one that fits only the preset is refused."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
        "intermediate_size": 172, "vocab_size": 1000}))
    config = RunConfig(parallel=INTERLEAVED, train={"global_batch": 8, "micro_batch": 2, "eval_batches": 2})
    with pytest.raises(ValueError, match="num_layers 2 is not divisible"):  # the tiny preset's 2 layers
        preflight(config)
    preflight(config, str(folder), "init_from_hf")  # the Hugging Face model's 4
    with pytest.raises(FileNotFoundError, match="init_from_hf: .* is not a Hugging Face model folder"):
        preflight(config, str(tmp_path / "missing"), "init_from_hf")

    seven_b = config.replace(preset="7b")
    preflight(seven_b)  # the preset's 32 layers
    with pytest.raises(ValueError, match="num_layers 2 is not divisible"):  # the checkpoint's 2
        preflight(seven_b, str(tp2_run.dir))
    preflight(seven_b, "latest")  # not known before the data is built: the preset's

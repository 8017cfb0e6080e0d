"""Post-training quantization (model/quantize.py) of small Hugging Face Llama folders (tests/hf_models.py), with
the command a user runs: folders that transformers loads with no extra argument, on the scheme's grid, and input
that cannot be quantized refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.data import validation_picks
from model.quantize import SCHEMES, check_tokens
from model.quantize import main as quantize_main
from conftest import ROOT


@pytest.fixture(scope="module")
def quantized(hf_models, tmp_path_factory) -> dict[str, Path]:
    """The llama3-like folder (hidden 64, FFN 160: every input a multiple of 32) quantized in int8 and int4-g32,
    with the command a user runs. (The llama2-like one's FFN of 172 takes no group of 32.)"""
    root, out = tmp_path_factory.mktemp("quantized"), {}
    for scheme in ("int8", "int4-g32"):
        done = quantize(str(hf_models["llama3"]), str(root / scheme), "--scheme", scheme)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"wrote {root / scheme}" in done.stdout
        out[scheme] = root / scheme
    return out


def quantize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.quantize", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()  # no quantization argument: the folder says it all


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_a_quantized_folder_loads_as_is_gives_the_quantized_logits_and_sits_on_the_grid(hf_models, quantized,
                                                                                         scheme):
    from transformers import AutoModelForCausalLM, TorchAoConfig

    source, out = hf_models["llama3"], quantized[scheme]
    info = json.loads((out / "quantize_info.json").read_text())
    assert info["scheme"] == scheme and info["quantized_layers"] == 2 * 7 and info["reload_logit_diff"] == 0
    # The input's tokenizer, chat template and generation config, byte for byte.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name

    # Reloaded, it computes what the model quantized in memory computes.
    in_memory = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=TorchAoConfig(SCHEMES[scheme].torchao_config())).eval()
    reloaded, original = load(out), load(source)
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got, before = (m(tokens).logits for m in (in_memory, reloaded, original))
    assert torch.equal(got, expected)
    assert 0 < (got - before).abs().max() < 1  # quantized, and still the same model
    with torch.no_grad():
        change = (in_memory(check_tokens(1024)).logits - original(check_tokens(1024)).logits).abs().max().item()
    assert info["max_logit_change"] == pytest.approx(change, rel=1e-5)

    # Every weight is the nearest point of its group's grid: integers of the scheme's range times one scale.
    bits, group = SCHEMES[scheme].bits, SCHEMES[scheme].group_size
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        q = reloaded.get_submodule(f"model.layers.1.{name}").weight
        w = original.get_submodule(f"model.layers.1.{name}").weight.detach()
        rows, cols = w.shape
        per_group = group or cols
        assert q.qdata.dtype == torch.int8 and q.scale.shape == (rows, cols // per_group), name
        assert q.qdata.min() >= -2 ** (bits - 1) and q.qdata.max() <= 2 ** (bits - 1) - 1, name
        scale = q.scale.repeat_interleave(per_group, dim=1)
        assert torch.equal(q.dequantize(), q.qdata.float() * scale), name
        assert ((q.dequantize() - w).abs() <= scale * (0.5 + 1e-3)).all(), name
    # What it stores, on disk: int8 holds one byte per linear weight; int4 on CPU keeps its values in int8 bytes.
    assert info["bytes"] < info["source_bytes"]
    assert "int8 storage" in info["stores"] if bits == 4 else "one byte per weight" in info["stores"]


def test_the_int4_folder_is_no_smaller_than_int8_on_cpu_as_its_report_says(quantized):
    sizes = {s: json.loads((folder / "quantize_info.json").read_text())["bytes"] for s, folder in quantized.items()}
    # The same int8 bytes per weight; int4-g32 adds a scale per 32 weights where int8 has one per row.
    assert sizes["int8"] < sizes["int4-g32"] < 1.15 * sizes["int8"]


@pytest.mark.parametrize("case, message", [
    ("scheme", "--scheme: unknown quantization scheme 'int3'; choose one of int8, int4-g32"),
    ("cuda", "--scheme: int4-g128-cuda is a packed format that needs a CUDA device"),
    ("group", "int4-g32: groups of 32 weights do not tile mlp.down_proj (input size 172)"),
    ("tokenizer", "no tokenizer (tokenizer.model or tokenizer.json)"),
])
def test_what_cannot_be_quantized_is_refused_before_any_work(hf_models, case, message, tmp_path):
    source, scheme = hf_models["llama3"], {"scheme": "int3", "cuda": "int4-g128-cuda"}.get(case, "int4-g32")
    if case == "group":
        source = hf_models["llama2"]
    if case == "tokenizer":
        source = tmp_path / "no-tokenizer"
        source.mkdir()
        for f in hf_models["llama3"].iterdir():
            if not f.name.startswith("tokenizer"):
                (source / f.name).symlink_to(f)
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # In this process (the fixture runs the command itself): the refusal is the command's exit message.
    with pytest.raises(SystemExit) as refused:
        quantize_main([str(source), str(tmp_path / "out"), "--scheme", scheme])
    assert message in str(refused.value), refused.value
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_gptq_moves_a_layers_outputs_less_than_rounding_to_nearest_on_its_calibration_inputs():
    from model.qat import fake_quantized
    from model.quantize import gptq

    generator = torch.Generator().manual_seed(0)
    # Correlated inputs (as activations are), where spreading each rounding error over later columns pays.
    x = torch.randn(512, 16, generator=generator) @ torch.randn(16, 128, generator=generator)
    w = torch.randn(64, 128, generator=generator) * 0.02
    q, scales = gptq(w, 2 * x.T @ x / len(x), bits=4, group=32)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7 and scales.shape == (64, 4)
    calibrated = q.float() * scales.repeat_interleave(32, dim=1)
    nearest = fake_quantized(w, SCHEMES["int4-g32"])
    error = {name: ((x @ (w - v).T) ** 2).mean().item() for name, v in (("gptq", calibrated), ("rtn", nearest))}
    assert error["gptq"] < 0.5 * error["rtn"], error


def test_a_gptq_folder_records_its_calibration_rows_and_refuses_more_than_there_are(hf_models, tiny_manifest,
                                                                                      tmp_path):
    out = tmp_path / "gptq"
    done = quantize(str(hf_models["llama3"]), str(out), "--scheme", "int4-g32-gptq", "--manifest",
                    str(tiny_manifest), "--calibration-rows", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "quantize_info.json").read_text())
    total = info["calibration"]["validation_rows"]
    assert info["calibration"]["manifest"] == str(tiny_manifest.resolve()) and len(info["calibration"]["rows"]) == 8
    # Spread over the validation rows, none of them among the evaluation's perplexity rows (64 by default).
    assert info["calibration"]["rows"][-1] - info["calibration"]["rows"][0] > total * 0.9
    assert not set(info["calibration"]["rows"]) & set(validation_picks(total, 64).tolist())
    assert info["reload_logit_diff"] == 0 and type(load(out).model.layers[0].mlp.down_proj.weight).__name__ == \
        "IntxUnpackedToInt8Tensor"
    free = total - 64
    with pytest.raises(SystemExit, match=f"--calibration-rows {free + 1}: the validation shards of .* hold {total} "
                                         f"rows, {free} of them beside the 64 held out"):
        quantize_main([str(hf_models["llama3"]), str(tmp_path / "more"), "--scheme", "int4-g32-gptq",
                       "--manifest", str(tiny_manifest), "--calibration-rows", str(free + 1)])
    with pytest.raises(SystemExit, match="records no shard manifest; give --manifest"):
        quantize_main([str(hf_models["llama3"]), str(tmp_path / "none"), "--scheme", "int4-g32-gptq"])
    assert not (tmp_path / "more").exists() and not (tmp_path / "none").exists()


def test_the_quantize_stage_calibrates_on_the_manifest_it_is_given(hf_models, tiny_manifest, tmp_path):
    """An instruction-tuned export records its SFT manifest, whose validation rows are few (the quantize/default
    deployment failed on it); the evaluation's quantize stage calibrates GPTQ on the manifest it scores perplexity
    on, beside the rows perplexity reads."""
    import shutil

    from tasks.quantize import quantize_export

    export = tmp_path / "run" / "hf" / "step-000006"
    shutil.copytree(hf_models["llama3"], export)
    (export / "export_info.json").write_text(json.dumps({"manifest": str(tmp_path / "an-sft-manifest")}))
    out = Path(quantize_export(str(export), "int4-g32-gptq", "tuned", str(tiny_manifest), 64))
    assert out == tmp_path / "run" / "quantized" / "step-000006-int4-g32-gptq"
    calibration = json.loads((out / "quantize_info.json").read_text())["calibration"]
    assert calibration["manifest"] == str(tiny_manifest.resolve()) and len(calibration["rows"]) == 128
    assert not set(calibration["rows"]) & set(validation_picks(calibration["validation_rows"], 64).tolist())


def test_a_quantized_bf16_export_is_scored_in_fp32_like_its_original(hf_models, tmp_path):
    """A checkpoint trained in bf16 (on GPUs) exports in bf16, and its quantized copy dequantizes to bf16, which
    the evaluation's fp32 activations cannot multiply: model.evaluate.load scores both in fp32."""
    import shutil

    from transformers import AutoModelForCausalLM

    from model.evaluate import load as load_for_scoring
    from model.quantize import quantize as quantize_folder

    bf16 = tmp_path / "bf16"
    shutil.copytree(hf_models["llama3"], bf16)  # its tokenizer; the weights and config are replaced next
    AutoModelForCausalLM.from_pretrained(hf_models["llama3"], dtype=torch.bfloat16).save_pretrained(bf16)
    quantize_folder(bf16, tmp_path / "int4", "int4-g32")
    (original, _), (quantized, _) = load_for_scoring(bf16), load_for_scoring(tmp_path / "int4")
    assert type(quantized.model.layers[0].mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    tokens = check_tokens(original.config.vocab_size)
    with torch.no_grad():
        a, b = original(tokens).logits, quantized(tokens).logits
    assert a.dtype == b.dtype == torch.float32 and 0 < (a - b).abs().max() < 0.5


def test_a_qat_checkpoint_is_quantized_in_its_own_scheme_unasked_and_once(tmp_path):
    from model.checkpoint import STATE_FILE
    from tasks.quantize import schemes_for

    (tmp_path / "qat").mkdir()
    (tmp_path / "qat" / STATE_FILE).write_text(json.dumps({"step": 6, "qat": "int4-g32"}))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / STATE_FILE).write_text(json.dumps({"step": 6, "qat": None}))
    assert schemes_for(tmp_path / "qat", ["int8"]) == ["int8", "int4-g32"]
    assert schemes_for(tmp_path / "qat", ["int4-g32"]) == ["int4-g32"]
    assert schemes_for(tmp_path / "plain", ["int8"]) == ["int8"]

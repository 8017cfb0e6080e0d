"""Attention backends (model/gpt.py): PyTorch SDPA as Megatron core attention gives the losses of Megatron's own
unfused attention, causal and on packed SFT rows, at TP=1 and TP=2, and checkpoints move between the two."""

from __future__ import annotations

import json

import pytest

from model.config import TrainConfig
from tasks.download import resolve_source
from tasks.sft_data import build_sft_shards

from conftest import write_jsonl
from test_model import FAST, metrics, torchrun
from test_sft_and_export import sft_spec


def eval_loss(nproc: int, manifest, checkpoint, backend: str, *layout: str) -> float:
    proc = torchrun(nproc, "--manifest", str(manifest), "--run-dir", str(checkpoint.parent.parent / "eval"), *FAST,
                    "--attention-backend", backend, *layout, "--eval-only", str(checkpoint))
    assert f"{backend} attention" in proc.stdout
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("EVAL ")]
    return json.loads(line[5:])["val_loss"]


@pytest.mark.slow
def test_sdpa_matches_local_attention_causal_and_packed_at_tp1_and_tp2(tiny_manifest, tmp_path):
    # Packed SFT rows: several examples per row, the attention mask keeps each to itself.
    chats = [{"messages": [{"role": "user", "content": f"What is {a} times {b}?"},
                           {"role": "assistant", "content": f"{a} times {b} is {a * b}."}]}
             for a in range(10) for b in range(10)]
    spec = sft_spec(write_jsonl(tmp_path / "sft.jsonl", chats), validation_fraction=0.3)
    (tmp_path / "sft").mkdir()
    summary = build_sft_shards([resolve_source(s) for s in spec.sources], spec, tiny_manifest.parent / "tokenizer",
                               64, tmp_path / "sft")
    assert summary["rows_valid"] >= 4 and summary["examples_valid"] > 1.5 * summary["rows_valid"], summary

    # Trained with SDPA; evaluated with either backend at either layout.
    proc = torchrun(1, "--manifest", str(tiny_manifest), "--run-dir", str(tmp_path / "run"), *FAST,
                    "--attention-backend", "sdpa")
    assert "sdpa attention" in proc.stdout
    checkpoint = tmp_path / "run/checkpoints/step-000006"
    trained_val_loss = metrics(tmp_path / "run")[-1]["val_loss"]
    # Pretraining rows at TP 1 and 2; packed SFT rows at TP 2 (each rank holds half the heads and their masks).
    for manifest, nproc, layout in ((tiny_manifest, 1, ()), (tiny_manifest, 2, ("--tp", "2")),
                                    (tmp_path / "sft", 2, ("--tp", "2"))):
        sdpa = eval_loss(nproc, manifest, checkpoint, "sdpa", *layout)
        local = eval_loss(nproc, manifest, checkpoint, "local", *layout)
        assert abs(sdpa - local) < 1e-5, (manifest.name, layout, sdpa, local)
        if manifest == tiny_manifest:
            assert abs(local - trained_val_loss) < 1e-5, (layout, local, trained_val_loss)


def test_attention_backend_is_checked():
    with pytest.raises(ValueError, match="attention_backend 'flash' must be one of auto, te, sdpa, local"):
        TrainConfig(attention_backend="flash")

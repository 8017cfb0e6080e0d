"""Attention backends (model/gpt.py): PyTorch SDPA as Megatron core attention gives the losses of Megatron's own
unfused attention, causal and on packed SFT rows, at TP=1, TP=2 and PP=2, and checkpoints move between the two."""

from __future__ import annotations

import pytest

from model.config import TrainConfig


@pytest.mark.slow
def test_sdpa_matches_local_attention_causal_and_packed_at_tp1_tp2_and_pp2(tp1_run, tp1_evaluations,
                                                                           packed_sft_manifest):
    # Packed SFT rows: several examples per row, the attention mask keeps each to itself.
    _, summary = packed_sft_manifest
    assert summary["rows_valid"] >= 4 and summary["examples_valid"] > 1.5 * summary["rows_valid"], summary

    # Trained with SDPA (the CPU default); evaluated with either backend at each layout, on pretraining rows and
    # on packed SFT rows (at TP 2 each rank holds half the heads and their masks).
    assert "sdpa attention" in tp1_run.stdout
    trained_val_loss = tp1_run.metrics()[-1]["val_loss"]
    for layout in ("tp1", "tp2", "pp2"):
        for rows in ("pretrain", "sft"):
            sdpa = tp1_evaluations[layout, "sdpa", rows]["val_loss"]
            local = tp1_evaluations[layout, "local", rows]["val_loss"]
            assert abs(sdpa - local) < 1e-5, (layout, rows, sdpa, local)
        local = tp1_evaluations[layout, "local", "pretrain"]["val_loss"]
        assert abs(local - trained_val_loss) < 1e-5, (layout, local, trained_val_loss)


def test_attention_backend_is_checked():
    with pytest.raises(ValueError, match="attention_backend 'flash' must be one of auto, te, sdpa, local"):
        TrainConfig(attention_backend="flash")

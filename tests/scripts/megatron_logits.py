"""Logits of a checkpoint's Megatron model (loaded at TP=1/PP=1) for several inputs, in one process (one-rank
gloo group). INPUTS.pt holds a list of {"tokens": [b, s], "segments": [b, s] or None}: packed-example segments
give the training attention mask. OUT.pt gets the list of [b, s, vocab] logits, in the same order.

    python tests/scripts/megatron_logits.py CHECKPOINT INPUTS.pt OUT.pt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from model.export_hf import load_megatron, megatron_logits
from model.loss import segment_attention_mask

if __name__ == "__main__":
    gpt, m, _ = load_megatron(Path(sys.argv[1]))
    inputs = torch.load(sys.argv[2])
    torch.save([megatron_logits(gpt, m, x["tokens"], None if x.get("segments") is None
                                else segment_attention_mask(x["segments"])) for x in inputs], sys.argv[3])

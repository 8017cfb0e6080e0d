"""Logits of a checkpoint's Megatron model (loaded at TP=1/PP=1) for given tokens, optionally with packed-example
segments (the training attention mask); saved with torch.save. Runs in its own process (one-rank gloo group).

    python tests/scripts/megatron_logits.py CHECKPOINT TOKENS.pt OUT.pt [SEGMENTS.pt]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from model.export_hf import load_megatron, megatron_logits
from model.train import segment_attention_mask

if __name__ == "__main__":
    gpt, _, _ = load_megatron(Path(sys.argv[1]))
    tokens = torch.load(sys.argv[2])
    mask = segment_attention_mask(torch.load(sys.argv[4])) if len(sys.argv) > 4 else None
    torch.save(megatron_logits(gpt, tokens, mask), sys.argv[3])

"""Build a preset's GPTModel on the meta device in a one-rank gloo group and print its parameter count."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

from model.distributed import init_single_process
from model.config import ParallelConfig, TrainConfig, preset
from model.gpt import build_model, transformer_config

if __name__ == "__main__":
    init_single_process()
    cfg = preset(sys.argv[1])
    with torch.device("meta"):
        model = build_model(cfg, transformer_config(cfg, ParallelConfig(), TrainConfig()), pre_process=True,
                            post_process=True)
    count = sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())
    print(json.dumps({"megatron": count, "formula": cfg.num_parameters()}))
    dist.destroy_process_group()

"""Logits of checkpoints loaded at several layouts, under torchrun with 2 ranks: TP 1 (x DP 2), TP 2 and PP 2.

    torchrun --nproc-per-node 2 tests/scripts/layout_logits.py TOKENS.pt OUT_DIR CHECKPOINT...

TOKENS.pt is a [b, s] tensor; each checkpoint's fp32 logits over its unpadded vocabulary, gathered across
tensor-parallel ranks and taken from the last pipeline stage, go to OUT_DIR/<checkpoint name>-tp<T>-pp<P>.pt.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

from model import compat
from model.checkpoint import load_checkpoint, read_train_state
from model.config import ModelConfig, ParallelConfig, TrainConfig
from model.train import build_gpt

LAYOUTS = ((1, 1), (2, 1), (1, 2))

if __name__ == "__main__":
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens, out = torch.load(sys.argv[1]), Path(sys.argv[2])
    compat.apply()
    dist.init_process_group("gloo")
    for tp, pp in LAYOUTS:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        compat.manual_seed(0)
        for checkpoint in map(Path, sys.argv[3:]):
            m = ModelConfig(**read_train_state(checkpoint)["model"])
            m = dataclasses.replace(m, seq_len=tokens.shape[1])
            (gpt,), _ = build_gpt(m, ParallelConfig(tp, pp), TrainConfig(precision="fp32"), "sdpa")
            load_checkpoint(checkpoint, gpt)
            gpt.eval()
            collected = []

            def forward_step(data_iterator, model):
                batch = next(data_iterator)
                positions = torch.arange(batch.shape[1]).unsqueeze(0).expand_as(batch)
                output = model(batch, positions, None)

                def loss_func(logits):
                    collected.append(gather_from_tensor_model_parallel_region(logits)[..., :m.vocab_size])
                    return logits.sum() * 0, {}

                return output, loss_func

            with torch.no_grad():
                get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]),
                                            model=[gpt], num_microbatches=1, seq_length=tokens.shape[1],
                                            micro_batch_size=tokens.shape[0], forward_only=True)
            if collected and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                torch.save(collected[0], out / f"{checkpoint.name}-tp{tp}-pp{pp}.pt")
        ps.destroy_model_parallel()
    dist.destroy_process_group()

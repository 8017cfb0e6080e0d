"""Validation loss of a saved checkpoint at any layout, a program of its own (run under torchrun like training):

    torchrun --nproc-per-node 2 -m model.eval_checkpoint runs/x/train_job.json CHECKPOINT \
        [--manifests M1 M2] [--backends sdpa local]

The layout, micro-batch, evaluation batches and precision are the job file's (model/run_config.py); the architecture
is the checkpoint's own, loaded at that layout whatever layout saved it. Rank 0 prints one `EVAL {json}` line per
manifest (default: the job's) and attention backend (default: the job's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist

from model.checkpoint import load_checkpoint, read_train_state
from model.config import ModelConfig
from tasks.lib.manifest import ShardManifest
from model.loss import run_batches
from model.run_config import TrainJob
from model.train import build_gpt, init_distributed, layout_line, validation_batch


def evaluate_checkpoint(job: TrainJob, checkpoint: Path, manifests: list[str], backends: list[str]) -> list[dict]:
    from model.gpt import resolve_attention_backend

    on_gpu = torch.cuda.is_available()
    parallel, train = job.config.parallel, job.config.train.for_device(on_gpu)
    model_cfg = ModelConfig(**read_train_state(checkpoint)["model"])
    dp = init_distributed(parallel, train, on_gpu)
    parallel.check_schedule(model_cfg, train, dp)
    if dist.get_rank() == 0:
        print(layout_line(parallel, train, dp, on_gpu), flush=True)
    batches, seq_lens = {}, {}
    for manifest in manifests:
        data = ShardManifest.load(manifest)
        if data.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"{manifest}: its tokenizer's {data.vocab_size} ids do not fit the checkpoint's "
                             f"vocab_size {model_cfg.vocab_size} ({checkpoint})")
        batches[manifest], seq_lens[manifest] = validation_batch(manifest, train), data.seq_len
    results = []
    for backend in backends:
        attention = resolve_attention_backend(backend)
        chunks, _ = build_gpt(model_cfg, parallel, train, attention)
        saved = load_checkpoint(checkpoint, chunks)
        for chunk in chunks:
            chunk.eval()
        for manifest, valid in batches.items():
            with torch.no_grad():
                loss = run_batches(chunks, valid, train.micro_batch,
                                   dataclasses.replace(model_cfg, seq_len=seq_lens[manifest]), forward_only=True)
            results.append({"checkpoint": str(checkpoint), "step": saved["step"], "manifest": str(manifest),
                            "attention_backend": attention, "val_loss": loss,
                            "layout": {"tp": parallel.tensor_parallel, "pp": parallel.pipeline_parallel, "dp": dp}})
            if dist.get_rank() == 0:
                print("EVAL " + json.dumps(results[-1]), flush=True)
    dist.destroy_process_group()
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", type=Path, help="a train_job.json: the layout and train settings to evaluate with")
    p.add_argument("checkpoint", type=Path, help="a checkpoints/step-N directory, saved at any layout")
    p.add_argument("--manifests", nargs="+", default=None, metavar="MANIFEST_DIR",
                   help="the manifests whose validation rows to evaluate on (default: the job's)")
    p.add_argument("--backends", nargs="+", default=None, metavar="BACKEND",
                   help="the attention backends to evaluate with (default: the job's)")
    args = p.parse_args(argv)
    job = TrainJob.read(args.job)
    evaluate_checkpoint(job, args.checkpoint, args.manifests or [job.manifest],
                        args.backends or [job.config.train.attention_backend])


if __name__ == "__main__":
    main()

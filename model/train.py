"""Pretraining entry point, run under torchrun (one process per rank; gloo ranks on CPU, NCCL on GPU).

    torchrun --nproc-per-node 4 -m model.train --manifest artifacts/shard/<fp> --run-dir runs/tiny \
        --preset tiny --tp 2 --pp 2 --steps 200

Writes `<run-dir>/metrics.jsonl` (one line per step, rank 0), TensorBoard scalars in `<run-dir>/tensorboard/`
(`tensorboard --logdir runs`) and checkpoints (model/checkpoint.py). If the run directory has a checkpoint,
training resumes from it: same data order, same losses as an uninterrupted run, and the TensorBoard curves
continue without repeating the steps the crashed run logged after that checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from model import compat
from model.checkpoint import (latest_checkpoint, load_checkpoint, manifest_tokenizer, read_train_state,
                              save_checkpoint)
from model.config import ModelConfig, ParallelConfig, TrainConfig, preset
from model.data import BatchPrefetcher, TrainSamples, load_manifest, rank_slice, validation_rows

# bf16 dense peak of known GPUs (TFLOP/s), for MFU; override with --peak-tflops. fp16 runs at the bf16 rate, fp8 at
# twice it (Hopper), fp32 matmuls at the TF32 rate, half of it.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
PEAK_BY_PRECISION = {"bf16": 1.0, "fp16": 1.0, "fp8": 2.0, "fp32": 0.5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="directory holding manifest.json (shard stage output)")
    p.add_argument("--run-dir", required=True, help="where checkpoints and metrics go")
    p.add_argument("--preset", default="tiny", help="model preset: tiny or 7b")
    p.add_argument("--model-overrides", default="{}", help="JSON of ModelConfig fields to override")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--virtual-pipeline", type=int, default=None,
                   help="model chunks per pipeline rank: Megatron's interleaved 1F1B schedule (needs pp > 1)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="split norms' and residuals' activations over the TP ranks (default: on when tp > 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: known GPUs)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (any TP/PP) with a fresh optimizer and schedule, "
                        "e.g. instruction tuning from a pretrained model; ignored when the run dir can resume")
    p.add_argument("--eval-only", default=None, metavar="CHECKPOINT",
                   help="load this checkpoint (saved at any TP/PP) and print its validation loss as JSON lines "
                        "(`EVAL {...}`), one per manifest and attention backend")
    p.add_argument("--eval-manifests", nargs="+", default=None, metavar="MANIFEST_DIR",
                   help="with --eval-only: the manifests to evaluate on (default: --manifest)")
    p.add_argument("--eval-backends", nargs="+", default=None, metavar="BACKEND",
                   help="with --eval-only: the attention backends to evaluate with (default: --attention-backend)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "adam_betas":
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if str(f.type).startswith("bool"):  # `bool | None`: None is the device's default (TrainConfig.for_device)
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=str if f.default is None else type(f.default), default=f.default)
    return p.parse_args(argv)


def flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token: 6 x parameters plus attention scores (the usual PaLM-style estimate)."""
    return 6 * m.num_parameters() + 12 * m.num_layers * m.hidden_size * m.seq_len


def open_metrics(path: Path, after_step: int):
    """Append to the metrics log, first dropping lines a crashed run wrote after the checkpoint we resume from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= after_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return open(path, "a")


def open_tensorboard(run_dir: Path, first_step: int):
    """Rank 0's TensorBoard writer. A resumed run purges whatever the crashed run logged from `first_step` on
    (TensorBoard hides those events), so each curve has one point per step."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = run_dir / "tensorboard"
    resumed = log_dir.is_dir() and any(log_dir.iterdir())
    return SummaryWriter(str(log_dir), purge_step=first_step if resumed else None, flush_secs=30)


# metrics.jsonl key -> TensorBoard tag
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "val_loss": "val/loss",
                    "loss_scale": "train/loss_scale", "skipped_steps": "train/skipped_steps",
                    "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "peak_mem_gib": "perf/peak_mem_gib",
                    "data_wait": "perf/data_wait"}


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def segment_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean mask, True where attention is blocked: causal, and never across packed examples."""
    s = segments.shape[1]
    future = torch.ones(s, s, dtype=torch.bool, device=segments.device).triu(1)
    other_example = segments[:, :, None] != segments[:, None, :]
    return (future | other_example).unsqueeze(1)


def peak_memory_gib(rss_before_model: int) -> float:
    """Peak memory this rank's training has used: the CUDA allocator's peak on GPU; on CPU, the growth of the
    process's peak resident size since just before the model was built (libraries and
    the data loader excluded)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return max(0, peak_rss - rss_before_model) / 2**30


@dataclasses.dataclass
class Training:
    """What one rank trains with, built by `build`: its model chunk, Megatron's DDP wrapper, optimizer and LR
    schedule."""

    model_cfg: ModelConfig
    train: TrainConfig
    chunks: list  # this rank's pipeline stage(s) of the GPTModel: one, or one per virtual stage
    models: list  # each chunk wrapped in Megatron's DistributedDataParallel
    optimizer: object
    scheduler: object
    attention: str  # the resolved attention backend


def model_config(args: argparse.Namespace, manifest: dict) -> ModelConfig:
    """The preset with its overrides; the sequence length comes from the data, and so does the vocabulary unless
    the model has its own (one started from a checkpoint, whose tokenizer may have fewer ids than its table)."""
    overrides = json.loads(args.model_overrides)
    if overrides.get("seq_len", manifest["seq_len"]) != manifest["seq_len"]:
        raise ValueError(f"model seq_len {overrides['seq_len']} does not match the data's {manifest['seq_len']} "
                         f"({args.manifest})")
    vocab = overrides.get("vocab_size", manifest["vocab_size"])
    if vocab < manifest["vocab_size"]:
        raise ValueError(f"model vocab_size {vocab} is smaller than the data's tokenizer ({manifest['vocab_size']} "
                         f"ids, {args.manifest}): tokenize with the model's own tokenizer")
    return preset(args.preset, **{**overrides, "vocab_size": vocab, "seq_len": manifest["seq_len"]})


def init_distributed(parallel: ParallelConfig, train: TrainConfig, on_gpu: bool) -> int:
    """The process group and Megatron's parallel state: parallelism is decided here and only here. Returns the
    data-parallel size."""
    compat.apply()  # no-op with CUDA
    dist.init_process_group("nccl" if on_gpu else "gloo")
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    from megatron.core import parallel_state as ps

    dp = parallel.data_parallel(dist.get_world_size())
    if train.global_batch % (dp * train.micro_batch):
        raise ValueError(f"global_batch {train.global_batch} must be a multiple of data_parallel x micro_batch = "
                         f"{dp} x {train.micro_batch}; change --global-batch or --micro-batch")
    ps.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor_parallel,
                                 pipeline_model_parallel_size=parallel.pipeline_parallel,
                                 virtual_pipeline_model_parallel_size=parallel.virtual_pipeline)
    compat.manual_seed(train.seed)
    return dp


def build_gpt(model_cfg: ModelConfig, parallel: ParallelConfig, train: TrainConfig, attention: str):
    """This rank's share of the model, with a resolved attention backend: (its chunks, their config). One chunk
    (GPTModel) per virtual pipeline stage: with the interleaved schedule, rank r of PP p holds stages r, r + p..."""
    from megatron.core import parallel_state as ps

    from model.gpt import build_model, transformer_config

    config = transformer_config(model_cfg, parallel, train)
    vp = (lambda i: i) if parallel.virtual_pipeline else (lambda i: None)
    chunks = [build_model(model_cfg, config, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False,
                                                                                     vp_stage=vp(i)),
                          post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp(i)),
                          attention_backend=attention, vp_stage=vp(i))
              for i in range(parallel.chunks)]
    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda()
    return chunks, config


def build(model_cfg: ModelConfig, parallel: ParallelConfig, train: TrainConfig) -> Training:
    """Model, DDP wrapper, optimizer and LR schedule."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from model.gpt import resolve_attention_backend

    attention = resolve_attention_backend(train.attention_backend)
    chunks, config = build_gpt(model_cfg, parallel, train, attention)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=train.grad_reduce_dtype == "fp32", use_distributed_optimizer=train.distributed_optimizer,
        overlap_grad_reduce=train.overlap_grad_reduce, overlap_param_gather=train.overlap_param_gather)
    # One DDP per chunk; only the first buckets its gradients for overlap (as Megatron-LM does).
    models = [DistributedDataParallel(config=config, module=chunk, ddp_config=ddp_config, disable_bucketing=i > 0)
              for i, chunk in enumerate(chunks)]
    # The schedules call these: no gradient reduction until the last micro-batch, then finish it (DP all-reduce or
    # reduce-scatter, and the embedding/layer-norm reductions across model-parallel ranks).
    config.no_sync_func = [m.no_sync for m in models] if len(models) > 1 else models[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_betas[0], adam_beta2=train.adam_betas[1], clip_grad=train.grad_clip,
        bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
        initial_loss_scale=train.initial_loss_scale, loss_scale_window=train.loss_scale_window,
        hysteresis=train.hysteresis, use_distributed_optimizer=train.distributed_optimizer,
        overlap_param_gather=train.overlap_param_gather), models)
    # The schedules multiply each micro-batch's loss by this before backward: fp16's loss scale (1 otherwise).
    config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr, lr_warmup_steps=train.warmup_steps,
        lr_decay_steps=train.steps, lr_decay_style="cosine", start_wd=train.weight_decay,
        end_wd=train.weight_decay, wd_incr_steps=train.steps, wd_incr_style="constant")
    return Training(model_cfg, train, chunks, models, optimizer, scheduler, attention)


def gradient_traffic(t: Training, dp: int) -> dict:
    """What data-parallel gradient reduction moves each step, from the DDP's own buckets: their bytes (in the
    reduction dtype) and what one rank sends in a ring (reduce-scatter with the distributed optimizer, else
    all-reduce, twice that)."""
    buckets = [b for m in t.models for buffer in m.buffers + m.expert_parallel_buffers for b in buffer.buckets]
    size = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buckets)
    share = (dp - 1) / dp * (1 if t.train.distributed_optimizer else 2)
    return {"buckets": len(buckets), "bytes": size, "bytes_sent_per_rank": size * share,
            "dtype": str(buckets[0].grad_data.dtype).removeprefix("torch.") if buckets else None}


def run_batches(models: list, batch: dict[str, torch.Tensor], micro_batch: int, model_cfg: ModelConfig,
                forward_only: bool) -> float:
    """Forward(/backward) of `models` (this rank's chunks) over the batch's micro-batches; returns the mean loss
    across data-parallel ranks. SFT batches carry `segments` (packed examples attend only to themselves) and a
    `loss_mask` (only the assistant's tokens count). A padded vocabulary's extra rows are kept out of the softmax,
    so the loss is the one over the tokenizer's own ids (what transformers computes on the exported model)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    seq_len = model_cfg.seq_len
    positions = torch.arange(seq_len).unsqueeze(0)
    padded = model_cfg.padded_vocab_size != model_cfg.vocab_size

    def forward_step(data_iterator, model):
        batch = {k: v.to(device, non_blocking=on_gpu) for k, v in next(data_iterator).items()}  # pinned on GPU
        tokens, labels = batch["tokens"][:, :-1].contiguous(), batch["tokens"][:, 1:].contiguous()
        segments = batch.get("segments")
        mask = None if segments is None else segment_attention_mask(segments[:, :-1])
        # Megatron computes the loss itself from labels; with a padded vocabulary it returns the logits instead.
        output = model(tokens, positions.expand(len(tokens), -1).to(device), mask,
                       labels=None if padded else labels)
        loss_mask = batch.get("loss_mask")

        def loss_func(per_token_loss):
            if padded:
                per_token_loss = unpadded_vocab_loss(per_token_loss, labels, model_cfg.vocab_size)
            if loss_mask is None:
                loss = per_token_loss.float().mean()
            else:
                weights = loss_mask[:, 1:].float()
                loss = (per_token_loss.float() * weights).sum() / weights.sum().clamp(min=1)
            # clone: the schedule divides `loss` by the number of micro-batches in place
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    count = len(batch["tokens"])
    micro = [{k: v[i:i + micro_batch] for k, v in batch.items()} for i in range(0, count, micro_batch)]
    # Each chunk reads every micro-batch from its own iterator (the first stage its tokens, the last its labels).
    iterators = [iter(micro) for _ in models] if len(models) > 1 else iter(micro)
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iterators, model=models,
                                         num_microbatches=len(micro), seq_length=seq_len,
                                         micro_batch_size=micro_batch, forward_only=forward_only)
    # Only the last pipeline stage has losses; sum them over the world and divide by who contributed.
    reporter = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    local = torch.tensor([sum(float(x["loss"]) for x in losses) / len(micro), 1.0] if reporter else [0.0, 0.0],
                         device=device)
    dist.all_reduce(local)
    return float(local[0] / local[1])


def unpadded_vocab_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross-entropy [b, s] from this tensor-parallel rank's slice of the logits [b, s, padded / TP],
    with the columns at or beyond `vocab_size` (padding) masked out of the softmax."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    width = logits.shape[-1]
    first = ps.get_tensor_model_parallel_rank() * width
    padding = torch.arange(first, first + width, device=logits.device) >= vocab_size
    logits = logits.float().masked_fill(padding, torch.finfo(torch.float32).min)
    return vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), labels.transpose(0, 1).contiguous()
                                        ).transpose(0, 1)


def validation_batch(manifest: str | Path, train: TrainConfig) -> dict[str, torch.Tensor]:
    """The manifest's evaluation rows, cut to whole micro-batches (pipeline schedules need them)."""
    valid = validation_rows(manifest, train.eval_batches * train.micro_batch)
    whole = len(valid["tokens"]) // train.micro_batch * train.micro_batch
    if whole == 0:
        raise ValueError(f"{manifest}: {len(valid['tokens'])} validation rows, fewer than one micro-batch "
                         f"({train.micro_batch}); raise the validation fraction or lower --micro-batch")
    return {k: v[:whole] for k, v in valid.items()}


@contextlib.contextmanager
def parameters_gathered(t: Training):
    """With overlap_param_gather the optimizer step leaves its updated parameter shards to be all-gathered by the
    next training forward, bucket by bucket; evaluation and checkpoints need every parameter now."""
    if not t.train.overlap_param_gather:
        yield
        return
    for m in t.models:
        m.disable_forward_pre_hook()  # and gather synchronously
    try:
        yield
    finally:
        for m in t.models:
            m.enable_forward_pre_hook()


def evaluate(t: Training, valid: dict[str, torch.Tensor]) -> float:
    for m in t.models:
        m.eval()
    with torch.no_grad(), parameters_gathered(t):
        loss = run_batches(t.models, valid, t.train.micro_batch, t.model_cfg, forward_only=True)
    for m in t.models:
        m.train()
    return loss


def evaluate_checkpoint(checkpoint: Path, manifests: list[str], backends: list[str], parallel: ParallelConfig,
                        train: TrainConfig, dp: int) -> list[dict]:
    """Validation loss of a checkpoint (saved at any TP/PP) at this layout, once per attention backend and
    manifest: one `EVAL {json}` line each from rank 0. The architecture is the checkpoint's own."""
    from model.gpt import resolve_attention_backend

    model_cfg = ModelConfig(**read_train_state(checkpoint)["model"])
    batches, seq_lens = {}, {}
    for manifest in manifests:
        data = load_manifest(manifest)
        if data["vocab_size"] > model_cfg.vocab_size:
            raise ValueError(f"{manifest}: its tokenizer's {data['vocab_size']} ids do not fit the checkpoint's "
                             f"vocab_size {model_cfg.vocab_size} ({checkpoint})")
        batches[manifest], seq_lens[manifest] = validation_batch(manifest, train), data["seq_len"]
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
    return results


def resume_or_init(t: Training, run_dir: Path, init_from: str | None, log) -> tuple[dict, int]:
    """Load the run's latest checkpoint (weights, optimizer, schedule, data position), or the weights of
    `init_from` for a new run that starts from another's. Returns (train state, TensorBoard step offset)."""
    state = {"step": 0, "consumed_samples": 0}
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        saved_with = read_train_state(checkpoint).get("distributed_optimizer", False)
        if saved_with != t.train.distributed_optimizer:  # the two optimizers save their states differently
            raise ValueError(f"{checkpoint} was saved with distributed_optimizer {saved_with}; resume with "
                             f"--{'' if saved_with else 'no-'}distributed-optimizer (train: {{distributed_optimizer: "
                             f"{str(saved_with).lower()}}}), or start a new run from its weights with --init-from")
        state = load_checkpoint(checkpoint, t.chunks, t.optimizer)
        t.scheduler.load_state_dict(state["scheduler"])
        log(f"resumed from {checkpoint} at step {state['step']}", flush=True)
    elif init_from:
        loaded = load_checkpoint(Path(init_from), t.chunks)
        log(f"initialised from {init_from} (step {loaded['step']} of its run)", flush=True)
    # TensorBoard's step axis counts from the first run of the model's lineage: a run started from a checkpoint
    # (continued pretraining, SFT) draws its curves after that checkpoint's own.
    offset = 0
    if init_from:
        parent = read_train_state(Path(init_from))
        offset = parent.get("step_offset", 0) + parent["step"]
    return state, offset


def inherited_description(init_from: str | None) -> dict:
    """What a run started from a checkpoint passes on from it: an imported model's original Hugging Face config,
    which export starts from (model/import_hf.py)."""
    if not init_from:
        return {}
    parent = read_train_state(Path(init_from))
    return {key: parent[key] for key in ("hf_config",) if key in parent}


class MetricsLogger:
    """Rank 0's record of each step: `metrics.jsonl`, TensorBoard, and the progress line the launcher follows
    (written after the record, so a line seen means a step on disk). Other ranks log nothing."""

    def __init__(self, run_dir: Path, resumed_step: int, offset: int, steps: int, enabled: bool):
        self.steps, self.offset, self.enabled = steps, offset, enabled
        if enabled:
            self.metrics = open_metrics(run_dir / "metrics.jsonl", after_step=resumed_step)
            self.tensorboard = open_tensorboard(run_dir, first_step=offset + resumed_step + 1)

    def record(self, record: dict, logged: bool, eta: str | None) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, tag in TENSORBOARD_TAGS.items():
            if record.get(key) is not None:
                self.tensorboard.add_scalar(tag, record[key], global_step=self.offset + record["step"])
        if logged:
            self.tensorboard.flush()
            print(f"step={record['step']}/{self.steps} " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                if v is not None and k != "step") + f" eta={eta}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.tensorboard.close()


class Heartbeat:
    """This rank's last sign of progress, `<run-dir>/heartbeats/rank-<N>.json`: which step it is in (or has
    finished) and since when. The launcher (tasks/lib/launch.py) reads them to find a stalled step and the rank
    that holds it up; a write costs well under a millisecond a step."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "heartbeats" / f"rank-{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank

    def beat(self, step: int, done: bool) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "pid": os.getpid(), "step": step, "done": done,
                                   "time": time.time()}))
        os.replace(tmp, self.path)


# A fault drill for the recovery tests (tests/test_launch.py), e.g. TRAIN_FAULT=kill:1:4: rank 1 SIGKILLs itself
# after step 4; `stall` sleeps there instead, `kill-launcher` SIGKILLs torchrun's agent. Only in a run that started
# from step 0, so the run that resumes from a checkpoint before that step goes through.
FAULT_ENV = "TRAIN_FAULT"


def fault_drill(rank: int, step: int, started_at: int) -> None:
    fault = os.environ.get(FAULT_ENV)
    if not fault or started_at != 0:
        return
    kind, fault_rank, fault_step = fault.split(":")
    if kind not in ("kill", "kill-launcher", "stall"):
        raise ValueError(f"{FAULT_ENV}={fault}: the kind must be kill, kill-launcher or stall")
    if (int(fault_rank), int(fault_step)) != (rank, step):
        return
    print(f"[rank {rank}] fault drill: {kind} after step {step}", file=sys.stderr, flush=True)
    if kind == "kill":
        os.kill(os.getpid(), 9)
    elif kind == "kill-launcher":
        os.kill(os.getppid(), 9)
    else:
        time.sleep(3600)


def train_step(t: Training, batch: dict[str, torch.Tensor]) -> dict:
    """One optimizer step on this rank's share of the global batch: its loss, learning rate and gradient norm."""
    for m in t.models:
        m.zero_grad_buffer()
    t.optimizer.zero_grad()
    loss = run_batches(t.models, batch, t.train.micro_batch, t.model_cfg, forward_only=False)
    loss_scale = float(t.optimizer.get_loss_scale())  # the scale this step's gradients were computed with
    updated, grad_norm, _ = t.optimizer.step()
    if updated:  # an fp16 step whose gradients overflowed is skipped: no update, and the schedule waits (Megatron)
        t.scheduler.step(increment=1)
    record = {"loss": loss, "lr": t.optimizer.param_groups[0]["lr"],
              "grad_norm": float(grad_norm) if grad_norm is not None else None}
    if t.train.precision == "fp16":
        record.update(loss_scale=loss_scale, skipped=not updated)
    return record


def main(argv=None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    train = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                           if f.name != "adam_betas"}).for_device(on_gpu)
    if train.precision == "fp8":
        from model.gpt import check_fp8_available

        check_fp8_available()
    model_cfg = model_config(args, load_manifest(args.manifest))
    parallel = ParallelConfig(args.tp, args.pp, args.sequence_parallel, args.virtual_pipeline)
    run_dir = Path(args.run_dir)

    dp = init_distributed(parallel, train, on_gpu)
    parallel.check_schedule(model_cfg.num_layers, train, dp)
    from megatron.core import parallel_state as ps

    world, rank0 = dist.get_world_size(), dist.get_rank() == 0
    log = print if rank0 else (lambda *a, **k: None)
    if args.bf16 is not None:
        log(f"note: bf16 {str(args.bf16).lower()} is the older name of precision {train.precision}; set precision "
            f"instead (TrainConfig.precision: fp32, bf16, fp16 or fp8)", flush=True)
    log(f"layout: world {world} = TP {parallel.tensor_parallel} x PP {parallel.pipeline_parallel} x DP {dp}"
        f"{' (sequence parallel)' if parallel.uses_sequence_parallel else ''}"
        f"{f' (interleaved, {parallel.virtual_pipeline} chunks per rank)' if parallel.virtual_pipeline else ''}; "
        f"{'GPU (NCCL)' if on_gpu else 'CPU (gloo, Megatron-Core via model/compat.py)'}, "
        f"{train.precision}{f' ({train.fp8_recipe} recipe)' if train.precision == 'fp8' else ''}, "
        f"gradients reduced in {train.grad_reduce_dtype}"
        + "".join(f", {name.replace('_', ' ')}" for name in ("distributed_optimizer", "overlap_grad_reduce",
                                                             "overlap_param_gather") if getattr(train, name)),
        flush=True)
    if args.eval_only:
        evaluate_checkpoint(Path(args.eval_only), args.eval_manifests or [args.manifest],
                            args.eval_backends or [train.attention_backend], parallel, train, dp)
        dist.destroy_process_group()
        return

    # Data is read before the model is built so that, on CPU, its host memory is not counted as training memory
    # (on GPU it lives in host memory too, outside the CUDA allocator's peak).
    valid = validation_batch(args.manifest, train)
    samples = TrainSamples(args.manifest, seed=train.seed)
    rss_before_model = psutil.Process().memory_info().rss
    t = build(model_cfg, parallel, train)
    log(f"model: {args.preset} {model_cfg.num_parameters() / 1e6:.1f}M parameters, {t.attention} attention",
        flush=True)

    if dp > 1:
        traffic = gradient_traffic(t, dp)
        log(f"gradient reduction: {traffic['buckets']} bucket(s), {traffic['bytes'] / 2**20:.2f} MiB in "
            f"{traffic['dtype']}; each step sends {traffic['bytes_sent_per_rank'] / 2**20:.2f} MiB per rank",
            flush=True)
    state, offset = resume_or_init(t, run_dir, args.init_from, log)
    # What a checkpoint needs to be used without this command line (export, evaluation, lineage):
    described = {"preset": args.preset, "model": dataclasses.asdict(model_cfg),
                 "manifest": str(Path(args.manifest).resolve()), "init_from": args.init_from,
                 "distributed_optimizer": train.distributed_optimizer, "step_offset": offset,
                 "tokenizer": manifest_tokenizer(args.manifest), **inherited_description(args.init_from)}
    metrics = MetricsLogger(run_dir, state["step"], offset, train.steps, enabled=rank0)
    tokens_per_step = train.global_batch * model_cfg.seq_len
    peak = args.peak_tflops or next((v * PEAK_BY_PRECISION[train.precision] for k, v in PEAK_TFLOPS.items()
                                     if on_gpu and k in torch.cuda.get_device_name()), None)
    # The next step's batch is read while this one computes; the order is the same (a pure function of indices).
    prefetch = BatchPrefetcher(samples, pin=on_gpu)
    data_wait = 0.0  # seconds spent waiting for batches since the last log step
    heartbeat, started_at = Heartbeat(run_dir, dist.get_rank()), state["step"]
    for m in t.models:
        m.train()
    tick = time.perf_counter()
    while state["step"] < train.steps:
        heartbeat.beat(state["step"] + 1, done=False)
        start, count = rank_slice(state["consumed_samples"], train.global_batch, ps.get_data_parallel_rank(), dp)
        last = state["step"] + 1 == train.steps
        batch, waited = prefetch.get(start, count, None if last else start + train.global_batch)
        data_wait += waited
        stepped = train_step(t, batch)
        if "skipped" in stepped:  # fp16: counted for the whole run (checkpoints keep the count), and shown
            state["skipped_steps"] = state.get("skipped_steps", 0) + stepped["skipped"]
            stepped["skipped_steps"] = state["skipped_steps"]
        state["step"] += 1
        state["consumed_samples"] += train.global_batch
        step = state["step"]
        record = {"step": step, **stepped}
        if step % train.eval_every == 0 or step == train.steps:
            record["val_loss"] = evaluate(t, valid)
        logged = step % train.log_every == 0 or "val_loss" in record
        eta = None
        if logged:
            elapsed = time.perf_counter() - tick
            steps_done = step % train.log_every or train.log_every
            tps = tokens_per_step * steps_done / elapsed
            record["tokens_per_s"] = tps
            record["mfu"] = tps * flops_per_token(model_cfg) / (peak * 1e12 * world) if peak else None
            record["peak_mem_gib"] = peak_memory_gib(rss_before_model)
            record["data_wait"] = data_wait / elapsed  # share of step time spent waiting for the input batch
            data_wait = 0.0
            eta = duration(elapsed / steps_done * (train.steps - step))
        metrics.record(record, logged, eta)
        if logged:
            tick = time.perf_counter()
        if train.save_every and (step % train.save_every == 0 or step == train.steps):
            with parameters_gathered(t):
                save_checkpoint(run_dir, t.chunks, t.optimizer,
                                {**state, **described, "scheduler": t.scheduler.state_dict()})
            log(f"checkpoint: step {step}", flush=True)
        heartbeat.beat(step, done=True)
        fault_drill(dist.get_rank(), step, started_at)
    prefetch.close()
    metrics.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        # torchrun shows only the exit code by default; print this rank's traceback where the launcher sees it.
        import traceback

        print(f"[rank {os.environ.get('RANK', '?')}] training failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        raise

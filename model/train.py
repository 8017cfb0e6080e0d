"""The trainer, run under torchrun (one process per rank; gloo ranks on CPU, NCCL on GPU):

    torchrun --nproc-per-node 4 -m model.train runs/x/train_job.json

It reads everything from the run's `train_job.json` (model/run_config.py: the RunConfig, the manifest and where the
weights start), writes `metrics.jsonl` (one line per step, rank 0), TensorBoard scalars in `tensorboard/`
(`tensorboard --logdir runs`) and checkpoints (model/checkpoint.py) beside it. If the run directory has a
checkpoint, training resumes from it: same data order, same losses as an uninterrupted run, and the TensorBoard
curves continue without repeating the steps the crashed run logged after that checkpoint.

Read `main` top to bottom: set up (config, process groups, data, model), resume, then the loop. The loss is in
model/loss.py, what a step reports in model/metrics.py, evaluating a saved checkpoint in model/eval_checkpoint.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from model import compat
from model.checkpoint import (latest_checkpoint, load_checkpoint, manifest_tokenizer, read_train_state,
                              save_checkpoint)
from model.config import ModelConfig, ParallelConfig, TrainConfig
from model.data import BatchPrefetcher, TrainSamples, rank_slice, validation_rows
from model.loss import run_batches
from model.metrics import Heartbeat, MetricsLogger, StepClock, mfu_peak
from model.run_config import RunConfig, Start, TrainJob
from tasks.lib.manifest import ShardManifest


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


def model_config(config: RunConfig, manifest: ShardManifest, where: str) -> ModelConfig:
    """The preset with its overrides; the sequence length comes from the data, and so does the vocabulary unless
    the model has its own (one started from a checkpoint, whose tokenizer may have fewer ids than its table)."""
    overrides = config.model_overrides
    if overrides.get("seq_len", manifest.seq_len) != manifest.seq_len:
        raise ValueError(f"model seq_len {overrides['seq_len']} does not match the data's {manifest.seq_len} "
                         f"({where})")
    vocab = overrides.get("vocab_size", manifest.vocab_size)
    if vocab < manifest.vocab_size:
        raise ValueError(f"model vocab_size {vocab} is smaller than the data's tokenizer ({manifest.vocab_size} "
                         f"ids, {where}): tokenize with the model's own tokenizer")
    return config.model(vocab_size=vocab, seq_len=manifest.seq_len)


def layout_line(parallel: ParallelConfig, train: TrainConfig, dp: int, on_gpu: bool) -> str:
    """The layout, device, precision and communication a run (or an evaluation) uses, as rank 0 prints it."""
    return (f"layout: world {dist.get_world_size()} = TP {parallel.tensor_parallel} x PP "
            f"{parallel.pipeline_parallel} x DP {dp}"
            f"{' (sequence parallel)' if parallel.uses_sequence_parallel else ''}"
            f"{f' (interleaved, {parallel.virtual_pipeline} chunks per rank)' if parallel.virtual_pipeline else ''}; "
            f"{'GPU (NCCL)' if on_gpu else 'CPU (gloo, Megatron-Core via model/compat.py)'}, "
            f"{train.precision}{f' ({train.fp8_recipe} recipe)' if train.precision == 'fp8' else ''}, "
            f"gradients reduced in {train.grad_reduce_dtype}"
            + "".join(f", {name.replace('_', ' ')}" for name in ("distributed_optimizer", "overlap_grad_reduce",
                                                                 "overlap_param_gather") if getattr(train, name))
            + (f"; quantization-aware training on the {train.qat} grid" if train.qat else ""))


def setup(job: TrainJob) -> tuple[ModelConfig, TrainConfig, int]:
    """The model and the device's train settings, checked; the process groups. Returns them and the DP size."""
    on_gpu = torch.cuda.is_available()
    train = job.config.train.for_device(on_gpu)
    if train.precision == "fp8":
        from model.gpt import check_fp8_available

        check_fp8_available()
    model_cfg = model_config(job.config, ShardManifest.load(job.manifest), job.manifest)
    dp = init_distributed(job.config.parallel, train, on_gpu)
    job.config.parallel.check_schedule(model_cfg, train, dp)
    if dist.get_rank() == 0:
        print(layout_line(job.config.parallel, train, dp, on_gpu), flush=True)
    return model_cfg, train, dp


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
    if train.qat:
        from model.qat import apply_qat

        for chunk in chunks:
            apply_qat(chunk, train.qat)
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


def gradient_traffic(t: Training, dp: int) -> str:
    """What data-parallel gradient reduction moves each step, from the DDP's own buckets: their bytes (in the
    reduction dtype) and what one rank sends in a ring (reduce-scatter with the distributed optimizer, else
    all-reduce, twice that)."""
    buckets = [b for m in t.models for buffer in m.buffers + m.expert_parallel_buffers for b in buffer.buckets]
    size = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buckets)
    sent = size * (dp - 1) / dp * (1 if t.train.distributed_optimizer else 2)
    dtype = str(buckets[0].grad_data.dtype).removeprefix("torch.") if buckets else None
    return (f"gradient reduction: {len(buckets)} bucket(s), {size / 2**20:.2f} MiB in {dtype}; each step sends "
            f"{sent / 2**20:.2f} MiB per rank")


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


def validation_loss(t: Training, valid: dict[str, torch.Tensor]) -> float:
    for m in t.models:
        m.eval()
    with torch.no_grad(), parameters_gathered(t):
        loss = run_batches(t.models, valid, t.train.micro_batch, t.model_cfg, forward_only=True)
    for m in t.models:
        m.train()
    return loss


def resume_or_init(t: Training, run_dir: Path, start: Start, log) -> tuple[dict, int]:
    """Load the run's latest checkpoint (weights, optimizer, schedule, data position), or the weights `start`
    names for a new run that starts from another's. Returns (train state, TensorBoard step offset)."""
    state = {"step": 0, "consumed_samples": 0}
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        saved_with = read_train_state(checkpoint).get("distributed_optimizer", False)
        if saved_with != t.train.distributed_optimizer:  # the two optimizers save their states differently
            raise ValueError(f"{checkpoint} was saved with distributed_optimizer {saved_with}; resume with train: "
                             f"{{distributed_optimizer: {str(saved_with).lower()}}}, or start a new run from its "
                             f"weights")
        state = load_checkpoint(checkpoint, t.chunks, t.optimizer)
        t.scheduler.load_state_dict(state["scheduler"])
        log(f"resumed from {checkpoint} at step {state['step']}")
    elif start.checkpoint:
        loaded = load_checkpoint(Path(start.checkpoint), t.chunks)
        log(f"initialised from {start.checkpoint} (step {loaded['step']} of its run)")
    # TensorBoard's step axis counts from the first run of the model's lineage: a run started from a checkpoint
    # (continued pretraining, SFT) draws its curves after that checkpoint's own.
    offset = 0
    if start.checkpoint:
        parent = read_train_state(Path(start.checkpoint))
        offset = parent.get("step_offset", 0) + parent["step"]
    return state, offset


def described(job: TrainJob, model_cfg: ModelConfig, t: Training, offset: int) -> dict:
    """What a checkpoint records beside its step, so it can be used without this job (export, evaluation,
    lineage): the model, the data, where the weights started, the optimizer's settings in use, the tokenizer,
    and an imported model's original Hugging Face config (export starts from it)."""
    group = t.optimizer.param_groups[0]
    parent = read_train_state(Path(job.start.checkpoint)) if job.start.checkpoint else {}
    return {"preset": job.config.preset, "model": dataclasses.asdict(model_cfg),
            "manifest": str(Path(job.manifest).resolve()), "start": job.start.model_dump(), "inputs": job.inputs,
            "distributed_optimizer": t.train.distributed_optimizer, "step_offset": offset,
            "dtype": "bf16" if t.train.precision == "fp8" else t.train.precision,  # the weights' (fp8 keeps bf16)
            "qat": t.train.qat,  # the grid the weights were trained for: quantize the export with it
            "optimizer": {"betas": list(group["betas"]), "weight_decay": group["weight_decay"],
                          "grad_clip": t.train.grad_clip},
            "tokenizer": manifest_tokenizer(job.manifest),
            **{key: parent[key] for key in ("hf_config",) if key in parent}}


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path, help="the run's train_job.json (model/run_config.py)")
    job_file = parser.parse_args(argv).job
    job, run_dir = TrainJob.read(job_file), job_file.parent
    model_cfg, train, dp = setup(job)
    from megatron.core import parallel_state as ps

    rank0 = dist.get_rank() == 0
    log = (lambda message: print(message, flush=True)) if rank0 else (lambda message: None)
    # Data is read before the model is built so that, on CPU, its host memory is not counted as training memory
    # (on GPU it lives in host memory too, outside the CUDA allocator's peak).
    valid = validation_batch(job.manifest, train)
    samples = TrainSamples(job.manifest, seed=train.seed)
    clock = StepClock(train, model_cfg, mfu_peak(train), rss_before_model=psutil.Process().memory_info().rss)
    t = build(model_cfg, job.config.parallel, train)
    log(f"model: {job.config.preset} {model_cfg.num_parameters() / 1e6:.1f}M parameters, {t.attention} attention; "
        f"adam betas {tuple(t.optimizer.param_groups[0]['betas'])}")
    if dp > 1:
        log(gradient_traffic(t, dp))
    state, offset = resume_or_init(t, run_dir, job.start, log)
    description = described(job, model_cfg, t, offset)
    metrics = MetricsLogger(run_dir, state["step"], offset, train.steps, enabled=rank0)
    # The next step's batch is read while this one computes; the order is the same (a pure function of indices).
    prefetch = BatchPrefetcher(samples, pin=torch.cuda.is_available())
    heartbeat = Heartbeat(run_dir, dist.get_rank())
    for m in t.models:
        m.train()
    while state["step"] < train.steps:
        heartbeat.beat(state["step"] + 1, done=False)
        start, count = rank_slice(state["consumed_samples"], train.global_batch, ps.get_data_parallel_rank(), dp)
        last = state["step"] + 1 == train.steps
        batch, waited = prefetch.get(start, count, None if last else start + train.global_batch)
        record = train_step(t, batch)
        if "skipped" in record:  # fp16: counted for the whole run (checkpoints keep the count), and shown
            state["skipped_steps"] = record["skipped_steps"] = state.get("skipped_steps", 0) + record["skipped"]
        state["step"] += 1
        state["consumed_samples"] += train.global_batch
        step = state["step"]
        record = {"step": step, **record}
        if step % train.eval_every == 0 or step == train.steps:
            record["val_loss"] = validation_loss(t, valid)
        metrics.record(record, *clock.tick(record, waited, dist.get_world_size()))
        if train.save_every and (step % train.save_every == 0 or step == train.steps):
            with parameters_gathered(t):
                save_checkpoint(run_dir, t.chunks, t.optimizer,
                                {**state, **description, "scheduler": t.scheduler.state_dict()})
            log(f"checkpoint: step {step}")
        heartbeat.beat(step, done=True)
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

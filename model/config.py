"""Typed configs for the model, its parallel layout and training. Presets derive from the tiny debug base."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, model_validator


VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-architecture decoder: RoPE, RMSNorm, SwiGLU, no biases; input and output embeddings untied unless
    `tie_embeddings` (as some imported models have them, model/import_hf.py)."""

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # grouped-query attention when < num_attention_heads; None = MHA
    ffn_hidden_size: int = 352  # SwiGLU inner width (Llama uses ~8/3 x hidden, rounded)
    vocab_size: int = 8192  # the tokenizer's ids; the embedding tables hold `padded_vocab_size` rows
    seq_len: int = 256
    rotary_base: int | float = 10_000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    tie_embeddings: bool = False

    def __post_init__(self):
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                            f"{self.num_attention_heads}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                            f"num_query_groups {groups}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output tables: the vocabulary rounded up to a multiple of 128, so that every
        power-of-two tensor-parallel size up to 128 splits them evenly and a checkpoint loads at any TP. The padded
        rows are never a target: training masks them out of the softmax, and export drops them."""
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def num_parameters(self) -> int:
        """Exact parameter count of the architecture (unpadded vocabulary)."""
        h, f, v, layers = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        head_dim = h // self.num_attention_heads
        kv = (self.num_query_groups or self.num_attention_heads) * head_dim
        attention = h * (h + 2 * kv) + h * h  # fused QKV projection + output projection
        mlp = 3 * h * f  # gate, up and down projections
        norms = 2 * h
        embeddings = (1 if self.tie_embeddings else 2) * v * h  # input embedding and output layer
        return layers * (attention + mlp + norms) + embeddings + h  # + final norm


def tiny(**overrides) -> ModelConfig:
    """Trains on a laptop CPU in minutes; the same code path as 7b."""
    return dataclasses.replace(ModelConfig(), **overrides)


def llama2_7b(**overrides) -> ModelConfig:
    """Llama-2-7B shape: 32 layers, hidden 4096, 32 heads, FFN 11008, context 4096, vocab 32000 (~6.74B params)."""
    return dataclasses.replace(tiny(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
                                    vocab_size=32000, seq_len=4096), **overrides)


def imported(**fields) -> ModelConfig:
    """A model imported from Hugging Face (model/import_hf.py): its checkpoint records every field."""
    return ModelConfig(**fields)


PRESETS = {"tiny": tiny, "7b": llama2_7b, "hf": imported}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are laid out: world size = tensor x pipeline x data parallel."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Split the sequence across the tensor-parallel ranks outside attention and the MLP (norms, residuals), where
    # TP alone keeps every activation whole on each rank. None: on whenever tensor_parallel > 1.
    sequence_parallel: bool | None = None
    # Interleaved pipeline: model chunks per pipeline rank (Megatron's interleaved 1F1B schedule), which shrinks the
    # pipeline bubble by this factor. None: one chunk (plain 1F1B).
    virtual_pipeline: int | None = None

    @property
    def uses_sequence_parallel(self) -> bool:
        return self.tensor_parallel > 1 and self.sequence_parallel is not False

    def __post_init__(self):
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("sequence_parallel needs tensor_parallel > 1 (it splits the sequence across the "
                             "tensor-parallel ranks); drop it or raise tp")
        if self.virtual_pipeline is not None and (self.virtual_pipeline < 2 or self.pipeline_parallel < 2):
            raise ValueError(f"virtual_pipeline {self.virtual_pipeline} needs pipeline_parallel > 1 and at least 2 "
                             f"chunks per rank; drop it, or raise pp")

    @property
    def chunks(self) -> int:
        return self.virtual_pipeline or 1

    def check_split(self, m: ModelConfig) -> None:
        """Refuse a layout the model cannot be split into (its heads, query groups, FFN and vocabulary across TP
        ranks, its layers across pipeline stages and chunks), naming every field that does not divide."""
        tp, stages = self.tensor_parallel, self.pipeline_parallel * self.chunks
        problems = [f"{name} {value} is not divisible by tensor_parallel {tp}" for name, value in (
            ("num_attention_heads", m.num_attention_heads), ("num_query_groups", m.num_query_groups or
                                                             m.num_attention_heads),
            ("ffn_hidden_size", m.ffn_hidden_size), ("padded vocabulary", m.padded_vocab_size)) if value % tp]
        if m.num_layers % stages:
            problems.append(f"num_layers {m.num_layers} is not divisible by pipeline_parallel x virtual_pipeline = "
                            f"{self.pipeline_parallel} x {self.chunks}")
        if problems:
            raise ValueError("cannot lay this model out: " + "; ".join(problems) + ". Change the layout or the model")

    def check_schedule(self, m: ModelConfig, train: TrainConfig, data_parallel: int) -> None:
        """Refuse, before launch, what the layout and the pipeline schedule cannot run (the model's split, the
        micro-batches of a training step and of an evaluation), naming the setting to change."""
        from model.qat import check_qat

        self.check_split(m)
        check_qat(train.qat, m, self)
        step = train.global_batch // (data_parallel * train.micro_batch)
        for what, micro_batches in (("the global batch", step), ("eval_batches", train.eval_batches)):
            if self.virtual_pipeline and micro_batches % self.pipeline_parallel:
                raise ValueError(f"the interleaved schedule needs a multiple of pipeline_parallel "
                                 f"({self.pipeline_parallel}) micro-batches per step; {what} makes {micro_batches}. "
                                 f"Change global_batch, micro_batch or eval_batches")

    def data_parallel(self, world_size: int) -> int:
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = "
                             f"{self.tensor_parallel} x {self.pipeline_parallel}; change --nproc-per-node or the layout")
        return world_size // model_parallel


PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
FP8_RECIPES = ("delayed", "tensorwise")


class TrainConfig(BaseModel):
    """How one run trains: optimizer, schedule, batches, evaluation, checkpoints, precision and data-parallel
    communication. A deployment sets any field (`run: {train: {...}}`); the trainer reads it from the run's
    `train_job.json` (model/run_config.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    steps: int = 200
    global_batch: int = 16
    """Sequences per optimizer step, across data-parallel ranks and micro-batches."""
    micro_batch: int = 4
    """Sequences per forward/backward on one rank."""
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    """Checkpoint every this many steps and at the last step; 0: no checkpoints (benchmarks)."""
    recompute_activations: bool = False
    attention_backend: str = "auto"
    """auto | te | sdpa | local (model/gpt.py); auto = te if installed, else sdpa."""
    precision: str | None = None
    """fp32 | bf16 | fp16 | fp8; None: the device's default (bf16 on GPU, fp32 on CPU). bf16 and fp16 keep
    parameters and activations in 16 bits with fp32 master weights in the optimizer; fp16 adds Megatron's dynamic
    loss scaler (the settings below); fp8 runs the linear layers' matmuls in fp8 through Transformer Engine (bf16
    parameters), recipe `fp8_recipe`."""
    fp8_recipe: str = "delayed"
    """delayed | tensorwise: Megatron-Core's fp8 scaling recipes."""
    initial_loss_scale: float = 2.0**32
    """fp16: Megatron's defaults; the scale halves after `hysteresis` overflowing steps (which are skipped) and
    doubles after `loss_scale_window` clean ones."""
    loss_scale_window: int = 1000
    hysteresis: int = 2
    distributed_optimizer: bool | None = None
    """ZeRO-1: optimizer state and master weights sharded over DP ranks. None: on for GPU, off for CPU (also the
    two overlaps below); any of them can be turned on on CPU."""
    overlap_grad_reduce: bool | None = None
    """Reduce gradient buckets during backward, not after it."""
    overlap_param_gather: bool | None = None
    """All-gather updated parameters during the next forward."""
    grad_reduce_dtype: str = "fp32"
    """fp32 | bf16: bf16 halves gradient communication (and accumulates in bf16)."""
    peak_tflops: float | None = None
    """One accelerator's dense peak TFLOP/s at this precision, for MFU; None: the known GPUs' figures."""
    qat: str | None = None
    """Quantization-aware training (model/qat.py): a scheme of model/quantize.py (int8, int4-g32, int4-g64,
    int4-g128) whose grid the decoder's linear weights are fake-quantized to in every forward pass; the export
    quantized with the same scheme is the deliverable. None: off."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        problems = []
        if self.warmup_steps >= self.steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.global_batch % self.micro_batch:
            problems.append(f"global_batch ({self.global_batch}) must be a multiple of micro_batch "
                            f"({self.micro_batch})")
        if self.attention_backend not in ("auto", "te", "sdpa", "local"):
            problems.append(f"attention_backend {self.attention_backend!r} must be one of auto, te, sdpa, local")
        if self.precision not in (None, *PRECISIONS):
            problems.append(f"precision {self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.fp8_recipe not in FP8_RECIPES:
            problems.append(f"fp8_recipe {self.fp8_recipe!r} must be one of {', '.join(FP8_RECIPES)}")
        if self.initial_loss_scale <= 0 or self.loss_scale_window < 1 or self.hysteresis < 1:
            problems.append("initial_loss_scale must be positive, loss_scale_window and hysteresis at least 1")
        if self.grad_reduce_dtype not in ("fp32", "bf16"):
            problems.append(f"grad_reduce_dtype {self.grad_reduce_dtype!r} must be fp32 or bf16")
        elif self.grad_reduce_dtype == "bf16" and self.precision in ("fp32", "fp16"):
            problems.append(f"grad_reduce_dtype bf16 needs bf16 parameters; set precision bf16 or grad_reduce_dtype "
                            f"fp32 ({self.precision} parameters reduce their gradients in fp32)")
        if self.overlap_param_gather and self.distributed_optimizer is False:
            problems.append("overlap_param_gather needs distributed_optimizer (it gathers the optimizer's "
                            "parameter shards); set distributed_optimizer true or overlap_param_gather false")
        for name in ("log_every", "eval_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.save_every < 0:
            problems.append(f"save_every ({self.save_every}) must be at least 1, or 0 for no checkpoints")
        if not 0 <= self.min_lr <= self.lr:
            problems.append(f"min_lr ({self.min_lr}) must be between 0 and lr ({self.lr})")
        if self.qat is not None:
            from model.quantize import SCHEMES

            choices = [name for name, scheme in SCHEMES.items() if not scheme.packed and not scheme.calibrated]
            if self.qat not in choices:
                problems.append(f"qat {self.qat!r} must be one of {', '.join(choices)} (or null: off)")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        return self

    def replace(self, **changes) -> TrainConfig:
        """A copy with `changes`, validated again."""
        return TrainConfig(**{**self.model_dump(), **changes})

    def over(self, defaults: TrainConfig) -> TrainConfig:
        """`defaults` with the fields given explicitly here on top: a deployment that sets `steps` keeps the rest
        of a stage's defaults (SFT's learning rate, for one)."""
        return defaults.replace(**self.model_dump(include=self.model_fields_set))

    def for_device(self, gpu: bool) -> TrainConfig:
        """These settings with the device's defaults in place of None (validated again): everything on for a GPU,
        off for the CPU; on a GPU overlap_param_gather follows distributed_optimizer, which it needs."""
        resolved = {name: gpu for name in ("distributed_optimizer", "overlap_grad_reduce")
                    if getattr(self, name) is None}
        resolved["precision"] = self.precision or ("bf16" if gpu else "fp32")
        if self.overlap_param_gather is None:
            resolved["overlap_param_gather"] = gpu and resolved.get("distributed_optimizer", self.distributed_optimizer)
        return self.replace(**resolved)

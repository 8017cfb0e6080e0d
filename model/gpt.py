"""Build the Llama-shaped decoder as a Megatron-Core GPTModel.

The attention backend is chosen here and only here (`TrainConfig.attention_backend`):
- `local`: Megatron-Core's own `DotProductAttention`, which materialises the `[b, heads, s, s]` scores;
- `sdpa`: `SDPAttention` below, PyTorch's `scaled_dot_product_attention` (FlashAttention / cuDNN / memory-efficient
  kernels on GPU, none of which keep the scores);
- `te`: Transformer Engine's layer spec, when `transformer_engine` imports and CUDA is present;
- `auto`: te if available, else sdpa.
Core attention has no parameters, so a checkpoint saved with one backend loads with any other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model import compat

compat.import_megatron()  # first: on CPU, without the compiler stack its torch.compile decorators would import

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402

from model.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402


class SDPAttention(MegatronModule):
    """Megatron core attention (the `DotProductAttention` interface: `[s, b, heads, d]` in, `[s, b, heads * d]`
    out) computed by `torch.nn.functional.scaled_dot_product_attention`. Causal attention passes `is_causal`
    and builds no mask; a given mask (True = blocked, as Megatron's) is inverted for SDPA, which keeps packed SFT
    examples apart; grouped-query attention uses SDPA's `enable_gqa` instead of repeating keys and values."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.attn_mask_type = attn_mask_type
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPAttention takes neither attention_bias nor packed_seq_params; "
                                      "use attention_backend: te for those")
        seq, batch = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if attention_mask is None else ~attention_mask,
            dropout_p=self.dropout if self.training else 0.0, is_causal=causal and attention_mask is None,
            scale=self.scale, enable_gqa=self.heads != self.groups)
        return context.permute(2, 0, 1, 3).reshape(seq, batch, -1)  # [b, n, s, d] -> [s, b, n * d]


# Parameters' dtype per precision: fp8 keeps bf16 parameters (Transformer Engine casts to fp8 inside its matmuls).
PARAMS_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def check_fp8_available() -> None:
    """precision fp8 runs through Transformer Engine on a GPU of compute capability 8.9 or newer (Ada, Hopper,
    Blackwell). Megatron-Core would silently run bf16 without it: refuse instead, saying what is missing."""
    if not torch.cuda.is_available():
        raise ValueError("precision fp8 needs a GPU with fp8 tensor cores (compute capability 8.9 or newer: L4, "
                         "L40, H100, H200, B200) and Transformer Engine; this machine has no CUDA device. Set "
                         "precision bf16 (or fp32 on CPU)")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ValueError(f"precision fp8 needs compute capability 8.9 or newer; {torch.cuda.get_device_name()} is "
                         f"{major}.{minor}. Set precision bf16 (or fp16 on GPUs without bf16)")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as err:
        raise ValueError(f"precision fp8 runs through Transformer Engine, which does not import here ({err}): "
                         f"install it (pip install --no-build-isolation transformer_engine[pytorch], matching "
                         f"your CUDA), or set precision bf16") from None


def resolve_attention_backend(requested: str) -> str:
    """`auto` -> te where Transformer Engine imports and CUDA is present, else sdpa; te without them fails.
    `requested` is a TrainConfig's, whose validation already refused other names."""
    te_usable = torch.cuda.is_available()
    if te_usable:
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            te_usable = False
    if requested == "te" and not te_usable:
        raise ValueError("attention_backend te needs CUDA and Transformer Engine (`import transformer_engine` "
                         "failed or no GPU); set attention_backend to sdpa or auto")
    if requested == "auto":
        return "te" if te_usable else "sdpa"
    return requested


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm behind Megatron's norm interface, usable with sequence parallelism. Megatron-Core's own torch
    fallback refuses it: with the sequence split over the TP ranks, each rank's weight gradient covers only its
    part, so the weight is marked `sequence_parallel` and finalize_model_grads all-reduces its gradient over TP (as
    Transformer Engine's and Apex's norms do). Same parameter and checkpoint key as the fallback."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(backend: str, config: TransformerConfig, vp_stage: int | None = None):
    """The transformer block's spec for a resolved attention backend: this pipeline stage's layers and the final
    norm."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    if backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=RMSNorm)


def transformer_config(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig) -> TransformerConfig:
    dtype = PARAMS_DTYPE[train.precision or "fp32"]
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        # Llama: RMSNorm, SwiGLU (gated SiLU), no biases, no dropout.
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        sequence_parallel=parallel.uses_sequence_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        # Batched isend/irecv for pipeline messages on NCCL; on gloo (CPU) the interleaved schedule's batched
        # messages gave micro-batches 3 and 4 of a step wrong activations (measured), separate ones are exact.
        batch_p2p_comm=torch.cuda.is_available(),
        # Pipeline schedules exchange activations of this dtype between stages.
        pipeline_dtype=dtype,
        bf16=train.precision in ("bf16", "fp8"),
        fp16=train.precision == "fp16",
        params_dtype=dtype,
        # fp8: e4m3 forward, e5m2 gradients ("hybrid", the usual training format), scaled by the chosen recipe.
        **({"fp8": "hybrid", "fp8_recipe": train.fp8_recipe} if train.precision == "fp8" else {}),
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity="full" if train.recompute_activations else None,
        recompute_method="uniform" if train.recompute_activations else None,
        recompute_num_layers=1 if train.recompute_activations else None,
    )


def build_model(model: ModelConfig, config: TransformerConfig, *, pre_process: bool, post_process: bool,
                attention_backend: str = "sdpa", vp_stage: int | None = None) -> GPTModel:
    """One pipeline stage's share of the model (all of it when pipeline_parallel == 1); `attention_backend` is
    a resolved one (`resolve_attention_backend`)."""
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(attention_backend, config, vp_stage),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,  # Llama-2 unties them; some imports tie them
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    )
    # Without Transformer Engine or Apex the norms are torch's, which ignore params_dtype and stay fp32. Cast the
    # whole stage, as Megatron-LM's Float16Module does: its mixed-precision optimizer keeps fp32 master copies of
    # 16-bit parameters only, and its checkpoints cannot name a parameter left in fp32.
    if config.params_dtype != torch.float32:
        gpt.to(config.params_dtype)
    return gpt

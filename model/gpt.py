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
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from model.config import ModelConfig, ParallelConfig, TrainConfig


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


def layer_spec(backend: str):
    """The transformer layer spec of a resolved attention backend."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def transformer_config(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig) -> TransformerConfig:
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
        # Pipeline schedules exchange activations of this dtype between stages.
        pipeline_dtype=torch.bfloat16 if train.bf16 else torch.float32,
        bf16=train.bf16,
        params_dtype=torch.bfloat16 if train.bf16 else torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity="full" if train.recompute_activations else None,
        recompute_method="uniform" if train.recompute_activations else None,
        recompute_num_layers=1 if train.recompute_activations else None,
    )


def build_model(model: ModelConfig, config: TransformerConfig, *, pre_process: bool, post_process: bool,
                attention_backend: str = "sdpa") -> GPTModel:
    """One pipeline stage's share of the model (all of it when pipeline_parallel == 1); `attention_backend` is
    a resolved one (`resolve_attention_backend`)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(attention_backend),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,  # Llama-2 unties them; some imports tie them
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
    )

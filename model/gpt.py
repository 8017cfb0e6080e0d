"""Build the Llama-shaped decoder as a Megatron-Core GPTModel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from model.config import ModelConfig, ParallelConfig, TrainConfig


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


def build_model(model: ModelConfig, config: TransformerConfig, *, pre_process: bool, post_process: bool) -> GPTModel:
    """One pipeline stage's share of the model (all of it when pipeline_parallel == 1)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,  # Llama unties input and output embeddings
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
    )

"""The loss: forward (and backward) of a batch's micro-batches through Megatron's pipeline schedule, with the
per-token cross-entropy masked as the data says (SFT replies only, packed examples kept apart, a padded
vocabulary's extra columns out of the softmax). Used by training, evaluation and checkpoint evaluation."""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.config import ModelConfig


def segment_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean mask, True where attention is blocked: causal, and never across packed examples."""
    s = segments.shape[1]
    future = torch.ones(s, s, dtype=torch.bool, device=segments.device).triu(1)
    other_example = segments[:, :, None] != segments[:, None, :]
    return (future | other_example).unsqueeze(1)


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

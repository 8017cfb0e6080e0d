"""Memory planner: per-GPU memory of candidate TP/PP/DP/micro-batch layouts, and a recommendation.

    python -m model.memory_plan --preset 7b --gpus 8 --gpu-mem-gib 80

Estimates, per GPU of the most loaded pipeline stage:
  weights      2 B/param in bf16 and fp16, 3 in fp8 (bf16 and an fp8 copy), 4 in fp32
  gradients    4 B/param (Megatron reduces gradients in fp32)
  optimizer    Adam moments (8 B/param) + fp32 master weights in bf16 (4 B), divided by DP with the distributed
               optimizer
  activations  what autograd keeps per layer for this architecture (RMSNorm, SwiGLU, RoPE, no dropout, no biases,
               per token, in elements of the training dtype; counted with saved-tensor hooks on Megatron's
               local-spec layers:
                 6h (6h/t)     each RMSNorm keeps its input, the normalised input and its output (split over the
                               TP ranks with sequence parallelism, the default at TP > 1)
                 (3h + 3kv)/t  the fused QKV output, q and k after RoPE, and the attention context
                               (kv = query groups x head dim)
                 5f/t          SwiGLU: the fused gate/up output (2f), silu(gate) and the product
                 a*s/t         softmax probabilities, with the local attention backend only (it materialises
                               them); with sdpa or te the flash kernels keep one fp32 logsumexp per head, 4a/t bytes
               plus, during backward, one layer's worth of activation gradients (two layers' worth with full
               recompute, where only each layer's input, h, is kept between layers).
               The first 1F1B stage holds min(PP, micro-batches) micro-batches in flight.
               With the interleaved schedule (v chunks per rank of L/(p v) layers each) the first rank holds
               (p-1) x 2 + (v-1) x p + 1 chunk forwards at once (Megatron's warm-up) instead.
  logits       the vocab shard's logits in the training dtype plus their fp32 softmax, which the cross-entropy
               keeps for backward (on CPU in fp32 that is one tensor, computed in place)
  runtime      fixed per process: CUDA context, NCCL buffers and allocator fragmentation on GPU (2 GiB); on CPU
               the allocator's arenas, gloo buffers and kernels loaded on first use (0.05 GiB, measured on the tiny
               preset: tests/test_plan.py compares the whole estimate with measured peaks)
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

from model.config import ModelConfig, preset

GIB = 1024**3
RUNTIME_OVERHEAD_GIB = {"gpu": 2.0, "cpu": 0.05}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    recompute: bool
    distributed_optimizer: bool
    sequence_parallel: bool = False  # the norms' activations (and recompute's kept layer inputs) split over TP
    virtual_pipeline: int | None = None  # model chunks per pipeline rank (the interleaved schedule)


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits


def stage_parameters(m: ModelConfig, tp: int, pp: int) -> float:
    """Parameters on one GPU of the heaviest pipeline stage (embedding or output layer plus its layers)."""
    h, v = m.hidden_size, m.padded_vocab_size
    tables = 1 if m.tie_embeddings else 2
    per_layer = (m.num_parameters() - tables * m.vocab_size * h - h) / m.num_layers
    layers = -(-m.num_layers // pp)
    # With PP the first stage holds the embedding and the last the output layer (a copy of it, when tied).
    embedding_or_output = v * h if pp > 1 else tables * v * h
    return (layers * per_layer + embedding_or_output) / tp


def estimate(m: ModelConfig, layout: Layout, global_batch: int, precision: str = "bf16",
             attention: str = "sdpa") -> Estimate:
    """Model state, activations and logits of one GPU or CPU process at a precision (fp32, bf16, fp16, fp8); the
    runtime is not included. fp16 costs what bf16 does (its loss scaler is a few scalars); fp8 keeps bf16
    parameters plus an fp8 copy of each weight for its matmuls (1 B/param), and is counted with bf16 activations
    (an upper bound: Transformer Engine saves some linear inputs in fp8).
    `attention`: the resolved attention backend (model/gpt.py): local keeps the s x s scores, sdpa and te do not."""
    t, p, b, s, h, a = layout.tp, layout.pp, layout.micro_batch, m.seq_len, m.hidden_size, m.num_attention_heads
    kv = (m.num_query_groups or a) * (h // a)
    params = stage_parameters(m, t, p)
    bf16 = precision != "fp32"
    width = 2 if bf16 else 4
    weights = params * (width + (1 if precision == "fp8" else 0))
    grads = params * 4
    optimizer = params * (12 if bf16 else 8)
    if layout.distributed_optimizer:
        optimizer /= layout.dp
    layers = -(-m.num_layers // p)
    tokens = s * b
    scores = a * s / t * width if attention == "local" else a / t * 4
    sp = t if layout.sequence_parallel else 1  # sequence parallelism splits what TP alone keeps whole
    full_layer = tokens * ((6 * h / sp + (3 * h + 3 * kv) / t + 5 * m.ffn_hidden_size / t) * width + scores)
    microbatches = global_batch // (layout.dp * b)
    in_flight = min(p, microbatches)
    if layout.virtual_pipeline:  # the first rank's warm-up runs this many chunk forwards before a backward
        v = layout.virtual_pipeline
        layers = -(-m.num_layers // (p * v))
        in_flight = min((p - 1) * 2 + (v - 1) * p + 1, microbatches * v)
    if layout.recompute:
        activations = tokens * h / sp * width * layers * in_flight + 2 * full_layer
    else:
        activations = full_layer * (layers * in_flight + 1)
    logits = tokens * m.padded_vocab_size / t * (4 + (width if bf16 else 0))
    return Estimate(layout, weights, grads, optimizer, activations, logits)


def candidates(m: ModelConfig, gpus: int, global_batch: int, on_gpu: bool = True) -> list[Layout]:
    out = []
    for tp, pp in itertools.product([1, 2, 4, 8], [1, 2, 4, 8]):
        if gpus % (tp * pp) or m.num_attention_heads % tp or m.num_layers % pp:
            continue
        dp = gpus // (tp * pp)
        for micro, recompute in itertools.product([1, 2, 4], [False, True]):
            if global_batch % (dp * micro):
                continue
            out.append(Layout(tp, pp, dp, micro, recompute, distributed_optimizer=on_gpu and dp > 1,
                              sequence_parallel=tp > 1))
    return out


def recommend(m: ModelConfig, gpus: int, gpu_mem_gib: float, global_batch: int,
              attention: str = "sdpa", precision: str = "bf16") -> tuple[Estimate | None, list]:
    """The fitting layout with the least model parallelism, then no recompute, then the largest micro-batch."""
    budget = (gpu_mem_gib - RUNTIME_OVERHEAD_GIB["gpu"]) * GIB
    estimates = [estimate(m, layout, global_batch, precision=precision, attention=attention)
                 for layout in candidates(m, gpus, global_batch)]
    fitting = [e for e in estimates if e.total <= budget]
    fitting.sort(key=lambda e: (e.layout.tp * e.layout.pp, e.layout.recompute, -e.layout.micro_batch, e.total))
    return (fitting[0] if fitting else None), estimates


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7b")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=None, help="override the preset's context length")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "te", "local"],
                   help="attention backend (training's attention_backend, resolved); local keeps s x s scores")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp8", "fp32"])
    args = p.parse_args(argv)
    m = preset(args.preset, **({"seq_len": args.seq_len} if args.seq_len else {}))
    best, estimates = recommend(m, args.gpus, args.gpu_mem_gib, args.global_batch, args.attention, args.precision)
    print(f"{args.preset}: {m.num_parameters() / 1e9:.2f}B parameters, seq {m.seq_len}, global batch "
          f"{args.global_batch}, {args.precision}, {args.attention} attention, {args.gpus} GPUs x "
          f"{args.gpu_mem_gib:g} GiB "
          f"({RUNTIME_OVERHEAD_GIB['gpu']:g} GiB reserved for the runtime)\n")
    print(f"{'TP':>3} {'PP':>3} {'DP':>3} {'mb':>3} {'recomp':>6} {'distopt':>7} | {'weights':>8} {'grads':>7} "
          f"{'optim':>7} {'activ':>7} {'logits':>7} | {'GiB/GPU':>8}")
    budget = (args.gpu_mem_gib - RUNTIME_OVERHEAD_GIB["gpu"]) * GIB
    for e in sorted(estimates, key=lambda e: e.total):
        L = e.layout
        mark = "  <- recommended" if e is best else ("" if e.total <= budget else "  (does not fit)")
        print(f"{L.tp:>3} {L.pp:>3} {L.dp:>3} {L.micro_batch:>3} {str(L.recompute):>6} "
              f"{str(L.distributed_optimizer):>7} | {e.weights / GIB:8.1f} {e.grads / GIB:7.1f} "
              f"{e.optimizer / GIB:7.1f} {e.activations / GIB:7.1f} {e.logits / GIB:7.1f} | {e.total / GIB:8.1f}{mark}")
    if best is None:
        raise SystemExit(f"\nno layout fits {args.gpus} x {args.gpu_mem_gib:g} GiB: add GPUs or shorten --seq-len")
    L = best.layout
    print(f"\nrecommended: TP {L.tp} x PP {L.pp} x DP {L.dp}, micro-batch {L.micro_batch}, "
          f"recompute {'on' if L.recompute else 'off'}: {best.total / GIB:.1f} GiB per GPU")


if __name__ == "__main__":
    main()

"""Quantization-aware training: the weights of the decoder's linear layers (Megatron's column- and row-parallel
QKV, attention output, FC1 and FC2) are fake-quantized in every forward pass, on the grid of a scheme of
model/quantize.py, with a straight-through gradient to the full-precision weights the optimizer keeps.

The grid is the one post-training quantization deploys: scales, rounding and clamping are torchao's own
primitives (`choose_qparams_affine`, `quantize_affine`, `dequantize_affine`), called as torchao's
IntxUnpackedToInt8Tensor calls them, so the export of a QAT run quantized with the same scheme holds the weights
the run trained with, bit for bit (tests/test_qat.py). Groups run along a weight's input dimension:
- column-parallel layers (QKV, FC1) hold whole rows on each tensor-parallel rank, so a rank's shard is
  quantized on its own;
- row-parallel layers (attention output, FC2) split each row across the ranks: a group must lie inside one rank's
  part (refused before launch otherwise, `check_qat`), and a per-channel scale (int8) needs the whole row's
  maximum, all-reduced over the tensor-parallel group.

torchao's own QAT swaps `torch.nn.Linear` modules, which Megatron's layers are not; and a parametrization would
rename the weight in the checkpoint. So each layer's forward is wrapped instead: for the length of the call its
`weight` is the fake-quantized tensor, and the parameter is put back after.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig, ParallelConfig
from model.quantize import SCHEMES, Scheme

# Megatron's linear layers that model/quantize.py quantizes (through their Llama names); the output layer and the
# embedding are left in full precision, as there.
QAT_LAYERS = {"self_attention.linear_qkv": "column", "self_attention.linear_proj": "row",
              "mlp.linear_fc1": "column", "mlp.linear_fc2": "row"}


def qat_inputs(m: ModelConfig, tp: int) -> dict[str, int]:
    """Each QAT layer's input size on one tensor-parallel rank: what its groups must tile."""
    full = {"self_attention.linear_qkv": m.hidden_size, "self_attention.linear_proj": m.hidden_size,
            "mlp.linear_fc1": m.hidden_size, "mlp.linear_fc2": m.ffn_hidden_size}
    return {name: size // tp if QAT_LAYERS[name] == "row" else size for name, size in full.items()}


def check_qat(scheme_name: str | None, m: ModelConfig, parallel: ParallelConfig) -> None:
    """Before launch: groups that do not tile a layer's input on one tensor-parallel rank, naming `qat` and the
    layer."""
    if scheme_name is None:
        return
    group = SCHEMES[scheme_name].group_size
    for layer, size in qat_inputs(m, parallel.tensor_parallel).items():
        if group and size % group:
            raise ValueError(f"qat {scheme_name}: groups of {group} weights do not tile {layer}'s input of {size} on "
                             f"each of {parallel.tensor_parallel} tensor-parallel rank(s); choose a smaller group, "
                             f"int8, or another tensor_parallel")


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized weight, exactly. Backward: the gradient, unchanged, to the weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


@torch.no_grad()
def fake_quantized(weight: torch.Tensor, scheme: Scheme, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """`weight` on the scheme's grid (symmetric, one scale per row or per group of a row). `row_max`: each row's
    largest |value| over the whole row, where this tensor holds part of it (a row-parallel shard, per channel)."""
    from torchao.quantization.quant_primitives import (_DTYPE_TO_QVALUE_BOUNDS, MappingType, choose_qparams_affine,
                                                       dequantize_affine, quantize_affine)

    target = getattr(torch, f"int{scheme.bits}")
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[target]
    block = (1, scheme.group_size or weight.shape[1])
    # The scale of a symmetric grid depends on the largest |value| alone: for a whole row split across ranks,
    # the pair (max, -max) gives torchao's formula the same input as the row itself.
    source = torch.stack([row_max, -row_max], dim=1) if row_max is not None else weight
    scale, zero_point = choose_qparams_affine(source, MappingType.SYMMETRIC, block if row_max is None else (1, 2),
                                              target_dtype=torch.int8, quant_min=qmin, quant_max=qmax,
                                              zero_point_dtype=torch.int8, keepdim=True)
    q = quantize_affine(weight, block, scale, zero_point, output_dtype=torch.int8, quant_min=qmin, quant_max=qmax)
    return dequantize_affine(q, block, scale, zero_point, torch.int8, qmin, qmax, output_dtype=weight.dtype)


def quantizer(scheme: Scheme, whole_rows: bool):
    """The weight -> fake-quantized weight map of one layer; `whole_rows` False: a row-parallel shard."""
    from megatron.core import parallel_state

    def quantize(weight: torch.Tensor) -> torch.Tensor:
        row_max = None
        if scheme.group_size is None and not whole_rows and parallel_state.get_tensor_model_parallel_world_size() > 1:
            row_max = weight.detach().abs().amax(dim=1)
            torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX,
                                         group=parallel_state.get_tensor_model_parallel_group())
        return _StraightThrough.apply(weight, fake_quantized(weight.detach(), scheme, row_max))

    return quantize


def qat_modules(model: torch.nn.Module):
    """(name, module, kind) of each layer QAT quantizes in one model chunk."""
    for name, module in model.named_modules():
        for suffix, kind in QAT_LAYERS.items():
            if name.endswith(suffix) and ".layers." in f".{name}":
                yield name, module, kind


def apply_qat(model: torch.nn.Module, scheme_name: str) -> int:
    """Wrap the forward of each QAT layer of one model chunk; returns how many."""
    scheme, count = SCHEMES[scheme_name], 0
    for _, module, kind in qat_modules(model):
        module.forward = _fake_quantizing(module, module.forward, quantizer(scheme, whole_rows=kind == "column"))
        count += 1
    return count


def _fake_quantizing(module: torch.nn.Module, forward, quantize):
    def fake_quantizing_forward(*args, **kwargs):
        weight = module._parameters["weight"]
        module._parameters["weight"] = quantize(weight)  # a tensor, not a Parameter, for this call only
        try:
            return forward(*args, **kwargs)
        finally:
            module._parameters["weight"] = weight

    return fake_quantizing_forward

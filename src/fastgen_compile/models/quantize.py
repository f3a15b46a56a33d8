"""Weight-only quantization: int4 in groups of 32 (Q4_1's layout) and int8 per output channel.

A quantized linear keeps three forms of its weight: the codes and scales PyTorch's CPU kernels
read (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`), and the dense weight rewritten to
the dequantized values, so every kernel a bucket may choose (models/linears.py) computes the
same model. Activations stay in the compute dtype: these kernels only shrink the weights read.

int4 is asymmetric, as Q4_1: per group of 32 inputs w = d * q + m, q in 0..15, d = (max - min) / 15,
m = min. PyTorch's kernel reads w = (q - 8) * scale + zero, so scale = d and zero = m + 8 * d.
A Q4_1 GGUF dequantized to float and quantized again gets back its own codes: each group's min
and max are codes 0 and 15, so d and m come back, up to the rounding of the dequantized values.
int8 is symmetric per output channel (the kernel takes one scale per row): Q8_0's 32-wide blocks
each have their own scale, so a Q8_0 weight is requantized to its rows' largest scale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

GROUP = 32  # int4 inputs per scale: Q4_1's block
INT4_K_TILES = 2  # the packing _weight_int4pack_mm_for_cpu reads
METHODS = ("int4", "int8")


class QuantizedWeight(NamedTuple):
    """A linear weight in every form a kernel reads (a tuple of tensors: a compiled graph takes it as inputs)."""

    dense: torch.Tensor  # (out, in), the dequantized weight in the compute dtype
    codes: torch.Tensor  # int4: (out, in / 2) uint8 packed for the kernel; int8: (out, in) int8
    scales: torch.Tensor  # int4: (in / 32, out, 2) scale and zero per group; int8: (out,); compute dtype
    scales_bf16: torch.Tensor  # the same in bf16, for kernels that run bf16 activations in an fp32 model
    bits: int  # 4 or 8


def quantizable(weight: torch.Tensor | None, method: str) -> bool:
    return weight is not None and weight.dim() == 2 and (method == "int8" or weight.shape[1] % GROUP == 0)


def int4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out, in) int32 in 0..15, scale, zero (out, in / 32) fp32) with w ~ (codes - 8) * scale + zero."""
    out, k = w.shape
    groups = w.float().view(out, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)  # a constant group: every code 0, w = low
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return codes.view(out, k), scale, low + 8 * scale


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, in) int8, scale (out,) fp32) with w ~ codes * scale."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """fp32 weights from int4_groups' (zero given) or int8_rows' (zero None) output."""
    if zero is None:
        return codes.float() * scale[:, None]
    out, k = codes.shape
    return ((codes.view(out, k // GROUP, GROUP).float() - 8) * scale[..., None] + zero[..., None]).view(out, k)


def quantize_weight(weight: torch.Tensor, method: str) -> QuantizedWeight:
    """The weight's quantized forms; weight itself is overwritten with the dequantized values."""
    if method == "int4":
        codes, scale, zero = int4_groups(weight)
        dense = dequantize(codes, scale, zero)
        scales = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (groups, out, 2)
        packed, bits = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_K_TILES), 4
    elif method == "int8":
        packed, scales = int8_rows(weight)
        dense, bits = dequantize(packed, scales, None), 8
    else:
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    with torch.no_grad():
        weight.copy_(dense)
    return QuantizedWeight(weight, packed, scales.to(weight.dtype), scales.to(torch.bfloat16), bits)


def quantize_model(model: nn.Module, layers: str | None, lm_head: str | None) -> None:
    """Quantize the layers' linears and the lm_head in place (module.quantized[name]), each by its
    method (None: stays dense). A weight whose input size is not a multiple of the group, or an
    expert stack (3-D), stays dense."""
    from fastgen_compile.models.decoder import LINEARS  # decoder imports QuantizedWeight from here

    for module, names, method in [(layer, LINEARS, layers) for layer in model.layers] + [(model, ("lm_head",), lm_head)]:
        for name in names:
            weight = getattr(module, name)
            if method is not None and quantizable(weight, method):
                module.quantized[name] = quantize_weight(weight, method)

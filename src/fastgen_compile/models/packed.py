"""Linear layers through oneDNN with their weights packed once (CPU, bf16).

torch's bf16 matmul on CPU hands oneDNN a plain weight, which it reorders into its blocked
layout on every call: for a 32-row decode step that reorder streams every weight twice
more and costs about a third of the linears' time (docs/architecture.md). Packed once,
the weight is an opaque mkldnn tensor, which a compiled graph cannot take as an input. So
the graph calls `fastgen::packed_linear` with the layer's plain weight, and the op looks
up the packed copy made for it.
"""

from __future__ import annotations

import weakref

import torch

from fastgen_compile.models.decoder import LINEARS, Decoder

_packed: dict[tuple[int, torch.Size], torch.Tensor] = {}  # plain weight (address, shape) -> its packed copy


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's bf16 linears need avx512bw/vl/dq or avx_ne_convert; an AVX2-only CPU has neither."""
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack(model: Decoder) -> None:
    """Pack every layer's linear weights and lm_head. An entry lives as long as its weight:
    it is dropped when the weight is freed, before another tensor can reuse the address."""
    weights = [getattr(layer, name) for layer in model.layers for name in LINEARS] + [model.lm_head]
    for weight in weights:
        if weight is None or weight.dim() != 2 or _key(weight) in _packed:
            continue
        _packed[_key(weight)] = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        weakref.finalize(weight, _packed.pop, _key(weight), None)


def _key(weight: torch.Tensor) -> tuple[int, torch.Size]:
    return weight.data_ptr(), weight.shape


@torch.library.custom_op("fastgen::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed with weight's packed copy (see pack)."""
    packed = _packed.get(_key(weight))
    if packed is None:
        raise RuntimeError("packed_linear: this weight was not packed; call fastgen_compile.models.packed.pack(model) first")
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])

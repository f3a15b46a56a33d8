"""Packed oneDNN linears (models/packed.py): F.linear's numbers, eager and compiled, for as long as the weight lives."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastgen_compile.models import packed

pytestmark = pytest.mark.skipif(not packed.available(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN bf16 on this CPU")


def holder(*weights: torch.Tensor) -> SimpleNamespace:
    """What pack() reads of a Decoder: layers with their linear weights, and lm_head."""
    layers = [SimpleNamespace(wqkv=w, wo=None, w_up=None, w_down=None) for w in weights]
    return SimpleNamespace(layers=layers, lm_head=None)


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_equals_f_linear(rows, with_bias):
    weight, x = bf16(96, 64, seed=0), bf16(rows, 64, seed=1)
    bias = bf16(96, seed=2) if with_bias else None
    packed.pack(holder(weight))
    # both accumulate in fp32 and round once to bf16: at most one bf16 step apart
    torch.testing.assert_close(packed.packed_linear(x, weight, bias), F.linear(x, weight, bias), atol=0.05, rtol=1 / 128)


def test_a_compiled_graph_calls_the_packed_weight():
    weights = [bf16(48, 32, seed=s) for s in range(3)]
    packed.pack(holder(*weights))
    x = bf16(7, 32, seed=9)
    layer = torch.compile(lambda x, w: F.silu(packed.packed_linear(x, w, None)), fullgraph=True, dynamic=False)
    with torch.inference_mode():
        for w in weights:  # one graph, each call with another weight as input
            torch.testing.assert_close(layer(x, w), F.silu(F.linear(x, w)), atol=0.05, rtol=1 / 128)


def test_an_unpacked_weight_is_refused():
    with pytest.raises(RuntimeError, match="not packed"):
        packed.packed_linear(bf16(2, 16, seed=0), bf16(8, 16, seed=1), None)


def test_an_entry_lives_as_long_as_its_weight():
    weight = bf16(24, 16, seed=3)
    key = packed._key(weight)
    packed.pack(holder(weight))
    assert key in packed._packed
    del weight
    gc.collect()
    assert key not in packed._packed  # a later tensor at the same address is not taken for it

"""kernels/paged_decode.cpp against attention computed densely from the same pool."""

from __future__ import annotations

import pytest
import torch

from fastgen_compile import kernels
from fastgen_compile.artifacts import default_root

PAGE, KV_HEADS, GROUP, DIM, PAGES = 8, 2, 3, 16, 40


@pytest.fixture(scope="module")
def op():
    if not kernels.paged_decode_available(default_root()):
        pytest.skip("no C++ compiler for the CPU kernel")
    return torch.ops.fastgen.paged_decode


def reference(q, k_pool, v_pool, pages, length, window):
    """One row: its sequence's keys gathered from its pages, dense softmax attention."""
    slots = torch.tensor([pages[p // PAGE] * PAGE + p % PAGE for p in range(length)])
    start = max(0, length - window) if window else 0
    k, v = k_pool[slots[start:]], v_pool[slots[start:]]  # (keys, kv_heads, dim)
    k, v = k.repeat_interleave(GROUP, dim=1), v.repeat_interleave(GROUP, dim=1)  # query head h reads kv head h // GROUP
    weights = torch.einsum("hd,khd->hk", q, k).mul(DIM**-0.5).softmax(dim=-1)
    return torch.einsum("hk,khd->hd", weights, v)


def decode_pool(k_pool, v_pool, dtype):
    """The kernel's layout: keys transposed within each page, padded to the key stride; values as slots."""
    keys = k_pool.view(PAGES, PAGE, KV_HEADS, DIM).permute(0, 2, 3, 1)
    k_pages = torch.zeros(PAGES, KV_HEADS, DIM, kernels.key_stride(PAGE), dtype=dtype)
    k_pages[..., :PAGE] = keys
    return k_pages, v_pool.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 11])
def test_paged_decode_matches_dense_attention(op, window, dtype):
    g = torch.Generator().manual_seed(window)
    # bf16 pools hold bf16 values (the model's keys): the reference reads the same numbers
    k_pool, v_pool = (torch.randn(PAGES * PAGE, KV_HEADS, DIM, generator=g).to(dtype).float() for _ in range(2))
    lengths = [1, 7, 8, 9, 30, 0, 64]  # a page's first slot, partial and full pages, a padding row (0)
    table = torch.zeros(len(lengths), 10, dtype=torch.int32)
    order = torch.randperm(PAGES - 1, generator=g) + 1  # scattered pages, none shared
    used = 0
    for row, n in enumerate(lengths):
        need = -(-n // PAGE)
        table[row, :need] = order[used : used + need]
        used += need
    q = torch.randn(len(lengths), KV_HEADS * GROUP, DIM, generator=g)
    out = op(q, *decode_pool(k_pool, v_pool, dtype), table, torch.tensor(lengths, dtype=torch.int32), PAGE, window, DIM**-0.5)
    for row, n in enumerate(lengths):
        expected = torch.zeros_like(q[row]) if n == 0 else reference(q[row], k_pool, v_pool, table[row].tolist(), n, window)
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "dim", "stride", "error"),
    [
        (torch.float16, DIM, 16, "must be fp32 or bf16"),
        (torch.float32, 24, 16, "head_dim 24"),
        (torch.float32, DIM, 12, "key_stride a multiple"),
    ],
)
def test_paged_decode_refuses_what_it_cannot_serve(op, dtype, dim, stride, error):
    q = torch.randn(1, KV_HEADS * GROUP, dim)
    k_pages, v_pages = torch.zeros(1, KV_HEADS, dim, stride, dtype=dtype), torch.zeros(PAGE, KV_HEADS, dim, dtype=dtype)
    with pytest.raises(RuntimeError, match=error):
        op(q, k_pages, v_pages, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), PAGE, 0, 1.0)


def test_a_damaged_cached_build_is_rebuilt_not_loaded(tmp_path):
    """Loading a truncated library kills the process (SIGBUS): its checksum must send it back to the compiler."""
    if kernels.paged_decode_available(default_root()) is False:
        pytest.skip("no C++ compiler for the CPU kernel")
    library = kernels._build(tmp_path)
    built, mtime = library.read_bytes(), library.stat().st_mtime_ns
    assert kernels._build(tmp_path) == library and library.stat().st_mtime_ns == mtime  # intact: taken as is
    library.write_bytes(built[:1000])
    assert kernels._build(tmp_path) == library and library.read_bytes() == built

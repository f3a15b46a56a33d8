"""The CPU paged-decode kernel on one layer's decode rows, against gathering each row's keys and
values and running torch's SDPA on them, with as many pools as the model has layers so none
stays in cache (as in a real step).

    .venv/bin/python tools/bench_decode_kernel.py [--rows 32] [--min-len 200] [--max-len 460]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastgen_compile import kernels
from fastgen_compile.artifacts import default_root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--min-len", type=int, default=200)
    p.add_argument("--max-len", type=int, default=460)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args()
    if not kernels.paged_decode_available(default_root()):
        raise SystemExit("the kernel could not be built (see the warning above)")
    g = torch.Generator().manual_seed(0)
    max_pages = -(-args.max_len // args.page_size)
    num_pages = args.rows * max_pages + 1
    lens = torch.randint(args.min_len, args.max_len + 1, (args.rows,), generator=g, dtype=torch.int32)
    table = (torch.randperm(num_pages - 1, generator=g)[: args.rows * max_pages] + 1).view(args.rows, max_pages).int()
    q = torch.randn(args.rows, args.heads, args.head_dim, generator=g)
    shape = (num_pages * args.page_size, args.kv_heads, args.head_dim)
    pools = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(args.layers)]
    stride = kernels.key_stride(args.page_size)

    def kernel_copy(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.zeros(num_pages, args.kv_heads, args.head_dim, stride, dtype=dtype)
        keys[..., : args.page_size] = k.view(num_pages, args.page_size, args.kv_heads, args.head_dim).permute(0, 2, 3, 1)
        return keys, v.to(dtype)

    def gathered_sdpa(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for row, n in enumerate(lens.tolist()):
            slots = (table[row].long()[:, None] * args.page_size + torch.arange(args.page_size)).flatten()[:n]
            kr, vr = (t[slots].transpose(0, 1).repeat_interleave(args.heads // args.kv_heads, 0) for t in (k, v))
            out[row] = F.scaled_dot_product_attention(q[row, :, None], kr, vr)[:, 0]
        return out

    def paged_decode(k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        return torch.ops.fastgen.paged_decode(q, k_pages, v_pages, table, lens, args.page_size, 0, args.head_dim**-0.5)

    systems = {"gather + SDPA (fp32)": [(gathered_sdpa, pool) for pool in pools]}
    for name, dtype in (("paged_decode, fp32 copy", torch.float32), ("paged_decode, bf16 copy", torch.bfloat16)):
        systems[name] = [(paged_decode, kernel_copy(k, v, dtype)) for k, v in pools]
    reference = gathered_sdpa(*pools[0])
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(args.repeat):  # alternate, so the machine's drift hits every system alike
        for name, calls in systems.items():
            t0 = time.perf_counter()
            outs = [fn(*pool) for fn, pool in calls]
            times[name].append((time.perf_counter() - t0) / len(calls) * 1e3)
            torch.testing.assert_close(outs[0], reference, atol=2e-2, rtol=2e-2)  # bf16 copy: bf16-rounded keys
    base = statistics.median(times["gather + SDPA (fp32)"])
    kv_bytes = int(lens.sum()) * args.kv_heads * args.head_dim * 2
    print(f"{args.rows} rows, contexts {args.min_len}..{args.max_len}, {args.layers} layers' pools, median of {args.repeat}")
    for name, t in times.items():
        ms = statistics.median(t)
        gbs = kv_bytes * (2 if "bf16" in name else 4) / ms / 1e6
        print(f"  {name:26s} {ms:6.3f} ms a layer ({min(t):.3f}-{max(t):.3f})  {base / ms:5.1f}x  K/V read at {gbs:4.1f} GB/s")


if __name__ == "__main__":
    main()

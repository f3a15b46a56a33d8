"""StepPlan -> the fixed-shape tensors of one bucket (numpy on the host, one copy in)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastgen_compile.attention import SCRATCH_PAGE
from fastgen_compile.scheduler import StepPlan


@dataclass
class Batch:
    bucket: int  # padded token count: the compiled shape
    num_tokens: int  # real tokens, the rest is padding
    input_ids: torch.Tensor  # (bucket,) int64
    positions: torch.Tensor  # (bucket,) int32
    slots: torch.Tensor  # (bucket,) int64, KV slot each token writes
    q_seq: torch.Tensor  # (num_tokens,) int32, owner of each real token
    kv_num_blocks: torch.Tensor  # (1, 1, bucket / q_block) int32
    kv_indices: torch.Tensor  # (1, 1, bucket / q_block, num_pages) int32
    sample_rows: torch.Tensor  # (sampled,) int64, row of each sampling chunk's last token


def pick_bucket(buckets: tuple[int, ...], num_tokens: int) -> int:
    for b in buckets:
        if b >= num_tokens:
            return b
    raise ValueError(f"{num_tokens} tokens exceed the largest bucket {buckets[-1]}")


def pack(plan: StepPlan, bucket: int, page_size: int, q_block: int, num_pages: int) -> Batch:
    n_blocks = bucket // q_block
    input_ids = np.zeros(bucket, dtype=np.int64)
    positions = np.zeros(bucket, dtype=np.int32)
    slots = np.full(bucket, SCRATCH_PAGE * page_size, dtype=np.int64)
    q_seq = np.empty(plan.num_tokens, dtype=np.int32)
    kv_num_blocks = np.zeros(n_blocks, dtype=np.int32)
    kv_indices = np.zeros((n_blocks, num_pages), dtype=np.int32)
    sample_rows = []
    row = 0
    for chunk in plan.chunks:
        seq, n = chunk.seq, chunk.num_tokens
        pos = np.arange(chunk.start, chunk.start + n, dtype=np.int32)
        pages = np.asarray(seq.block_table, dtype=np.int32)
        input_ids[row : row + n] = seq.token_ids(chunk.start, chunk.start + n)
        positions[row : row + n] = pos
        slots[row : row + n] = pages[pos // page_size] * page_size + pos % page_size
        q_seq[row : row + n] = seq.seq_id
        # each query block lists the pages its tokens of this sequence can see (causal)
        for blk in range(row // q_block, (row + n - 1) // q_block + 1):
            last_pos = chunk.start + min((blk + 1) * q_block, row + n) - 1 - row
            visible = pages[: last_pos // page_size + 1]
            k = kv_num_blocks[blk]
            kv_indices[blk, k : k + len(visible)] = visible
            kv_num_blocks[blk] = k + len(visible)
        if chunk.samples:
            sample_rows.append(row + n - 1)
        row += n
    return Batch(
        bucket=bucket,
        num_tokens=row,
        input_ids=torch.from_numpy(input_ids),
        positions=torch.from_numpy(positions),
        slots=torch.from_numpy(slots),
        q_seq=torch.from_numpy(q_seq),
        kv_num_blocks=torch.from_numpy(kv_num_blocks).view(1, 1, n_blocks),
        kv_indices=torch.from_numpy(kv_indices).view(1, 1, n_blocks, num_pages),
        sample_rows=torch.tensor(sample_rows, dtype=torch.int64),
    )

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
    kv_num_blocks: torch.Tensor  # (1, 1, bucket / q_block) int32: pages needing the mask
    kv_indices: torch.Tensor  # (1, 1, bucket / q_block, num_pages) int32
    full_num_blocks: torch.Tensor  # same shapes: pages every query of the block sees whole
    full_indices: torch.Tensor
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
    partial, full = PageLists(n_blocks, num_pages), PageLists(n_blocks, num_pages)
    sample_rows = []
    row = 0
    for chunk in plan.chunks:
        seq, n = chunk.seq, chunk.num_tokens
        pos = np.arange(chunk.start, chunk.start + n, dtype=np.int32)
        pages = np.asarray(seq.block_table, dtype=np.int32)
        input_ids[row : row + n] = seq.token_ids(chunk.start, chunk.start + n)
        positions[row : row + n] = pos
        slots[row : row + n] = pages[pos // page_size] * page_size + pos % page_size
        q_seq[row : row + n] = seq.kv_id
        # each query block lists the pages its tokens of this sequence can see (causal);
        # a block holding only this sequence sees the pages before its first token whole
        blocks = np.arange(row // q_block, (row + n - 1) // q_block + 1)
        first = np.maximum(blocks * q_block, row)
        last = np.minimum((blocks + 1) * q_block, row + n) - 1
        alone = (blocks * q_block >= row) & (np.minimum((blocks + 1) * q_block, plan.num_tokens) <= row + n)
        n_full = np.where(alone, (chunk.start + first - row + 1) // page_size, 0)
        n_visible = (chunk.start + last - row) // page_size + 1
        full.extend(blocks, np.zeros_like(n_full), n_full, pages)
        partial.extend(blocks, n_full, n_visible, pages)
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
        kv_num_blocks=partial.counts(),
        kv_indices=partial.indices(),
        full_num_blocks=full.counts(),
        full_indices=full.indices(),
        sample_rows=torch.tensor(sample_rows, dtype=torch.int64),
    )


class PageLists:
    """Per query block, a growing list of page ids (the block mask's kv_num_blocks / kv_indices)."""

    def __init__(self, n_blocks: int, num_pages: int):
        self.count = np.zeros(n_blocks, dtype=np.int32)
        self.pages = np.zeros((n_blocks, num_pages), dtype=np.int32)

    def extend(self, blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray, pages: np.ndarray) -> None:
        """Append pages[lo[i]:hi[i]] to the list of block blocks[i] (distinct blocks)."""
        j = np.arange(int((hi - lo).max(initial=0)))
        take = j[None, :] < (hi - lo)[:, None]
        rows = np.broadcast_to(blocks[:, None], take.shape)[take]
        dst = (self.count[blocks][:, None] + j[None, :])[take]
        self.pages[rows, dst] = pages[(lo[:, None] + j[None, :])[take]]
        self.count[blocks] += (hi - lo).astype(np.int32)

    def counts(self) -> torch.Tensor:
        return torch.from_numpy(self.count).view(1, 1, -1)

    def indices(self) -> torch.Tensor:
        return torch.from_numpy(self.pages).view(1, 1, *self.pages.shape)

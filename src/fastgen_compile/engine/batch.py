"""StepPlan -> the fixed-shape tensors of one bucket (numpy on the host, one copy in)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastgen_compile.engine.pages import SCRATCH_PAGE
from fastgen_compile.engine.scheduler import Chunk, StepPlan

BITS = 63  # of an int64 page_bits entry; bit 63 is never set
NO_BIT = 63


@dataclass
class BlockLists:
    """One attention region's block mask contents: per query block, its pages."""

    kv_num_blocks: torch.Tensor  # (1, 1, blocks) int32: pages needing mask_mod
    kv_indices: torch.Tensor  # (1, 1, blocks, num_pages) int32
    full_num_blocks: torch.Tensor  # same shapes: pages every query of the block sees whole
    full_indices: torch.Tensor


@dataclass
class Batch:
    """Rows [0, decode_rows) hold decode tokens (1-row query blocks) and, where decodes leave
    rows free, the tail of the last prompt chunk; the rest hold prompt chunks."""

    bucket: int  # padded token count: the compiled shape
    decode_rows: int
    input_ids: torch.Tensor  # (bucket,) int64
    positions: torch.Tensor  # (bucket,) int32
    context_lens: torch.Tensor  # (bucket,) int32, the row's sequence length at the end of its chunk (rope scaling)
    slots: torch.Tensor  # (bucket,) int64, KV slot each token writes
    q_seq: torch.Tensor  # (bucket,) int32, owner of each row (-1: padding)
    q_bit: torch.Tensor  # (bucket,) int64, the bit of page_bits naming a prompt row's cached pages (NO_BIT: none)
    page_bits: torch.Tensor  # (num_pages,) int64, per page the bits of the chunks that took it from the prefix cache
    decode_blocks: BlockLists | None  # FlexAttention decode region, or
    decode_pages: torch.Tensor | None  # (decode_rows, max_pages) int32: each decode row's page table (CPU decode kernel)
    decode_lens: torch.Tensor | None  # (decode_rows,) int32: keys each decode row sees, its position + 1 (0: padding)
    prompt_blocks: BlockLists | None
    chunk_rows: list[np.ndarray]  # rows of each chunk's tokens, in plan order
    sample_rows: torch.Tensor  # (sampled,) int64, last row of each sampling chunk, in plan order


@dataclass(frozen=True)
class Piece:
    """Consecutive tokens of one chunk placed in consecutive rows of one region."""

    index: int  # the chunk's place in the plan
    chunk: Chunk
    start: int  # first position
    num_tokens: int
    row: int  # first row
    in_decode_region: bool


def pick_bucket(buckets: tuple[int, ...], plan: StepPlan) -> int:
    """The smallest bucket holding the plan: prompt tokens spill into decode rows the decodes
    leave free, and a bucket below decode_rows is all decode rows, so any bucket with a row
    for every token will do."""
    for b in buckets:
        if b >= plan.num_tokens:
            return b
    raise ValueError(f"{plan.num_tokens} rows exceed the largest bucket {buckets[-1]}")


def place(plan: StepPlan, bucket: int, decode_rows: int) -> list[Piece]:
    """Rows for every token: decodes from row 0, prompt chunks from row decode_rows in plan
    order; what does not fit there goes to the free decode rows (decode_rows 0: one region)."""
    pieces, decode_next, prompt_next = [], 0, decode_rows
    for i, c in enumerate(plan.chunks):
        if c.is_decode and decode_rows:
            pieces.append(Piece(i, c, c.start, c.num_tokens, decode_next, True))
            decode_next += c.num_tokens
    for i, c in enumerate(plan.chunks):
        if c.is_decode and decode_rows:
            continue
        in_prompt = min(c.num_tokens, bucket - prompt_next)
        if in_prompt:
            pieces.append(Piece(i, c, c.start, in_prompt, prompt_next, False))
            prompt_next += in_prompt
        if in_prompt < c.num_tokens:
            pieces.append(Piece(i, c, c.start + in_prompt, c.num_tokens - in_prompt, decode_next, True))
            decode_next += c.num_tokens - in_prompt
    assert decode_next <= decode_rows, "plan exceeds the bucket"
    return pieces


def cached_prefix_bits(plan: StepPlan, page_size: int, page_bits: np.ndarray) -> dict[int, int]:
    """A bit for each chunk whose sequence took pages from the prefix cache, set in page_bits on those
    pages. Their slots carry the tag of whichever sequence wrote them, so wherever the mask decides
    (a query block mixing sequences; every page in eager attention), a row sees them through its bit. Bits repeat every BITS
    chunks: a block of at most BITS rows never holds two chunks with the same bit."""
    bits: dict[int, int] = {}
    for i, c in enumerate(plan.chunks):
        if c.seq.num_cached_tokens:  # decodes too: with decode_rows=0 they share blocks, and eager attention masks every page
            bits[i] = len(bits) % BITS
            page_bits[c.seq.page_table[: c.seq.num_cached_tokens // page_size]] |= 1 << bits[i]
    return bits


def pack(
    plan: StepPlan, bucket: int, decode_rows: int, page_size: int, q_block: int, num_pages: int, window: int | None = None, decode_table: int = 0
) -> Batch:
    """window: the model's sliding window; pages wholly out of a block's window are not listed.
    decode_table: > 0, the decode region gets page tables this wide instead of block lists."""
    input_ids = np.zeros(bucket, dtype=np.int64)
    positions = np.zeros(bucket, dtype=np.int32)
    context_lens = np.zeros(bucket, dtype=np.int32)
    slots = np.full(bucket, SCRATCH_PAGE * page_size, dtype=np.int64)
    q_seq = np.full(bucket, -1, dtype=np.int32)
    q_bit = np.full(bucket, NO_BIT, dtype=np.int64)
    page_bits = np.zeros(num_pages, dtype=np.int64)
    pieces = place(plan, bucket, decode_rows)
    page_tables = [np.asarray(c.seq.page_table, dtype=np.int64) for c in plan.chunks]
    rows_of: list[list[np.ndarray]] = [[] for _ in plan.chunks]
    use_table = bool(decode_table and decode_rows)
    decode_pages = np.zeros((decode_rows, decode_table), dtype=np.int32) if use_table else None
    decode_lens = np.zeros(decode_rows, dtype=np.int32) if use_table else None
    bits = cached_prefix_bits(plan, page_size, page_bits)
    for p in pieces:
        c, at, n, pages = p.chunk, p.row, p.num_tokens, page_tables[p.index]
        q_bit[at : at + n] = bits.get(p.index, NO_BIT)
        rows_of[p.index].append(np.arange(at, at + n))
        pos = np.arange(p.start, p.start + n, dtype=np.int32)
        input_ids[at : at + n] = c.seq.token_ids(p.start, p.start + n)
        positions[at : at + n] = pos
        context_lens[at : at + n] = c.start + c.num_tokens
        slots[at : at + n] = pages[pos // page_size] * page_size + pos % page_size
        q_seq[at : at + n] = c.seq.kv_id
        if p.in_decode_region and use_table:
            decode_pages[at : at + n, : len(pages)] = pages
            decode_lens[at : at + n] = pos + 1
    lists: list[BlockLists | None] = []
    for in_decode, region_start, region_end, block in ((True, 0, decode_rows, 1), (False, decode_rows, bucket, q_block)):
        if region_end == region_start or (in_decode and use_table):
            lists.append(None)
            continue
        region = [p for p in pieces if p.in_decode_region == in_decode]
        partial, full = PageLists((region_end - region_start) // block, num_pages), PageLists((region_end - region_start) // block, num_pages)
        region_tokens = sum(p.num_tokens for p in region)
        for p in region:
            n, row, pages = p.num_tokens, p.row - region_start, page_tables[p.index]
            # each query block lists the pages its tokens of this sequence can see (causal, in
            # the window); a block holding only this sequence sees some of them whole: those
            # up to its first token and, with a window, within reach of its last token
            blocks = np.arange(row // block, (row + n - 1) // block + 1)
            first = p.start + np.maximum(blocks * block, row) - row  # positions of the block's first
            last = p.start + np.minimum((blocks + 1) * block, row + n) - 1 - row  # and last token
            alone = (blocks * block >= row) & (np.minimum((blocks + 1) * block, region_tokens) <= row + n)
            if window is None:
                lo = full_lo = np.zeros_like(blocks)
            else:  # a token at q sees q - window < p <= q
                lo = np.maximum(first - window + 1, 0) // page_size
                full_lo = np.maximum(-(-(last - window + 1) // page_size), lo)
            full_hi = np.where(alone, np.maximum((first + 1) // page_size, full_lo), full_lo)
            n_visible = last // page_size + 1
            full.extend(blocks, full_lo, full_hi, pages)
            partial.extend(blocks, lo, full_lo, pages)
            partial.extend(blocks, full_hi, n_visible, pages)
        if bits:  # sequences sharing cached pages in one query block: list each page once
            partial.dedupe()
        lists.append(BlockLists(partial.counts(), partial.indices(), full.counts(), full.indices()))
    chunk_rows = [np.concatenate(rows) for rows in rows_of]
    sample_rows = [rows[-1] for c, rows in zip(plan.chunks, chunk_rows) if c.samples]
    return Batch(
        bucket=bucket,
        decode_rows=decode_rows,
        input_ids=torch.from_numpy(input_ids),
        positions=torch.from_numpy(positions),
        context_lens=torch.from_numpy(context_lens),
        slots=torch.from_numpy(slots),
        q_seq=torch.from_numpy(q_seq),
        q_bit=torch.from_numpy(q_bit),
        page_bits=torch.from_numpy(page_bits),
        decode_blocks=lists[0],
        decode_pages=None if decode_pages is None else torch.from_numpy(decode_pages),
        decode_lens=None if decode_lens is None else torch.from_numpy(decode_lens),
        prompt_blocks=lists[1],
        chunk_rows=chunk_rows,
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

    def dedupe(self) -> None:
        """Each page once per block: a page listed twice would be attended twice (softmax counts it
        double). Only blocks that mix sequences can hold a page twice, and only a cached one."""
        for block in np.flatnonzero(self.count > 1):
            pages = np.unique(self.pages[block, : self.count[block]])
            if len(pages) < self.count[block]:
                self.pages[block, : len(pages)] = pages
                self.count[block] = len(pages)

    def counts(self) -> torch.Tensor:
        return torch.from_numpy(self.count).view(1, 1, -1)

    def indices(self) -> torch.Tensor:
        return torch.from_numpy(self.pages).view(1, 1, *self.pages.shape)

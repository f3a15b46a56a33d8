"""Paged attention through FlexAttention block masks.

The KV pool of a layer is one tensor of `num_slots = pages * page_size` rows. Every
slot remembers which sequence wrote it and at which position (`slot_seq`, `slot_pos`);
every query row knows its sequence and position (`q_seq`, `q_pos`). One `mask_mod` per
region over those persistent tensors says "same sequence and not in the future" (and,
with a sliding window, "not too far in the past"; with prefix caching, "or a page my sequence
took from the cache", `page_bits` / `q_bit`); the
block masks' page lists name, per query block, only the pages of the sequences in it,
so the kernel touches nothing else. Shapes are fixed per bucket; only contents change.

Two regions: decode rows use 1-row query blocks (a block never mixes sequences, so no
page is read for a sequence that does not need it); prompt rows use `q_block`-row
blocks, so a chunk's rows share each page they read (see docs/architecture.md). On CPU,
decode rows go to our own kernel instead (`kernels/paged_decode.cpp`), given each row's
page table (`DecodeTable`) and a second copy of the pool laid out for it (`LayerKV`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from fastgen_compile.engine.batch import NO_BIT, Batch, BlockLists


class LayerKV(NamedTuple):
    """One layer's KV pool. k, v: (1, slots, kv_heads, dim) in the pool dtype, what FlexAttention
    reads. k_pages, v_pages: where decode rows go to the CPU kernel, the same keys and values in
    the model's dtype (bf16 weights give bf16 keys, so the copy is exact and half the bytes the
    kernel streams), laid out for it: keys (pages, kv_heads, dim, key_stride), transposed within
    each page; values (slots, kv_heads, dim)."""

    k: torch.Tensor
    v: torch.Tensor
    k_pages: torch.Tensor | None = None
    v_pages: torch.Tensor | None = None


class DecodeTable(NamedTuple):
    """The decode region for `torch.ops.fastgen.paged_decode`: views of the bucket's buffers."""

    pages: torch.Tensor  # (decode_rows, max_pages) int32, each row's page table
    lens: torch.Tensor  # (decode_rows,) int32, keys each row sees: its position + 1 (0: padding)
    page_size: int
    window: int  # 0: none


class PagedAttention:
    def __init__(
        self, num_pages: int, page_size: int, max_tokens: int, decode_rows: int, q_block: int, group: int, window: int | None, device: torch.device,
        cached_prefixes: bool = False,
    ):
        """group: query heads per KV head. Each group is folded into the query rows (one
        kernel row per token and head of the group), so a page is read once per KV head.
        window: a query sees keys less than this many positions back (None: all); a
        static property of the compiled graph, like the rest of the mask.
        cached_prefixes: a row also sees the slots of the pages its sequence took from the prefix
        cache, which another sequence wrote (batch.cached_prefix_bits); static too."""
        self.page_size, self.decode_rows, self.q_block, self.group, self.window = page_size, decode_rows, q_block, group, window
        self.num_slots = num_pages * page_size
        self.q_seq = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.q_pos = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        self.slot_seq = torch.full((self.num_slots,), -2, dtype=torch.int32, device=device)
        self.slot_pos = torch.zeros(self.num_slots, dtype=torch.int32, device=device)
        self.q_bit = torch.full((max_tokens,), NO_BIT, dtype=torch.int64, device=device)
        self.page_bits = torch.zeros(num_pages, dtype=torch.int64, device=device)
        q_seq, q_pos, slot_seq, slot_pos, q_bit, page_bits = self.q_seq, self.q_pos, self.slot_seq, self.slot_pos, self.q_bit, self.page_bits

        def visible(q, kv):
            mine = q_seq[q] == slot_seq[kv]
            if cached_prefixes:
                mine = mine | (((page_bits[kv // page_size] >> q_bit[q]) & 1) == 1)
            seen = mine & (slot_pos[kv] <= q_pos[q])
            return seen if window is None else seen & (q_pos[q] - slot_pos[kv] < window)

        def decode_mask(b, h, q_idx, kv_idx):
            return visible(q_idx // group, kv_idx)

        def prompt_mask(b, h, q_idx, kv_idx):
            return visible(q_idx // group + decode_rows, kv_idx)

        # fixed function objects for the engine's life: a new closure per step would retrace
        self.decode_mask_mod, self.prompt_mask_mod = decode_mask, prompt_mask

    def update(self, batch: Batch) -> None:
        """Record this step's query rows and who wrote each new slot. Padding rows write the
        scratch slots, which no block lists; no data-dependent shapes, so a CUDA graph can hold it."""
        q_seq, positions, slots = batch.q_seq, batch.positions, batch.slots
        n = q_seq.shape[0]
        self.q_seq[:n].copy_(q_seq)
        self.q_pos[:n].copy_(positions)
        self.q_bit[:n].copy_(batch.q_bit)
        self.page_bits.copy_(batch.page_bits)
        self.slot_seq.index_copy_(0, slots, q_seq)
        self.slot_pos.index_copy_(0, slots, positions)

    def block_masks(self, batch: Batch) -> tuple[BlockMask | DecodeTable | None, BlockMask | None]:
        """The masks over batch's block lists (device tensors), which they keep: refill those lists
        in place and the same masks serve the next step."""
        if batch.decode_pages is not None:
            decode = DecodeTable(batch.decode_pages, batch.decode_lens, self.page_size, self.window or 0)
        else:
            decode = batch.decode_blocks and self._mask(batch.decode_blocks, 1, batch.decode_rows, self.decode_mask_mod)
        prompt = batch.prompt_blocks and self._mask(batch.prompt_blocks, self.q_block, batch.bucket - batch.decode_rows, self.prompt_mask_mod)
        return decode, prompt

    def _mask(self, lists: BlockLists, q_block: int, rows: int, mask_mod) -> BlockMask:
        """Partial pages go through mask_mod; full pages (wholly visible to a one-sequence
        query block) skip it, which on CPU is most of the cost of attention."""
        return BlockMask.from_kv_blocks(
            lists.kv_num_blocks,
            lists.kv_indices,
            lists.full_num_blocks,
            lists.full_indices,
            BLOCK_SIZE=(q_block * self.group, self.page_size),
            mask_mod=mask_mod,
            seq_lengths=(rows * self.group, self.num_slots),
            compute_q_blocks=False,
        )


def paged_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerKV, slots: torch.Tensor, masks: tuple[BlockMask | DecodeTable | None, BlockMask | None]
) -> torch.Tensor:
    """q, k, v: this step's (1, tokens, heads or kv_heads, dim); they are written at `slots` first,
    so a token attends to its own sequence's past and itself. -> (tokens, heads * dim) in the pool
    dtype. The decode region is the first tokens (`masks[0]` says how many), the prompt region the rest."""
    _, _, heads, dim = q.shape
    kv.k.index_copy_(1, slots, k.to(kv.k.dtype))
    kv.v.index_copy_(1, slots, v.to(kv.v.dtype))
    q = q.to(kv.k.dtype)
    decode, prompt = masks
    if isinstance(decode, DecodeTable):
        kv.k_pages[slots // decode.page_size, :, :, slots % decode.page_size] = k[0].to(kv.k_pages.dtype)
        kv.v_pages.index_copy_(0, slots, v[0].to(kv.v_pages.dtype))
        split = decode.pages.shape[0]
        table = (decode.pages, decode.lens, decode.page_size, decode.window, dim**-0.5)
        outs = [torch.ops.fastgen.paged_decode(q[0, :split].float().contiguous(), kv.k_pages, kv.v_pages, *table).to(q.dtype).view(split, heads * dim)]
    else:
        split = decode.seq_lengths[0] // (heads // kv.k.shape[2]) if decode is not None else 0
        outs = [flex_rows(q[:, :split], kv.k, kv.v, decode)] if decode is not None else []
    if prompt is not None:
        outs.append(flex_rows(q[:, split:], kv.k, kv.v, prompt))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def flex_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    """FlexAttention over the pool for one region's rows: q (1, n, heads, dim) -> (n, heads * dim)."""
    _, n, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    # fold each KV head's query heads into rows (row = token * group + head in group), so
    # one kernel block reads a page once for the whole group. Every query is a fresh 4-D
    # buffer: torch 2.13's CPU flex lowering rejects 5-D ones and silently misreads a
    # slice with a storage offset (wrong tokens, no error).
    rows = q.reshape(1, n, kv_heads, -1).transpose(1, 2).contiguous().view(1, kv_heads, -1, dim)
    out = flex_attention(rows, k_cache.transpose(1, 2), v_cache.transpose(1, 2), block_mask=mask)
    return out.view(1, kv_heads, n, -1).transpose(1, 2).reshape(n, heads * dim)

"""Paged attention through FlexAttention block masks.

The KV pool of a layer is one tensor of `num_slots = pages * page_size` rows. Every
slot remembers which sequence wrote it and at which position (`slot_seq`, `slot_pos`);
every query row knows its sequence and position (`q_seq`, `q_pos`). One `mask_mod` per
region over those persistent tensors says "same sequence and not in the future" (and,
with a sliding window, "not too far in the past"); the
block masks' page lists name, per query block, only the pages of the sequences in it,
so the kernel touches nothing else. Shapes are fixed per bucket; only contents change.

Two regions: decode rows use 1-row query blocks (a block never mixes sequences, so no
page is read for a sequence that does not need it); prompt rows use `q_block`-row
blocks, so a chunk's rows share each page they read (see docs/architecture.md).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from fastgen_compile.batch import Batch, BlockLists


class PagedAttention:
    def __init__(
        self, num_pages: int, page_size: int, max_tokens: int, decode_rows: int, q_block: int, group: int, window: int | None, device: torch.device
    ):
        """group: query heads per KV head. Each group is folded into the query rows (one
        kernel row per token and head of the group), so a page is read once per KV head.
        window: a query sees keys less than this many positions back (None: all); a
        static property of the compiled graph, like the rest of the mask."""
        self.page_size, self.decode_rows, self.q_block, self.group = page_size, decode_rows, q_block, group
        self.num_slots = num_pages * page_size
        self.q_seq = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.q_pos = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        self.slot_seq = torch.full((self.num_slots,), -2, dtype=torch.int32, device=device)
        self.slot_pos = torch.zeros(self.num_slots, dtype=torch.int32, device=device)
        q_seq, q_pos, slot_seq, slot_pos = self.q_seq, self.q_pos, self.slot_seq, self.slot_pos

        def visible(q, kv):
            seen = (q_seq[q] == slot_seq[kv]) & (slot_pos[kv] <= q_pos[q])
            return seen if window is None else seen & (q_pos[q] - slot_pos[kv] < window)

        def decode_mask(b, h, q_idx, kv_idx):
            return visible(q_idx // group, kv_idx)

        def prompt_mask(b, h, q_idx, kv_idx):
            return visible(q_idx // group + decode_rows, kv_idx)

        # fixed function objects for the engine's life: a new closure per step would retrace
        self.decode_mask_mod, self.prompt_mask_mod = decode_mask, prompt_mask

    def update(self, q_seq: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Record this step's query rows and who wrote each new slot. Padding rows write the
        scratch slots, which no block lists; no data-dependent shapes, so a CUDA graph can hold it."""
        n = q_seq.shape[0]
        self.q_seq[:n].copy_(q_seq)
        self.q_pos[:n].copy_(positions)
        self.slot_seq.index_copy_(0, slots, q_seq)
        self.slot_pos.index_copy_(0, slots, positions)

    def block_masks(self, batch: Batch) -> tuple[BlockMask | None, BlockMask | None]:
        """The masks over batch's block lists (device tensors), which they keep: refill those lists
        in place and the same masks serve the next step."""
        decode = batch.decode_blocks and self._mask(batch.decode_blocks, 1, self.decode_rows, self.decode_mask_mod)
        prompt = batch.prompt_blocks and self._mask(batch.prompt_blocks, self.q_block, batch.bucket - self.decode_rows, self.prompt_mask_mod)
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


def paged_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, masks: tuple[BlockMask | None, BlockMask | None]) -> torch.Tensor:
    """q: (1, tokens, heads, dim); caches: (1, slots, kv_heads, dim) -> (tokens, heads * dim).
    The decode region is the first tokens (`masks[0]` says how many), the prompt region the rest."""
    _, tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    # fold each KV head's query heads into rows (row = token * group + head in group), so
    # one kernel block reads a page once for the whole group. Every query is a fresh 4-D
    # buffer: torch 2.13's CPU flex lowering rejects 5-D ones and silently misreads a
    # slice with a storage offset (wrong tokens, no error).
    by_token = q.view(1, tokens, kv_heads, group * dim).transpose(1, 2)  # (1, kv_heads, tokens, group * dim)
    decode_mask, prompt_mask = masks
    split = decode_mask.seq_lengths[0] // group if decode_mask is not None else 0
    outs = []
    for mask, part in ((decode_mask, by_token[:, :, :split]), (prompt_mask, by_token[:, :, split:])):
        if mask is not None:
            rows = part.contiguous().view(1, kv_heads, -1, dim)
            outs.append(flex_attention(rows, k, v, block_mask=mask).view(1, kv_heads, -1, group * dim))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (1, kv_heads, tokens, group * dim)
    return out.transpose(1, 2).reshape(tokens, heads * dim)

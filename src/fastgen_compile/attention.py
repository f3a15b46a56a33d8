"""Paged attention through FlexAttention block masks.

The KV pool of a layer is one tensor of `num_slots = pages * page_size` rows. Every
slot remembers which sequence wrote it and at which position (`slot_seq`, `slot_pos`);
every query token knows its sequence and position (`q_seq`, `q_pos`). One `mask_mod`
over those persistent tensors says "same sequence and not in the future"; the block
mask's `kv_indices` list, per query block, only the pages of the sequences in it, so
the kernel touches nothing else. Shapes are fixed per bucket; only contents change.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

SCRATCH_PAGE = 0  # padding tokens write here; no query block ever lists it


class PagedAttention:
    def __init__(self, num_pages: int, page_size: int, max_tokens: int, q_block: int, device: torch.device):
        self.num_pages, self.page_size, self.q_block = num_pages, page_size, q_block
        self.num_slots = num_pages * page_size
        self.q_seq = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.q_pos = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        self.slot_seq = torch.full((self.num_slots,), -2, dtype=torch.int32, device=device)
        self.slot_pos = torch.zeros(self.num_slots, dtype=torch.int32, device=device)
        q_seq, q_pos, slot_seq, slot_pos = self.q_seq, self.q_pos, self.slot_seq, self.slot_pos

        def same_sequence_causal(b, h, q_idx, kv_idx):
            return (q_seq[q_idx] == slot_seq[kv_idx]) & (slot_pos[kv_idx] <= q_pos[q_idx])

        self.mask_mod = same_sequence_causal  # one function object for all steps: no retrace

    def update(self, q_seq: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, bucket: int) -> None:
        """Record this step's queries (padding owns nothing) and who wrote each new slot."""
        n = q_seq.shape[0]
        self.q_seq[:n].copy_(q_seq)
        self.q_seq[n:bucket].fill_(-1)
        self.q_pos[:bucket].copy_(positions)
        self.slot_seq.index_copy_(0, slots[:n], q_seq)
        self.slot_pos.index_copy_(0, slots[:n], positions[:n])

    def block_mask(
        self, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, full_num_blocks: torch.Tensor, full_indices: torch.Tensor, n_tokens: int
    ) -> BlockMask:
        """Partial pages go through mask_mod; full pages (wholly visible to a one-sequence
        query block) skip it, which on CPU is most of the cost of attention."""
        return BlockMask.from_kv_blocks(
            kv_num_blocks,
            kv_indices,
            full_num_blocks,
            full_indices,
            BLOCK_SIZE=(self.q_block, self.page_size),
            mask_mod=self.mask_mod,
            seq_lengths=(n_tokens, self.num_slots),
            compute_q_blocks=False,
        )


def paged_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    """q: (1, heads, tokens, dim); caches: (1, slots, kv_heads, dim) -> (tokens, heads * dim)."""
    k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    out = flex_attention(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1).reshape(q.shape[2], -1)

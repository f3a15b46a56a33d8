"""KV pages: a free list and a page table per sequence. Plain bookkeeping, no torch."""

from __future__ import annotations

from collections import deque

from fastgen_compile.engine.sequence import Sequence
from fastgen_compile.errors import ConfigError

SCRATCH_PAGE = 0  # padding tokens write here: never handed out, no query block lists it
SCRATCH_PAGES = 1


class PageManager:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= SCRATCH_PAGES:
            raise ConfigError(f"the KV pool needs more than {SCRATCH_PAGES} page, got {num_pages} (raise kv_pages / kv_bytes)")
        self.num_pages, self.page_size = num_pages, page_size
        self.free_pages: deque[int] = deque(range(SCRATCH_PAGES, num_pages))

    @property
    def capacity_tokens(self) -> int:
        """Tokens one sequence can hold when it has the whole pool."""
        return (self.num_pages - SCRATCH_PAGES) * self.page_size

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    @property
    def num_used(self) -> int:
        return self.num_pages - SCRATCH_PAGES - self.num_free

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.page_size) - len(seq.page_table))

    def tokens_fitting(self, seq: Sequence) -> int:
        """How many tokens the sequence could hold with its pages plus every free page."""
        return (len(seq.page_table) + self.num_free) * self.page_size

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        need = self.pages_needed(seq, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"sequence {seq.seq_id} needs {need} pages, {self.num_free} free")
        seq.page_table.extend(self.free_pages.popleft() for _ in range(need))

    def release(self, seq: Sequence) -> None:
        self.free_pages.extend(seq.page_table)
        seq.page_table = []

"""KV pages: reference counts, a page table per sequence, and the prefix cache. Plain bookkeeping, no torch.

Prefix caching: a full page is named by a hash that chains its parent page's hash and its own
token ids (the chain starts from the model's identity), so equal hashes mean equal prefixes. A
sequence admitted with a prompt whose leading full pages are cached takes those pages (their
reference count goes up) and computes only what follows. A page whose count drops to 0 keeps
its hash in an LRU list of cached free pages and is reused for other tokens only when no plain
free page is left. A hit is checked against the page's token ids, so a 64-bit collision cannot
hand out another prefix's keys.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from fastgen_compile.engine.sequence import Sequence
from fastgen_compile.errors import ConfigError

SCRATCH_PAGE = 0  # padding tokens write here: never handed out, no query block lists it
SCRATCH_PAGES = 1


@dataclass(frozen=True)
class CachedPage:
    """What a hashed page holds: checked on every hit."""

    parent: int  # the hash of the page before it (the chain's root for a sequence's first page)
    token_ids: tuple[int, ...]


def page_hash(parent: int, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class PageManager:
    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = False, identity: str = ""):
        """identity: what the cached keys and values depend on besides the tokens (the model), the root of every hash chain."""
        if num_pages <= SCRATCH_PAGES:
            raise ConfigError(f"the KV pool needs more than {SCRATCH_PAGES} page, got {num_pages} (raise kv_pages / kv_bytes)")
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self.root = hash(identity)
        self.free_pages: deque[int] = deque(range(SCRATCH_PAGES, num_pages))  # no hash: handed out first
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # hashed, count 0: least recently used first
        self.refs = [0] * num_pages
        self.page_of: dict[int, int] = {}  # hash -> the page holding it
        self.content: dict[int, CachedPage] = {}  # hashed page -> what it holds
        self.hash_of: dict[int, int] = {}  # hashed page -> its hash
        self.num_queried_tokens = 0  # prompt tokens looked up in the cache, ever
        self.num_hit_tokens = 0  # of them, found

    @property
    def capacity_tokens(self) -> int:
        """Tokens one sequence can hold when it has the whole pool."""
        return (self.num_pages - SCRATCH_PAGES) * self.page_size

    @property
    def num_free(self) -> int:
        """Pages a sequence can take: plain free and cached free."""
        return len(self.free_pages) + len(self.cached_free)

    @property
    def num_used(self) -> int:
        return self.num_pages - SCRATCH_PAGES - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages holding a hashed prefix, referenced or not."""
        return len(self.hash_of)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.page_size) - len(seq.page_table))

    def tokens_fitting(self, seq: Sequence) -> int:
        """How many tokens the sequence could hold with its pages plus every free page."""
        return (len(seq.page_table) + self.num_free) * self.page_size

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        need = self.pages_needed(seq, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"sequence {seq.seq_id} needs {need} pages, {self.num_free} free")
        for _ in range(need):
            page = self.free_pages.popleft() if self.free_pages else self._evict()
            self.refs[page] = 1
            seq.page_table.append(page)

    def _evict(self) -> int:
        page, _ = self.cached_free.popitem(last=False)
        self._forget(page)
        return page

    def _forget(self, page: int) -> None:
        del self.page_of[self.hash_of.pop(page)]
        del self.content[page]

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references. Its last pages go to the LRU end that is evicted first:
        the start of a prompt is what other requests share."""
        for page in reversed(seq.page_table):
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.hash_of:
                    self.cached_free[page] = None
                else:
                    self.free_pages.append(page)
        seq.page_table = []

    # ---- the prefix cache ----------------------------------------------------------------

    def take_cached_prefix(self, seq: Sequence) -> int:
        """On admission: the longest cached run of seq's leading full pages becomes the start of its
        page table. At least its last token is left to compute (its logits are sampled). Returns the
        tokens taken."""
        assert not seq.page_table and seq.num_computed == 0
        if not self.prefix_caching:
            return 0
        size = self.page_size
        hashes = self._hashes(seq, (seq.num_tokens - 1) // size)  # a recompute after preemption: its output too
        for i, h in enumerate(hashes):
            page = self.page_of.get(h)
            parent = hashes[i - 1] if i else self.root
            if page is None or self.content[page] != CachedPage(parent, tuple(seq.token_ids(i * size, (i + 1) * size))):
                break
            if self.refs[page] == 0:
                del self.cached_free[page]
            self.refs[page] += 1
            seq.page_table.append(page)
        seq.num_computed = seq.num_cached_tokens = len(seq.page_table) * size
        return seq.num_cached_tokens

    def return_cached_prefix(self, seq: Sequence) -> None:
        """Undo take_cached_prefix: seq was not admitted after all."""
        self.release(seq)
        seq.num_computed = seq.num_cached_tokens = 0

    def count_lookup(self, seq: Sequence) -> None:
        """seq was admitted: its lookup counts (once per admission, not per try)."""
        if self.prefix_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += seq.num_cached_tokens

    def cache_full_pages(self, seq: Sequence) -> None:
        """After a step: hash the pages seq has filled (prompt or output tokens), so later requests
        with the same prefix find them. A page whose prefix another page already holds stays unhashed."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.page_size
        if full <= seq.num_hashed_pages:
            return
        hashes = self._hashes(seq, full)
        size = self.page_size
        for i in range(seq.num_hashed_pages, full):
            page, h = seq.page_table[i], hashes[i]
            if page not in self.hash_of and h not in self.page_of:
                self.page_of[h], self.hash_of[page] = page, h
                self.content[page] = CachedPage(hashes[i - 1] if i else self.root, tuple(seq.token_ids(i * size, (i + 1) * size)))
        seq.num_hashed_pages = full

    def _hashes(self, seq: Sequence, num_pages: int) -> list[int]:
        """The chained hashes of seq's first num_pages full pages (kept on seq: tokens never change)."""
        hashes, size = seq.page_hashes, self.page_size
        for i in range(len(hashes), num_pages):
            hashes.append(page_hash(hashes[i - 1] if i else self.root, tuple(seq.token_ids(i * size, (i + 1) * size))))
        return hashes[:num_pages]

    def reset_prefix_cache(self) -> int:
        """Forget every hash: cached free pages become plain free pages. Returns the pages forgotten."""
        forgotten = len(self.hash_of)
        self.free_pages.extend(self.cached_free)
        self.cached_free.clear()
        self.page_of.clear()
        self.content.clear()
        self.hash_of.clear()
        return forgotten

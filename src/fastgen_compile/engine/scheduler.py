"""Which tokens run in the next forward pass: Dynamic SplitFuse, or prefill-first for comparison.

SplitFuse: every running decode adds one token, then prompt chunks (partial prefills
first, then new requests in arrival order) fill what is left of the token budget, so
each forward pass carries about the same number of tokens. Prefill-first runs prompts
alone while decodes wait (the behaviour FastGen is compared against).
Plain Python bookkeeping: no torch.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from fastgen_compile.engine.pages import PageManager
from fastgen_compile.engine.sequence import Sequence, Status

POLICIES = ("splitfuse", "prefill_first")  # EngineConfig checks the name


@dataclass(frozen=True)
class Chunk:
    seq: Sequence
    start: int  # first position computed in this step
    num_tokens: int
    is_decode: bool = False

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its output yields a new token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_tokens: int = 0  # running totals of the chunks
    num_decode_tokens: int = 0

    def add(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.num_tokens += chunk.num_tokens
        self.num_decode_tokens += chunk.num_tokens if chunk.is_decode else 0


class Scheduler:
    def __init__(self, pages: PageManager, token_budget: int, max_seqs: int, policy: str = "splitfuse", decode_rows: int = 0):
        """decode_rows > 0: decodes get their own region of that many rows in every step, at
        most that many decodes; prompt chunks take the rest of the budget, rows the decodes
        leave free included (batch.place); 0: decodes and prompts share it all."""
        self.pages, self.token_budget, self.max_seqs, self.policy = pages, token_budget, max_seqs, policy
        self.decode_rows = decode_rows
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the newest is preempted first
        # a new id per admission: slots written before a preemption never match the recompute
        self._kv_ids = itertools.count()
        self.num_preemptions = 0  # ever

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finished or aborted: free its pages and forget it."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.pages.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        while True:
            decodes, prefills = [], []
            for s in self.running:
                (decodes if s.num_pending == 1 and s.output_token_ids else prefills).append(s)
            if self.policy == "prefill_first":
                self._add_prompt_chunks(prefills, plan)  # decodes only run when no prompt can
                if not plan.chunks:
                    for seq in decodes:
                        self._add_decode(seq, plan)
            else:
                for seq in decodes:
                    self._add_decode(seq, plan)
                self._add_prompt_chunks(prefills, plan)
            if plan.chunks or not self.running:
                return plan
            # every running sequence is stuck on pages: recompute the newest later
            self._preempt(self.running[-1], plan)

    def _room(self, plan: StepPlan, decode: bool = False) -> int:
        if len(plan.chunks) >= self.max_seqs:
            return 0
        if decode and self.decode_rows:
            return self.decode_rows - plan.num_decode_tokens
        return self.token_budget - plan.num_tokens

    def _add_decode(self, seq: Sequence, plan: StepPlan) -> None:
        if seq.status is not Status.RUNNING or self._room(plan, decode=True) < 1:
            return
        while self.pages.pages_needed(seq, seq.num_tokens) > self.pages.num_free:
            scheduled = {c.seq for c in plan.chunks}
            victims = [s for s in self.running if s not in scheduled]
            self._preempt(victims[-1], plan)  # seq itself is a candidate, and the last resort
            if seq.status is not Status.RUNNING:
                return
        self._schedule(seq, seq.num_tokens - 1, 1, plan, is_decode=True)

    def _add_prompt_chunks(self, prefills: list[Sequence], plan: StepPlan) -> None:
        for seq in prefills:
            if seq.status is Status.RUNNING:
                self._add_prompt_chunk(seq, plan)
        # no admission in a step that preempted (no thrashing), nor beyond the decode rows
        # (every running sequence must be able to decode every step)
        while self.waiting and self._room(plan) > 0 and not plan.preempted and not (0 < self.decode_rows <= len(self.running)):
            seq = self.waiting[0]
            if not self._add_prompt_chunk(seq, plan):
                return  # arrival order: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status, seq.kv_id = Status.RUNNING, next(self._kv_ids)
            self.running.append(seq)

    def _add_prompt_chunk(self, seq: Sequence, plan: StepPlan) -> bool:
        start = seq.num_computed
        n = min(seq.num_pending, self._room(plan), self.pages.tokens_fitting(seq) - start)
        if n <= 0:
            return False
        self._schedule(seq, start, n, plan)
        return True

    def _schedule(self, seq: Sequence, start: int, n: int, plan: StepPlan, is_decode: bool = False) -> None:
        self.pages.grow(seq, start + n)
        plan.add(Chunk(seq, start, n, is_decode))

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Free its pages and requeue it at the front: its prompt and output are recomputed."""
        self.pages.release(seq)
        self.running.remove(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        plan.preempted.append(seq)
        self.waiting.appendleft(seq)

    def update(self, plan: StepPlan) -> None:
        """The plan's tokens are now in the pool."""
        for chunk in plan.chunks:
            chunk.seq.num_computed = chunk.start + chunk.num_tokens

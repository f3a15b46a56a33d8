"""Which tokens run in the next forward pass: Dynamic SplitFuse, or prefill-first for comparison.

SplitFuse: every running decode adds one token, then prompt chunks (partial prefills
first, then new requests in arrival order) fill what is left of the token budget, so
each forward pass carries about the same number of tokens. Prefill-first runs prompts
alone while decodes wait (the behaviour FastGen is compared against).

With a step-cost curve (`use_costs`, engine/step_costs.py), SplitFuse sizes each step to its
hardware: while decodes run, the prompt chunk is the most tokens whose predicted step time stays
within an inter-token latency target (given, or by default 1.5x the decode-only step it replaces);
with no decode waiting on the step, prompts take the whole budget. A prompt that would then miss
its time-to-first-token deadline (arrival + prompt tokens / prompt_rate) gets the smallest larger
bucket that still makes it, so its chunks are paced to the deadline rather than run flat out;
if no bucket makes it, it keeps the target's chunk: the running decodes would pay for a deadline
that is lost anyway.
Plain Python bookkeeping: no torch.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastgen_compile.engine.pages import PageManager
from fastgen_compile.engine.sequence import Sequence, Status

if TYPE_CHECKING:
    from fastgen_compile.engine.step_costs import StepCosts

# with no ITL target given: a step carrying prompt tokens may cost this many times the decode-only
# step it replaces (so P95 inter-token latency stays within that of a schedule that never fuses)
TARGET_OVER_DECODE_STEP = 1.5

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
    budget: int = 0  # rows this step may fill (the scheduler sets it)
    num_tokens: int = 0  # running totals of the chunks
    num_decode_tokens: int = 0
    decode_keys: int = 0  # keys the decode rows read (StepCosts.predict)
    prompt_keys: int = 0  # prompt tokens x their chunk's end

    def add(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.num_tokens += chunk.num_tokens
        end = chunk.start + chunk.num_tokens
        if chunk.is_decode:
            self.num_decode_tokens += chunk.num_tokens
            self.decode_keys += end
        else:
            self.prompt_keys += chunk.num_tokens * end


class Scheduler:
    def __init__(self, pages: PageManager, buckets: tuple[int, ...], max_seqs: int, policy: str = "splitfuse", decode_rows: int = 0):
        """buckets: the row counts a step can have; the largest is the token budget. decode_rows > 0:
        decodes get their own region of that many rows in every step, at most that many decodes;
        prompt chunks take the rest of the budget, rows the decodes leave free included
        (batch.place); 0: decodes and prompts share it all."""
        self.pages, self.buckets, self.max_seqs, self.policy = pages, tuple(sorted(buckets)), max_seqs, policy
        self.token_budget = self.buckets[-1]
        self.decode_rows = decode_rows
        self.costs: StepCosts | None = None  # with itl_target: the SLA-aware budget (use_costs)
        self.itl_target: float | None = None  # seconds; None: relative to the decode-only step
        self.prompt_rate = 0.0  # prompt tokens/s owed to each prompt from its arrival; 0: no deadline
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the newest is preempted first
        # a new id per admission: slots written before a preemption never match the recompute
        self._kv_ids = itertools.count()
        self.num_preemptions = 0  # ever

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def use_costs(self, costs: StepCosts, itl_target: float | None = None, prompt_rate: float = 0.0) -> None:
        """SplitFuse steps sized by predicted time; itl_target (seconds) None: TARGET_OVER_DECODE_STEP
        times the decode-only step of the running decodes."""
        self.costs, self.itl_target, self.prompt_rate = costs, itl_target, prompt_rate

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finished or aborted: free its pages and forget it."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.pages.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self, now: float = 0.0) -> StepPlan:
        """now: perf_counter seconds, the clock of Sequence.arrival (prompt deadlines)."""
        plan = StepPlan(budget=self.token_budget)
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
                plan.budget = self._budget(plan, prefills, now)
                self._add_prompt_chunks(prefills, plan)
            if plan.chunks or not self.running:
                return plan
            # every running sequence is stuck on pages: recompute the newest later
            self._preempt(self.running[-1], plan)

    def _budget(self, plan: StepPlan, prefills: list[Sequence], now: float) -> int:
        """Rows this step may fill once its decodes are in (see the module docstring)."""
        head = next((s for s in prefills if s.status is Status.RUNNING), self.waiting[0] if self.waiting else None)
        if self.costs is None or not plan.num_decode_tokens or head is None:
            return self.token_budget
        costs, done, at = self.costs, plan.num_tokens, head.num_computed
        fits = [b for b in self.buckets if b >= done]

        def seconds(n: int, end: float) -> float:
            """A step with n more prompt tokens, their chunk ending at position `end`."""
            return costs.predict(next(b for b in fits if b >= done + n), plan.decode_keys, plan.prompt_keys + int(n * end))

        target = self.itl_target if self.itl_target is not None else TARGET_OVER_DECODE_STEP * seconds(0, 0)
        within = [n for n in (self._most_within(costs, b, plan, at, target) for b in fits) if n > 0]
        n = max(within, default=max(fits[0] - done, 1))  # none within: the decodes' own bucket's free rows
        if self.prompt_rate <= 0 or head.output_token_ids:  # no deadline, or its first token is out
            return done + n
        time_left = head.arrival + len(head.prompt_token_ids) / self.prompt_rate - now
        left = head.num_pending

        def on_time(k: int) -> bool:  # at chunks of k, ending on average half way through what is left
            return math.ceil(left / k) * seconds(k, at + (left + k) / 2) <= time_left

        if left <= n or on_time(n):
            return done + n
        faster = [b - done for b in fits if b - done > n]
        return done + next((k for k in faster if on_time(k)), n)  # none in time: the deadline is lost, the decodes keep theirs

    @staticmethod
    def _most_within(costs: StepCosts, bucket: int, plan: StepPlan, at: int, target: float) -> int:
        """The most prompt tokens (of a chunk starting at position `at`) that bucket can add to the
        plan within target seconds: the largest n <= its free rows with n * (at + n) prompt keys in budget."""
        room = bucket - plan.num_tokens
        spare = target - costs.predict(bucket, plan.decode_keys, plan.prompt_keys)
        if room <= 0 or spare <= 0:
            return 0
        if costs.prompt_key_seconds <= 0:
            return room
        keys = spare / costs.prompt_key_seconds  # n^2 + at * n <= keys
        return min(room, int((math.sqrt(at * at + 4 * keys) - at) / 2))

    def _room(self, plan: StepPlan, decode: bool = False) -> int:
        if len(plan.chunks) >= self.max_seqs:
            return 0
        if decode and self.decode_rows:
            return self.decode_rows - plan.num_decode_tokens
        return plan.budget - plan.num_tokens

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

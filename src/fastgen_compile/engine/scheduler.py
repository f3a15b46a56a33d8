"""Which tokens run in the next forward pass: Dynamic SplitFuse, or prefill-first for comparison.

SplitFuse: every running decode adds one token, then prompt chunks (partial prefills
first, then new requests in arrival order) fill what is left of the token budget, so
each forward pass carries about the same number of tokens. Prefill-first runs prompts
alone while decodes wait (the behaviour FastGen is compared against).

With a step-cost curve (`use_costs`, engine/step_costs.py), SplitFuse sizes each step to its
hardware. While decodes run, a step's prompt chunk is at most the ITL cap: the most tokens whose
predicted step stays within an inter-token latency target, or by default the knee of the curve
(StepCosts.knee: the smallest chunk whose prompt throughput is within KNEE of the best; where the
curve is flat, as on a GPU, that is the whole budget; on a CPU whose steps cost in proportion to
their rows, about a hundred tokens). With prompt deadlines (arrival + prompt tokens / prompt_rate),
the chunk is the smallest that keeps every queued prompt on time, so steps are no larger than the
SLA needs; above the cap only when that saves a deadline the cap would miss; the cap itself when
no chunk saves it (the running decodes should not pay for a deadline that is lost anyway) or a
prompt is already late (a smaller chunk would only add to its delay). With no decode waiting on
the step, prompts take the whole budget.
A request admitted with a cached prefix (engine/pages.py) starts its first chunk after it: the
budget counts only tokens computed.
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

# deadlines are planned with this share of the time left: predictions miss the engine's own overhead
DEADLINE_MARGIN = 0.9

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
        self.itl_target: float | None = None  # seconds; None: the knee of the curve
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
        """SplitFuse steps sized by predicted time; itl_target (seconds) None: the curve's knee (StepCosts.knee)."""
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
        done = plan.num_tokens
        if self.costs is None or not plan.num_decode_tokens or done >= self.token_budget:
            return self.token_budget  # (before the queue is copied: this runs every step)
        queue = [s for s in prefills if s.status is Status.RUNNING] + list(self.waiting)
        if not queue:
            return self.token_budget
        fills = [b - done for b in self.buckets if b > done]  # prompt tokens each larger bucket has room for
        costs, at = self.costs, queue[0].num_computed
        if self.itl_target is not None:
            cap = max([self._most_within(costs, done + k, plan, at, self.itl_target) for k in fills] + [1])
        else:
            cap = costs.knee(self.buckets, plan, at)
        if self.prompt_rate <= 0:
            return done + cap

        # inf for a recomputed prompt: its first token is already out
        deadlines = [math.inf if s.output_token_ids else s.arrival + DEADLINE_MARGIN * len(s.prompt_token_ids) / self.prompt_rate
                     for s in queue]
        if min(deadlines) <= now:
            return done + cap  # a late prompt: a smaller chunk would only add to its delay

        def on_time(k: int) -> bool:
            """Every queued prompt, in order, at chunks of k, makes its deadline."""
            t = now
            for s, deadline in zip(queue, deadlines):
                left = s.num_pending
                t += math.ceil(left / k) * costs.with_prompt(self.buckets, plan, k, s.num_computed + (left + k) / 2)
                if t > deadline:
                    return False
            return True

        return done + next((k for k in sorted({*fills, cap}) if on_time(k)), cap)

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
            if seq.params.prompt_logprobs is None:  # a cached prefix has no logits to score
                self.pages.take_cached_prefix(seq)
            if not self._add_prompt_chunk(seq, plan):
                self.pages.return_cached_prefix(seq)
                return  # arrival order: nobody overtakes the head of the queue
            self.pages.count_lookup(seq)
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
        self.pages.release(seq)  # hashed pages stay cached: its recompute may find them
        self.running.remove(seq)
        seq.status, seq.num_computed, seq.num_hashed_pages = Status.WAITING, 0, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        plan.preempted.append(seq)
        self.waiting.appendleft(seq)

    def update(self, plan: StepPlan) -> None:
        """The plan's tokens are now in the pool."""
        for chunk in plan.chunks:
            chunk.seq.num_computed = chunk.start + chunk.num_tokens
            self.pages.cache_full_pages(chunk.seq)

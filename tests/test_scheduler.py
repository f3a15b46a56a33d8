"""Scheduler and block manager, pure Python: Sequences are driven by a simulated engine loop.

The loop mirrors Engine.step without a model: schedule(), update(plan), then every chunk that
reaches its sequence's last token yields a fake token, and a sequence that has its
max_new_tokens is finished with "length". Every step checks the invariants that must hold
whatever the workload: the token budget, the max_seqs cap, contiguous chunks, decodes before
prompt chunks, and a page pool where every page is either free or owned by exactly one live
sequence (page 0 is scratch and never handed out).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import pytest

from fastgen_compile.config import EngineConfig
from fastgen_compile.engine.pages import SCRATCH_PAGES, PageManager
from fastgen_compile.engine.scheduler import Scheduler, StepPlan
from fastgen_compile.engine.sequence import Sequence, Status
from fastgen_compile.errors import ConfigError
from fastgen_compile.request import SamplingParams

FAKE_TOKEN = 7

def make_seq(seq_id: int, prompt_len: int, max_new: int) -> Sequence:
    prompt = [(seq_id * 31 + i) % 500 + 3 for i in range(prompt_len)]
    return Sequence(seq_id, prompt, SamplingParams(max_new_tokens=max_new, temperature=0))


@dataclass
class Step:
    plan: StepPlan
    decode_seqs: list[Sequence]  # chunks that were decodes (running with one pending token before scheduling)
    prompt_pending: bool  # before scheduling, some prompt (or recompute) was still pending
    running_before: list[Sequence]


@dataclass
class Sim:
    """A model-free engine loop around one Scheduler, checking invariants every step."""

    num_pages: int
    page_size: int
    token_budget: int
    max_seqs: int
    policy: str = "splitfuse"
    decode_rows: int = 0
    steps: list[Step] = field(default_factory=list)
    computed: Counter = field(default_factory=Counter)  # (seq_id, position) -> times computed
    finished: list[Sequence] = field(default_factory=list)
    admitted: list[int] = field(default_factory=list)  # seq ids in the order their first chunk was scheduled

    def __post_init__(self) -> None:
        self.pages = PageManager(self.num_pages, self.page_size)
        self.sched = Scheduler(self.pages, (self.token_budget,), self.max_seqs, self.policy, self.decode_rows)
        self.seqs: list[Sequence] = []

    def add(self, seq: Sequence) -> Sequence:
        self.seqs.append(seq)
        self.sched.add(seq)
        return seq

    def live(self) -> list[Sequence]:
        return list(self.sched.running) + list(self.sched.waiting)

    def check_pages(self) -> None:
        owned = [p for s in self.live() for p in s.page_table]
        free = list(self.pages.free_pages)
        assert len(owned) == len(set(owned)), f"a page is shared between live sequences: {sorted(owned)}"
        assert not set(owned) & set(free), "a page is both owned and free"
        assert sorted(owned + free) == list(range(SCRATCH_PAGES, self.num_pages)), "pages leaked or duplicated"
        for s in self.sched.waiting:
            assert s.page_table == [], "a waiting sequence holds pages"
            assert s.status is Status.WAITING
        for s in self.sched.running:
            assert s.status is Status.RUNNING
            assert len(s.page_table) * self.page_size >= s.num_computed, "computed tokens without pages"
        for s in self.finished:
            assert s.page_table == []

    def step(self) -> Step:
        running_before = list(self.sched.running)
        pending_before = {s: s.num_pending for s in running_before}
        computed_before = {s: s.num_computed for s in self.live()}
        waiting_before = list(self.sched.waiting)
        prompt_pending = bool(self.sched.waiting) or any(p > 1 for p in pending_before.values())

        plan = self.sched.schedule()

        assert plan.num_tokens <= self.token_budget
        assert len(plan.chunks) <= self.max_seqs
        seqs_in_plan = [c.seq for c in plan.chunks]
        assert len(seqs_in_plan) == len(set(seqs_in_plan)), "a sequence got two chunks in one step"
        decode_flags = []
        for c in plan.chunks:
            assert c.num_tokens >= 1
            assert c.seq.status is Status.RUNNING
            # a chunk continues exactly where the pool ends: no gap, no overlap (a preempted sequence restarts at 0)
            assert c.start == computed_before[c.seq], (c.seq.seq_id, c.start, computed_before[c.seq])
            assert c.start + c.num_tokens <= c.seq.num_tokens
            assert len(c.seq.page_table) * self.page_size >= c.start + c.num_tokens, "chunk scheduled without pages"
            decode_flags.append(c.seq in pending_before and pending_before[c.seq] == 1)
            if c.seq.seq_id not in self.admitted:
                self.admitted.append(c.seq.seq_id)
        # the waiting queue is admitted from its head, in order: nobody overtakes
        admitted_now = [c.seq for c in plan.chunks if c.seq in waiting_before]
        assert admitted_now == waiting_before[: len(admitted_now)], "a waiting request overtook the head of the queue"
        # decodes first, then prompt chunks
        assert decode_flags == sorted(decode_flags, reverse=True), f"a prompt chunk was scheduled before a decode: {decode_flags}"
        for s in plan.preempted:
            assert s.status is Status.WAITING and s.num_computed == 0 and s.page_table == []
            assert s not in seqs_in_plan
        self.check_pages()

        samplers = [c.seq for c in plan.chunks if c.samples]  # read before update/append, as the engine does
        self.sched.update(plan)
        for c in plan.chunks:
            for pos in range(c.start, c.start + c.num_tokens):
                self.computed[(c.seq.seq_id, pos)] += 1
        for seq in samplers:
            assert seq.num_pending == 0
            seq.output_token_ids.append(FAKE_TOKEN)
            if len(seq.output_token_ids) >= seq.params.max_new_tokens:
                self.sched.finish(seq, "length")
                self.finished.append(seq)
        self.check_pages()
        step = Step(plan, [c.seq for c, d in zip(plan.chunks, decode_flags) if d], prompt_pending, running_before)
        self.steps.append(step)
        return step

    def run(self, max_steps: int) -> int:
        n = 0
        while self.sched.has_work():
            running, waiting = [s.seq_id for s in self.sched.running], [s.seq_id for s in self.sched.waiting]
            assert n < max_steps, f"not done after {max_steps} steps: running {running}, waiting {waiting}"
            self.step()
            n += 1
        return n

    def assert_all_done(self) -> None:
        assert not self.sched.has_work()
        assert {s.seq_id for s in self.finished} == {s.seq_id for s in self.seqs}, "a request was dropped"
        for s in self.seqs:
            assert s.status is Status.FINISHED and s.finish_reason == "length"
            assert len(s.output_token_ids) == s.params.max_new_tokens
            assert s.page_table == []
        assert self.pages.num_free == self.num_pages - SCRATCH_PAGES

    def assert_each_position_once(self) -> None:
        """Without preemption every token but the last sampled one goes through the model exactly once."""
        for s in self.seqs:
            expected = {(s.seq_id, p) for p in range(s.num_tokens - 1)}
            got = {k for k in self.computed if k[0] == s.seq_id}
            assert got == expected, f"seq {s.seq_id}: missing {sorted(expected - got)[:5]}, extra {sorted(got - expected)[:5]}"
            assert all(self.computed[k] == 1 for k in expected), f"seq {s.seq_id}: a position was computed twice"


# ---- budget, caps, exactly-once ------------------------------------------------------------


@pytest.mark.parametrize("policy", ["splitfuse", "prefill_first"])
def test_budget_cap_and_each_prompt_token_once(policy):
    sim = Sim(num_pages=200, page_size=8, token_budget=32, max_seqs=3, policy=policy)
    lengths = [(5, 6), (40, 3), (1, 4), (70, 2), (17, 9), (32, 1), (3, 12), (33, 5)]
    for i, (p, m) in enumerate(lengths):
        sim.add(make_seq(i, p, m))
    sim.run(max_steps=500)
    sim.assert_all_done()
    sim.assert_each_position_once()
    assert all(s.num_preemptions == 0 for s in sim.seqs)
    assert max(len(st.plan.chunks) for st in sim.steps) == 3  # the cap was reached and held
    assert max(st.plan.num_tokens for st in sim.steps) == 32


def test_budget_is_filled_while_prompts_wait():
    """SplitFuse keeps every forward pass full while there is prompt work and room for it."""
    sim = Sim(num_pages=400, page_size=8, token_budget=32, max_seqs=8)
    for i in range(6):
        sim.add(make_seq(i, 45, 3))
    while sim.sched.waiting:
        step = sim.step()
        assert step.plan.num_tokens == 32, [(c.seq.seq_id, c.start, c.num_tokens) for c in step.plan.chunks]


def test_max_seqs_caps_many_decodes():
    sim = Sim(num_pages=400, page_size=8, token_budget=64, max_seqs=2)
    for i in range(5):
        sim.add(make_seq(i, 2, 6))
    sim.run(max_steps=200)
    sim.assert_all_done()
    sim.assert_each_position_once()
    assert all(len(st.plan.chunks) <= 2 for st in sim.steps)


# ---- SplitFuse -----------------------------------------------------------------------------


def test_long_prompt_is_split_while_decodes_advance():
    sim = Sim(num_pages=200, page_size=8, token_budget=32, max_seqs=4)
    a = sim.add(make_seq(0, 4, 40))
    b = sim.add(make_seq(1, 6, 40))
    while not (a.output_token_ids and b.output_token_ids):
        sim.step()
    long = sim.add(make_seq(2, 150, 2))
    long_steps = []
    while long.num_computed < len(long.prompt_token_ids):
        before_a, before_b = len(a.output_token_ids), len(b.output_token_ids)
        step = sim.step()
        chunks = [c for c in step.plan.chunks if c.seq is long]
        assert chunks, "the long prompt made no progress this step"
        long_steps.append(chunks[0].num_tokens)
        # both running decodes advanced in the same forward pass as the prompt chunk
        assert step.decode_seqs[:2] == [a, b]
        assert (len(a.output_token_ids), len(b.output_token_ids)) == (before_a + 1, before_b + 1)
        assert step.plan.chunks[-1].seq is long  # the prompt chunk comes after the decodes
        assert step.plan.num_tokens == 32 or chunks[0].start + chunks[0].num_tokens == 150  # full passes but the last
    assert len(long_steps) >= math.ceil(150 / (32 - 2)), long_steps
    assert sum(long_steps) == 150
    sim.run(max_steps=200)
    sim.assert_all_done()
    sim.assert_each_position_once()


def test_decode_region_caps_decodes_and_prompts_fill_the_rest():
    """decode_rows=8: at most 8 running sequences, so every one decodes every step; prompt
    chunks take the budget the decodes leave, the decode rows they leave free included."""
    sim = Sim(num_pages=400, page_size=8, token_budget=40, max_seqs=16, decode_rows=8)
    early = [sim.add(make_seq(i, 3, 30)) for i in range(7)]
    while sum(bool(s.output_token_ids) for s in early) < 7:
        sim.step()
    long = sim.add(make_seq(99, 200, 2))
    later = [sim.add(make_seq(100 + i, 3, 5)) for i in range(4)]
    saw_full_budget = False
    while long.num_computed < len(long.prompt_token_ids):
        plan = sim.step().plan
        decodes = plan.num_decode_tokens
        prompt = plan.num_tokens - decodes
        assert decodes <= 8 and decodes + prompt <= 40 and len(sim.sched.running) <= 8
        assert all(s in [c.seq for c in plan.chunks] for s in sim.sched.running if s.output_token_ids)  # nobody starves
        saw_full_budget |= decodes < 8 and decodes + prompt == 40  # prompt tokens in free decode rows
    assert all(not s.output_token_ids for s in later)  # admitted only as running ones finish
    assert saw_full_budget
    sim.run(max_steps=400)
    sim.assert_all_done()
    sim.assert_each_position_once()


def test_decodes_are_scheduled_before_prompt_chunks():
    sim = Sim(num_pages=200, page_size=8, token_budget=16, max_seqs=8)
    for i in range(3):
        sim.add(make_seq(i, 3, 10))
    sim.step()  # all three prompts in one pass
    for i in range(3, 6):
        sim.add(make_seq(i, 20, 2))
    step = sim.step()
    kinds = ["decode" if c.seq in step.decode_seqs else "prompt" for c in step.plan.chunks]
    assert kinds[:3] == ["decode"] * 3 and "prompt" in kinds[3:] and "decode" not in kinds[3:], kinds
    sim.run(max_steps=200)  # the per-step ordering check runs on every remaining step too
    sim.assert_all_done()


def test_waiting_requests_are_admitted_in_arrival_order():
    sim = Sim(num_pages=200, page_size=8, token_budget=24, max_seqs=4)
    lengths = [30, 2, 50, 1, 7, 24, 3, 9]
    for i, p in enumerate(lengths):
        sim.add(make_seq(i, p, 3))
    sim.run(max_steps=300)
    sim.assert_all_done()
    assert sim.admitted == list(range(len(lengths)))


def test_head_of_queue_is_not_overtaken_when_it_does_not_fit():
    """A big prompt at the head that cannot get pages yet blocks smaller ones behind it (arrival order)."""
    sim = Sim(num_pages=9, page_size=8, token_budget=64, max_seqs=4)  # 8 usable pages = 64 tokens
    first = sim.add(make_seq(0, 40, 20))  # takes 5 pages now, up to 8 later
    sim.step()
    big = sim.add(make_seq(1, 40, 2))
    small = sim.add(make_seq(2, 2, 2))
    sim.step()
    assert big.num_computed == 16 and small.num_computed == 0  # big got the two free pages, small may not pass it
    sim.run(max_steps=500)  # the per-step check asserts nobody overtakes the queue head
    sim.assert_all_done()
    assert sim.admitted.index(1) < sim.admitted.index(2)
    assert first.finish_reason == "length"


# ---- pages ---------------------------------------------------------------------------------


def test_pages_return_to_the_free_list_on_finish():
    sim = Sim(num_pages=50, page_size=8, token_budget=32, max_seqs=4)
    seqs = [sim.add(make_seq(i, 10 + 7 * i, 5)) for i in range(4)]
    while seqs[0].status is not Status.FINISHED:
        sim.step()
    assert seqs[0].page_table == []
    owned = sum(len(s.page_table) for s in sim.live())
    assert sim.pages.num_free == 49 - owned
    sim.run(max_steps=200)
    sim.assert_all_done()
    assert sorted(sim.pages.free_pages) == list(range(1, 50))


def test_pages_return_to_the_free_list_on_abort():
    sim = Sim(num_pages=50, page_size=8, token_budget=32, max_seqs=4)
    running = sim.add(make_seq(0, 30, 50))
    other = sim.add(make_seq(1, 5, 50))
    queued = [sim.add(make_seq(i, 20, 5)) for i in range(2, 12)]
    for _ in range(3):
        sim.step()
    assert running.status is Status.RUNNING and running.page_table
    free_before, held = sim.pages.num_free, len(running.page_table)
    sim.sched.finish(running, "abort")
    assert running.status is Status.FINISHED and running.finish_reason == "abort"
    assert running.page_table == []
    assert sim.pages.num_free == free_before + held
    assert running not in sim.sched.running
    sim.check_pages()

    waiting = queued[-1]
    assert waiting.status is Status.WAITING and waiting in sim.sched.waiting
    sim.sched.finish(waiting, "abort")
    assert waiting not in sim.sched.waiting and waiting.finish_reason == "abort"
    sim.check_pages()

    sim.seqs = [s for s in sim.seqs if s not in (running, waiting)]
    sim.run(max_steps=500)
    sim.assert_all_done()
    assert other.finish_reason == "length"
    assert sorted(sim.pages.free_pages) == list(range(1, 50))
    assert (running.seq_id, 0) in sim.computed and all(k[0] != waiting.seq_id for k in sim.computed)


def test_page_manager_basics():
    with pytest.raises(ValueError, match="more than"):
        PageManager(1, 8)
    bm = PageManager(5, 4)
    assert bm.capacity_tokens == 16 and bm.num_free == 4
    s = make_seq(0, 3, 1)
    assert bm.pages_needed(s, 9) == 3 and bm.tokens_fitting(s) == 16
    bm.grow(s, 9)
    assert len(s.page_table) == 3 and 0 not in s.page_table and bm.num_free == 1
    assert bm.pages_needed(s, 12) == 0 and bm.pages_needed(s, 13) == 1
    with pytest.raises(RuntimeError, match="needs 2 pages, 1 free"):
        bm.grow(s, 17)
    bm.release(s)
    assert s.page_table == [] and sorted(bm.free_pages) == [1, 2, 3, 4]


# ---- preemption and tiny pools -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["splitfuse", "prefill_first"])
def test_tiny_pool_preempts_and_everything_finishes(policy):
    sim = Sim(num_pages=7, page_size=4, token_budget=16, max_seqs=4, policy=policy)  # 24 usable slots
    for i, (p, m) in enumerate([(6, 14), (9, 10), (3, 18), (12, 8), (5, 15), (2, 20)]):
        sim.add(make_seq(i, p, m))
    sim.run(max_steps=2000)
    sim.assert_all_done()
    assert sum(s.num_preemptions for s in sim.seqs) > 0, "the tiny pool never forced a preemption"
    assert any(st.plan.preempted for st in sim.steps)
    # recomputation covered every position again, still contiguous (checked per step); the finals are consistent
    for s in sim.seqs:
        assert all(sim.computed[(s.seq_id, p)] >= 1 for p in range(s.num_tokens - 1))


@pytest.mark.parametrize(
    "policy,prompt_len,max_new",
    [
        ("splitfuse", 30, 10),
        ("splitfuse", 10, 30),
        ("splitfuse", 39, 1),
        ("splitfuse", 1, 39),
        ("prefill_first", 30, 10),
        ("prefill_first", 10, 30),
        ("prefill_first", 39, 1),
        ("prefill_first", 1, 39),
    ],
)
def test_no_deadlock_when_the_pool_holds_exactly_one_sequence(policy, prompt_len, max_new):
    page_size, budget = 4, 16
    num_pages = SCRATCH_PAGES + (prompt_len + max_new) // page_size  # prompt + max_new_tokens fill the whole pool
    sim = Sim(num_pages=num_pages, page_size=page_size, token_budget=budget, max_seqs=4, policy=policy)
    assert sim.pages.capacity_tokens == prompt_len + max_new
    for i in range(3):
        sim.add(make_seq(i, prompt_len, max_new))
    # generous bound: each generated token may cost a full recompute of its sequence
    total = prompt_len + max_new
    bound = 3 * max_new * (math.ceil(total / budget) + 2) + 3 * (math.ceil(total / budget) + 2)
    sim.run(max_steps=bound)
    sim.assert_all_done()


def test_preempted_sequence_keeps_its_output_and_recomputes_it():
    sim = Sim(num_pages=5, page_size=4, token_budget=16, max_seqs=4)  # 16 usable slots
    a = sim.add(make_seq(0, 4, 12))
    b = sim.add(make_seq(1, 4, 12))
    preempted_with = None
    while sim.sched.has_work():
        step = sim.step()
        for s in step.plan.preempted:
            if preempted_with is None:
                preempted_with = (s, len(s.output_token_ids))
    sim.assert_all_done()
    assert preempted_with is not None
    victim, n_out = preempted_with
    assert victim is b, "the newest sequence should be preempted first"
    # its recompute covered prompt + the output it already had
    assert all(sim.computed[(victim.seq_id, p)] >= 2 for p in range(4 + n_out - 1))
    assert a.num_preemptions == 0


# ---- prefill-first policy ------------------------------------------------------------------


def test_prefill_first_runs_no_decode_while_a_prompt_is_pending():
    sim = Sim(num_pages=200, page_size=8, token_budget=16, max_seqs=4, policy="prefill_first")
    for i in range(2):
        sim.add(make_seq(i, 4, 10))
    sim.step()
    late = [sim.add(make_seq(i, 40, 3)) for i in range(2, 4)]
    saw_prompt_only_step = saw_decode_step = False
    while sim.sched.has_work():
        step = sim.step()
        if step.prompt_pending:
            assert step.plan.num_decode_tokens == 0 and not step.decode_seqs, "a decode ran while a prompt was pending"
            saw_prompt_only_step = True
        elif step.decode_seqs:
            saw_decode_step = True
        if len(sim.steps) == 2:
            assert all(c.seq in late for c in step.plan.chunks)
    sim.assert_all_done()
    sim.assert_each_position_once()
    assert saw_prompt_only_step and saw_decode_step


def test_splitfuse_mixes_decodes_and_prompts_in_one_pass():
    """The contrast to prefill-first: the same workload puts decodes beside prompt chunks."""
    sim = Sim(num_pages=200, page_size=8, token_budget=16, max_seqs=4)
    for i in range(2):
        sim.add(make_seq(i, 4, 10))
    sim.step()
    for i in range(2, 4):
        sim.add(make_seq(i, 40, 3))
    step = sim.step()
    assert len(step.decode_seqs) == 2 and step.plan.num_tokens == 16
    assert any(c.seq.seq_id >= 2 for c in step.plan.chunks)


def test_unknown_policy_is_rejected():
    with pytest.raises(ConfigError, match="unknown scheduling policy 'fifo'; choose one of splitfuse, prefill_first"):
        EngineConfig(policy="fifo")


@pytest.mark.parametrize("policy", ["splitfuse", "prefill_first"])
def test_minimal_two_request_tiny_pool_terminates(policy):
    """Smallest case found: 2 usable pages of 4 slots, budget 4; A = 1 prompt + 5 new tokens, B = 6 prompt + 1 new.

    prefill_first repeats a 3-step cycle forever: A's recompute leaves 1 token pending (a decode, blocked while B
    waits), B is admitted into the last free page and gets stuck, then both are preempted and the plan is empty.
    """
    sim = Sim(num_pages=3, page_size=4, token_budget=4, max_seqs=4, policy=policy)
    sim.add(make_seq(0, 1, 5))
    sim.add(make_seq(1, 6, 1))
    sim.run(max_steps=100)
    sim.assert_all_done()

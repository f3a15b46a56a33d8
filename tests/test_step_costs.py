"""The SLA-aware token budget: the scheduler's choice against given step-cost curves (pure
bookkeeping, no model), then the measured curve on a compiled engine: kept with the graphs,
and zero recompiles when it sizes the steps."""

from __future__ import annotations

import pytest
import torch

from conftest import ENGINE_CONFIG
from fastgen_compile import LLM, SamplingParams
from fastgen_compile.engine import graph_cache, step_costs
from fastgen_compile.engine.graph_cache import GraphCache
from fastgen_compile.engine.pages import PageManager
from fastgen_compile.engine.scheduler import DEADLINE_MARGIN, Scheduler
from fastgen_compile.engine.sequence import Sequence
from fastgen_compile.engine.step_costs import StepCosts

BUCKETS = (8, 32, 96, 288)
FLAT = StepCosts({b: 0.010 for b in BUCKETS}, 0.0, 0.0)  # a GPU in its memory-bound range
# a CPU whose steps cost in proportion to their rows: prompt tokens/s at 4 decodes is
# 400, 933, 1150 and 1235 for chunks of 4, 28, 92 and 284, so the knee (90% of the best) is 92
STEEP = StepCosts({8: 0.010, 32: 0.030, 96: 0.080, 288: 0.230}, 0.0, 0.0)
DECODES = 4
PROMPT_RATE = 512.0


def seq(seq_id: int, prompt_len: int, arrival: float = 0.0) -> Sequence:
    return Sequence(seq_id, [3 + i % 500 for i in range(prompt_len)], SamplingParams(max_new_tokens=64), arrival=arrival)


def scheduler(decodes: int = DECODES) -> Scheduler:
    """`decodes` sequences decoding, their prompts computed without a cost curve."""
    s = Scheduler(PageManager(512, 16), BUCKETS, max_seqs=64)
    for i in range(decodes):
        s.add(seq(100 + i, 16))
    s.update(s.schedule())
    for d in s.running:
        d.output_token_ids.append(7)
    return s


def plan_for(s: Scheduler, costs: StepCosts, prompt: Sequence, now: float = 0.0, itl_target: float | None = None, prompt_rate: float = 0.0):
    s.use_costs(costs, itl_target, prompt_rate)
    s.add(prompt)
    plan = s.schedule(now)
    assert plan.num_decode_tokens == len(s.running) - 1  # every decode ran, the prompt was admitted
    return plan


def test_costs_predict_and_survive_json():
    costs = StepCosts({8: 0.01, 32: 0.03}, 2e-6, 1e-6)
    assert costs.predict(32, decode_keys=1000, prompt_keys=5000) == pytest.approx(0.03 + 2e-3 + 5e-3)
    assert StepCosts.from_json(costs.to_json()) == costs
    assert costs.table() == [(8, 10.0), (32, 30.0)]


def test_a_flat_curve_gives_prompts_the_whole_budget():
    plan = plan_for(scheduler(), FLAT, seq(1, 1000))
    assert plan.num_tokens == 288


def test_a_steep_curve_stops_at_its_knee():
    plan = plan_for(scheduler(), STEEP, seq(1, 1000))
    assert plan.num_tokens == 96


def test_with_no_decodes_prompts_take_the_whole_budget():
    plan = plan_for(scheduler(decodes=0), STEEP, seq(1, 1000), itl_target=0.02)
    assert plan.num_tokens == 288 and plan.num_decode_tokens == 0


def test_an_itl_target_gives_the_most_prompt_tokens_predicted_within_it():
    costs = StepCosts(STEEP.bucket_seconds, 1e-6, 1e-6)
    # 0.0305 s: bucket 32 with 20 prompt tokens (400 prompt keys) is predicted at 30.47 ms, with 21 at 30.51
    for target, tokens in [(0.0305, 20), (0.05, 28), (0.1, 92)]:
        plan = plan_for(scheduler(), costs, seq(1, 1000), itl_target=target)
        assert plan.num_tokens - DECODES == tokens
        bucket = next(b for b in BUCKETS if b >= plan.num_tokens)
        assert costs.predict(bucket, plan.decode_keys, plan.prompt_keys) <= target
    # nothing fits: one prompt token still goes, so a prompt is never starved
    assert plan_for(scheduler(), costs, seq(1, 1000), itl_target=0.005).num_tokens == DECODES + 1


def test_a_prompt_with_time_to_spare_gets_the_smallest_chunk_that_keeps_its_deadline():
    # 600 tokens: deadline 0.9 * 600 / 512 = 1.05 s; chunks of 4 need 150 steps of 10 ms (1.5 s), chunks of 28 need 22 of 30 ms
    plan = plan_for(scheduler(), STEEP, seq(1, 600), prompt_rate=PROMPT_RATE)
    assert plan.num_tokens == 32


def test_a_deadline_the_knee_would_miss_gets_a_larger_step():
    # 2272 = 8 x 284 tokens: 8 steps at 288 rows (1.84 s) against 25 at the knee's 96 (2.0 s)
    prompt_len = 2272
    deadline = DEADLINE_MARGIN * prompt_len / PROMPT_RATE
    plan = plan_for(scheduler(), STEEP, seq(1, prompt_len), now=deadline - 1.94, prompt_rate=PROMPT_RATE)
    assert plan.num_tokens == 288
    # with less time left than any chunk size needs, the knee again: the decodes do not pay for a lost deadline
    plan = plan_for(scheduler(), STEEP, seq(1, prompt_len), now=deadline - 1.5, prompt_rate=PROMPT_RATE)
    assert plan.num_tokens == 96


def test_a_prompt_already_late_is_not_slowed_below_the_knee():
    plan = plan_for(scheduler(), STEEP, seq(1, 600), now=5.0, prompt_rate=PROMPT_RATE)
    assert plan.num_tokens == 96


def test_the_prompts_behind_the_first_count_too():
    # 552 = 6 x 92 tokens, deadline 0.97 s: alone, chunks of 28 make it (20 steps of 30 ms); a second such
    # prompt queued behind it ends at 1.2 s in chunks of 28, at 0.96 s in chunks of 92
    assert plan_for(scheduler(), STEEP, seq(1, 552), prompt_rate=PROMPT_RATE).num_tokens == 32
    s = scheduler()
    s.add(seq(1, 552))
    plan = plan_for(s, STEEP, seq(2, 552), prompt_rate=PROMPT_RATE)
    assert plan.num_tokens == 96 and [c.seq.seq_id for c in plan.chunks[DECODES:]] == [1]


def test_without_a_curve_the_budget_is_fixed():
    s = scheduler()
    s.add(seq(1, 1000))
    assert s.schedule(0.0).num_tokens == 288


# ---- on the compiled engine ------------------------------------------------------------


def test_the_curve_is_kept_with_the_graphs_and_not_reused_on_another_cpu(tmp_path, monkeypatch):
    def cache() -> GraphCache:
        return GraphCache(tmp_path, "m", {"capability": graph_cache.device_capability(torch.device("cpu"))}).open()

    costs = StepCosts({16: 0.004, 64: 0.011}, 1e-7, 2e-7)
    first = cache()
    assert first.record(step_costs.RECORD) is None
    first.save_record(step_costs.RECORD, costs.to_json())
    first.save([])
    assert StepCosts.from_json(cache().record(step_costs.RECORD)) == costs  # a warm start reads it
    monkeypatch.setattr(graph_cache, "cpu_flags", lambda: frozenset({"sse2"}))  # another kind of CPU
    assert cache().record(step_costs.RECORD) is None


def test_warmup_measured_every_bucket_and_an_engine_without_warmup_reads_it(llm_compiled):
    engine = llm_compiled.engine
    costs = engine.step_costs
    assert costs is not None and set(costs.bucket_seconds) == set(engine.config.buckets)
    assert all(s > 0 for s in costs.bucket_seconds.values())
    assert engine.compiler.graph_cache.record(step_costs.RECORD) == costs.to_json()
    cold = LLM(**{**ENGINE_CONFIG, "compile": True, "warmup": False})
    try:
        assert cold.engine.step_costs == costs  # from the graph cache, before any graph is loaded
    finally:
        cold.close()


def test_the_sla_aware_budget_recompiles_nothing_and_keeps_greedy_output(llm_compiled, wait_idle):
    """An ITL target between the two buckets' predicted times: decode steps stay in bucket 16 while a long
    prompt arrives, so prompts go in smaller chunks than the fixed budget's; outputs stay the same."""
    llm = llm_compiled
    engine = llm.engine
    # the short prompts decode from the second step on, while the long one is still being computed
    prompts = ["Hello there", "A list of fruits:", "Once upon a time", "Tell me about the sea. " * 40]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    assert wait_idle(llm)
    fixed = [o.token_ids for o in llm.generate(prompts, params)]
    assert wait_idle(llm)
    costs = engine.step_costs
    target = (costs.bucket_seconds[16] + costs.bucket_seconds[64]) / 2
    steps_before = engine.num_steps
    engine.scheduler.use_costs(costs, target, 0.0)
    llm.reset_prefix_cache()  # the long prompt computed again, not found in the cache
    try:
        sla = [o.token_ids for o in llm.generate(prompts, params)]
        assert wait_idle(llm)
    finally:
        engine.scheduler.use_costs(None, None, 0.0)
    steps = engine.steps_since(steps_before)
    assert sla == fixed
    assert engine.compiler.recompiles_since_warmup() == 0
    mixed = [s for s in steps if s.decode_tokens and s.prompt_tokens]
    assert mixed and all(s.bucket == 16 for s in mixed)  # a prompt beside decodes never took the 64-row bucket

"""Automatic prefix caching: the page bookkeeping alone, then engines with it on and off.

The bookkeeping tests drive PageManager and Scheduler with no model. The engine tests compare
greedy tokens with caching on and off (compiled, fp32 and bf16, a tiny Llama whose pool is small
enough to force preemption; in bf16 up to the first tie, see BF16_TIE) and the embedded model against transformers, and after every
request check that each page is referenced, cached-free or plain-free, exactly once.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from fastgen_compile import LLM, SamplingParams
from fastgen_compile.engine import pages as pages_module
from fastgen_compile.engine.batch import pack
from fastgen_compile.engine.pages import SCRATCH_PAGES, PageManager
from fastgen_compile.engine.scheduler import Scheduler
from fastgen_compile.engine.sequence import Sequence, Status
from tiny_llama import VOCAB, one_torch_thread, save_tiny_llama  # noqa: F401 (a module fixture)

PAGE = 16


def seq(seq_id: int, tokens: list[int], max_new_tokens: int = 4) -> Sequence:
    return Sequence(seq_id, list(tokens), SamplingParams(max_new_tokens=max_new_tokens))


def check_pages(pm: PageManager, running: list[Sequence] = ()) -> None:
    """Every page but the scratch one is exactly one of: referenced, cached-free, plain-free; the
    reference counts are the running page tables' counts; the hash maps agree."""
    held = Counter(p for s in running for p in s.page_table)
    referenced = {p for p in range(SCRATCH_PAGES, pm.num_pages) if pm.refs[p] > 0}
    cached_free, plain_free = set(pm.cached_free), set(pm.free_pages)
    assert len(cached_free) == len(pm.cached_free) and len(plain_free) == len(pm.free_pages), "a page is free twice"
    assert not (referenced & cached_free) and not (referenced & plain_free) and not (cached_free & plain_free)
    assert referenced | cached_free | plain_free == set(range(SCRATCH_PAGES, pm.num_pages)), "a page leaked"
    assert all(pm.refs[p] == held[p] for p in range(SCRATCH_PAGES, pm.num_pages))
    assert all(p in pm.hash_of for p in cached_free) and not any(p in pm.hash_of for p in plain_free)
    assert {pm.page_of[h]: h for h in pm.page_of} == pm.hash_of and set(pm.content) == set(pm.hash_of)


def run_prompt(sched: Scheduler, s: Sequence) -> None:
    """Admit s and compute its whole prompt (what the engine does around the forward pass)."""
    sched.add(s)
    while s.num_pending > 0 and s.status is not Status.FINISHED:
        plan = sched.schedule()
        sched.update(plan)
        if s.num_pending == 0:
            return


def scheduler(num_pages: int = 32, budget: int = 64) -> Scheduler:
    return Scheduler(PageManager(num_pages, PAGE, prefix_caching=True, identity="test"), (16, budget), max_seqs=8)


# ---- bookkeeping, no model ------------------------------------------------------------


def test_a_repeated_prompt_takes_its_full_pages_and_leaves_the_last_token_to_compute():
    sched = scheduler()
    pm = sched.pages
    for length in (16, 17, 40, 48, 63, 64, 65):
        prompt = [length] + list(range(100, 100 + length - 1))
        first, again = seq(1, prompt), seq(2, prompt)
        run_prompt(sched, first)
        assert first.num_cached_tokens == 0
        run_prompt(sched, again)
        expected = (length - 1) // PAGE * PAGE
        assert again.num_cached_tokens == expected, length
        assert again.page_table[: expected // PAGE] == first.page_table[: expected // PAGE]
        check_pages(pm, [first, again])
        for s in (first, again):
            sched.finish(s, "stop")
        check_pages(pm)
    assert pm.num_hit_tokens == sum((n - 1) // PAGE * PAGE for n in (16, 17, 40, 48, 63, 64, 65))


def test_the_first_chunk_starts_after_the_cached_prefix_and_the_budget_counts_computed_tokens():
    sched = scheduler(budget=64)
    shared = list(range(1000, 1096))  # six pages
    run_prompt(sched, seq(1, shared + [5, 6, 7]))
    s = seq(2, shared + [8, 9])
    sched.add(s)
    plan = sched.schedule()
    (chunk,) = plan.chunks
    assert (chunk.start, chunk.num_tokens, plan.num_tokens) == (96, 2, 2)
    assert s.num_cached_tokens == 96 and sched.pages.num_queried_tokens == 99 + 98 and sched.pages.num_hit_tokens == 96


def test_only_the_common_leading_pages_are_shared():
    sched = scheduler()
    a = list(range(200, 264))
    b = a[:32] + [7] * 32  # the same first two pages, then other tokens
    run_prompt(sched, seq(1, a + [1]))
    s = seq(2, b + [1])
    run_prompt(sched, s)
    assert s.num_cached_tokens == 32


def test_a_hash_collision_is_caught_by_the_token_check(monkeypatch):
    monkeypatch.setattr(pages_module, "page_hash", lambda parent, tokens: 42)  # every page the same hash
    sched = scheduler()
    run_prompt(sched, seq(1, list(range(300, 340))))
    s = seq(2, list(range(400, 440)))  # other tokens, same hashes
    run_prompt(sched, s)
    assert s.num_cached_tokens == 0
    same = seq(3, list(range(300, 340)))
    run_prompt(sched, same)
    assert same.num_cached_tokens == 16  # page 0 matches; page 1's hash (42) names page 0, whose tokens differ


def test_freed_pages_stay_cached_and_are_evicted_last_pages_first_only_when_needed():
    sched = scheduler(num_pages=9)  # 8 usable pages
    pm = sched.pages
    old = seq(1, list(range(500, 564)) + [1])  # 4 full pages + 1
    run_prompt(sched, old)
    sched.finish(old, "stop")
    assert (pm.num_free, pm.num_cached, len(pm.free_pages)) == (8, 4, 4)
    check_pages(pm)
    # 5 pages: the 4 plain free ones, then the least recently used cached page, which is old's last full page
    newcomer = seq(2, list(range(700, 780)))
    run_prompt(sched, newcomer)
    assert pm.num_cached == 3 + 5  # old's first three pages, and the newcomer's five
    check_pages(pm, [newcomer])
    sched.finish(newcomer, "stop")
    again = seq(3, list(range(500, 564)) + [1])
    run_prompt(sched, again)  # three pages found; two more evict the newcomer's last two
    assert again.num_cached_tokens == 48 and pm.num_cached == 3 + 3 + 1  # and its own 4th page, computed again
    check_pages(pm, [again])


def test_preemption_releases_references_and_keeps_the_cached_pages():
    sched = scheduler(num_pages=8)  # 7 usable pages
    pm = sched.pages
    a, b = seq(1, list(range(600, 648)), max_new_tokens=40), seq(2, list(range(650, 690)), max_new_tokens=40)
    sched.add(a)
    sched.add(b)
    preempted = []
    for _ in range(60):  # decode both until one is preempted
        plan = sched.schedule()
        preempted += plan.preempted
        sched.update(plan)
        for c in plan.chunks:
            if c.samples:
                c.seq.output_token_ids.append(7)
        check_pages(pm, sched.running)
        if preempted:
            break
    assert preempted and preempted[0].status is Status.WAITING and not preempted[0].page_table
    assert pm.num_cached >= 2  # the victim's full pages are still findable
    victim = preempted[0]
    while victim.status is Status.WAITING:
        sched.finish(next(s for s in sched.running), "stop")
        plan = sched.schedule()
        sched.update(plan)
    assert victim.num_cached_tokens > 0  # its recompute starts from its own cached pages
    check_pages(pm, sched.running)


def test_reset_forgets_every_hash_and_off_means_off():
    sched = scheduler()
    pm = sched.pages
    a = seq(1, list(range(800, 850)))
    run_prompt(sched, a)
    assert pm.reset_prefix_cache() == 3
    sched.finish(a, "stop")
    check_pages(pm)
    assert pm.num_cached == 0 and pm.num_free == pm.num_pages - SCRATCH_PAGES
    b = seq(2, list(range(800, 850)))
    run_prompt(sched, b)
    assert b.num_cached_tokens == 0
    off = Scheduler(PageManager(32, PAGE), (16, 64), max_seqs=8)
    run_prompt(off, seq(1, list(range(800, 850))))
    c = seq(2, list(range(800, 850)))
    run_prompt(off, c)
    assert c.num_cached_tokens == 0 and off.pages.num_cached == 0


def test_a_query_block_mixing_sequences_lists_their_shared_pages_once_and_sees_them_through_bits():
    sched = scheduler(budget=64)
    shared = list(range(900, 932))  # two pages
    run_prompt(sched, seq(1, shared + [1]))
    a, b = seq(2, shared + [2, 3, 4]), seq(3, shared + [5, 6])
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [(c.start, c.num_tokens) for c in plan.chunks] == [(32, 3), (32, 2)]
    batch = pack(plan, 64, 16, PAGE, 16, sched.pages.num_pages)
    blocks = batch.prompt_blocks  # rows 16..20 are one query block holding both chunks
    listed = blocks.kv_indices[0, 0, 0, : blocks.kv_num_blocks[0, 0, 0]].tolist()
    assert sorted(listed) == sorted(set(listed)) and set(a.page_table) | set(b.page_table) == set(listed)
    bit_a, bit_b = batch.q_bit[16].item(), batch.q_bit[19].item()
    assert bit_a != bit_b and batch.q_bit[:16].eq(63).all() and batch.q_bit[21:].eq(63).all()
    for page in a.page_table[:2]:  # the shared pages carry both bits; the chunks' own pages none
        assert batch.page_bits[page].item() == (1 << bit_a) | (1 << bit_b)
    assert batch.page_bits[a.page_table[2]].item() == batch.page_bits[b.page_table[2]].item() == 0


# ---- engines ----------------------------------------------------------------------------

# a tiny Llama, compiled: page 16 and q_block 16 as the session engines, a 64-row budget, and
# a pool of 23 usable pages (368 tokens), so the batches below force preemption
TINY = dict(buckets=(16, 64), decode_rows=16, page_size=PAGE, q_block=16, kv_pages=24, max_seqs=8, strict_recompiles=True, itl_target_ms=0)
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
# bf16 logits of this model are multiples of 1/32 to 1/16: two tokens within this are a tie that
# any change of summation order (another chunking, another bucket's kernel) may break either way,
# caching or not (measured: without caching, a preempting pool alone flips one such tie)
BF16_TIE = 0.125


def assert_same_greedy(outs, reference, dtype: str) -> None:
    """Token for token in fp32; in bf16, token for token up to the first tie of the reference."""
    for out, ref in zip(outs, reference, strict=True):
        if dtype == "float32":
            assert out.token_ids == ref.token_ids
            continue
        for i, (mine, theirs) in enumerate(zip(out.token_ids, ref.token_ids, strict=True)):
            if mine != theirs:
                (_, best), (_, second) = ref.logprobs[i].top[:2]
                assert best - second <= BF16_TIE, f"token {i}: {mine} != {theirs} with a margin of {best - second}"
                break


def prompts_sharing_prefixes(rng: random.Random) -> list[list[int]]:
    """Shared prefixes of several lengths (page-aligned and not) with distinct tails."""
    system = [rng.randrange(3, VOCAB) for _ in range(70)]
    doc = [rng.randrange(3, VOCAB) for _ in range(32)]
    out = []
    for cut in (16, 33, 48, 70):
        for _ in range(2):
            out.append(system[:cut] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 20))])
    out += [doc + [rng.randrange(3, VOCAB)] for _ in range(2)] + [doc]
    return out


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def tiny_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(folder, seed=11)
    on = LLM(model=str(folder), dtype=request.param, **TINY)
    off = LLM(model=str(folder), dtype=request.param, prefix_caching=False, **TINY)
    yield on, off, request.param
    on.close()
    off.close()


def test_greedy_tokens_are_identical_with_caching_on_and_off(tiny_pair, wait_idle):
    on, off, dtype = tiny_pair
    prompts = prompts_sharing_prefixes(random.Random(5))
    together_off = off.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert_same_greedy(on.generate(prompt_token_ids=prompts, sampling_params=GREEDY), together_off, dtype)
    assert on.engine.scheduler.num_preemptions > 0  # the small pool preempted
    assert wait_idle(on)
    check_pages(on.engine.pages)
    one_by_one = []
    for p in prompts:
        one_by_one += on.generate(prompt_token_ids=[p], sampling_params=GREEDY)
        assert wait_idle(on)
        check_pages(on.engine.pages)
    assert_same_greedy(one_by_one, together_off, dtype)
    assert sum(o.num_cached_tokens for o in one_by_one) > 0


def test_cached_tokens_of_a_repeated_prompt(tiny_pair, wait_idle):
    on, _, dtype = tiny_pair
    for length in (16, 40, 64, 65):
        prompt = [5 + length] + [9] * (length - 1)
        first = on.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
        again = on.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
        assert (first.num_cached_tokens, again.num_cached_tokens) == (0, (length - 1) // PAGE * PAGE)
        assert_same_greedy([again], [first], dtype)
    assert wait_idle(on)
    check_pages(on.engine.pages)


def test_eviction_under_memory_pressure_keeps_outputs_right(tiny_pair, wait_idle):
    on, off, dtype = tiny_pair
    rng = random.Random(9)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(100)] for _ in range(6)]  # 36 pages of prompts in a 23-page pool
    for p in prompts:
        on.generate(prompt_token_ids=[p], sampling_params=GREEDY)
    assert wait_idle(on)
    check_pages(on.engine.pages)
    # 6 x 7 pages through a 23-page pool: the oldest prompts' pages were evicted, the newest kept
    outs = on.generate(prompt_token_ids=[prompts[0], prompts[-1]], sampling_params=GREEDY)
    assert [o.num_cached_tokens for o in outs] == [0, 96]
    assert_same_greedy(outs, off.generate(prompt_token_ids=[prompts[0], prompts[-1]], sampling_params=GREEDY), dtype)
    assert wait_idle(on)
    check_pages(on.engine.pages)


def test_the_embedded_model_with_cached_prefixes_equals_transformers(llm_compiled, hf_model, hf_tokenizer, wait_idle):
    document = "The history of the city goes back two thousand years, to a small fishing village on the river. " * 2
    questions = ["The capital of France is", "The first three prime numbers are", "On a clear day the sky is"]
    prompts = [hf_tokenizer.encode(document + q) for q in questions]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    first = llm_compiled.generate(prompt_token_ids=prompts[:1], sampling_params=params)[0]
    outs = llm_compiled.generate(prompt_token_ids=prompts, sampling_params=params)
    assert all(o.num_cached_tokens >= 16 for o in outs)  # the system prompt's pages, computed by the first request
    with torch.no_grad():
        reference = [hf_model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist() for p in prompts]
    assert [o.token_ids for o in outs] == reference and all(len(r) == 8 for r in reference)  # no early eos: 8 tokens compared
    assert first.token_ids == reference[0]
    assert wait_idle(llm_compiled)
    check_pages(llm_compiled.engine.pages)

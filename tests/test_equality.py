"""Greedy fp32 output equals transformers' generate() token for token, under SplitFuse.

All prompts go to the engine in ONE generate() call: with a 64-token budget the long
prompts are split over many steps and fused with the short prompts' decodes, so this
checks chunked prefill, paged attention across chunks and mixed batches at once.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from fastgen_compile import SamplingParams
from fastgen_compile.models import loader
from fastgen_compile.models.decoder import ModelArgs
from fastgen_compile.models.registry import resolve
from fastgen_compile.models.rope import RopeArgs

MAX_NEW_TOKENS = 24

PARAGRAPHS = [
    "The old lighthouse on the northern cape was built in 1857, after three ships ran aground on the reef during a single winter. "
    "Its keeper lived in a small stone cottage beside the tower and climbed the spiral staircase twice a night to trim the wick, "
    "polish the lens and record the weather in a leather-bound logbook that still survives in the town museum.",
    "To make a simple loaf of bread, dissolve a teaspoon of dry yeast in warm water with a pinch of sugar and wait until it foams. "
    "Mix in flour and salt, knead the dough for about ten minutes until it feels smooth and elastic, then leave it covered in a warm "
    "place for an hour. Shape it, let it rise again, and bake it in a hot oven until the crust sounds hollow when tapped.",
    "Jupiter is the largest planet in the solar system, a gas giant more than eleven times wider than Earth. Its Great Red Spot is a "
    "storm that has raged for at least three hundred years, and its dozens of moons include Ganymede, which is larger than the planet "
    "Mercury, and Europa, whose icy crust may hide an ocean of liquid water.",
    "When a program grows beyond a few hundred lines, it helps to split it into modules with clear responsibilities. Each function "
    "should do one thing, take explicit inputs and return explicit outputs, so that it can be tested in isolation. Good names matter "
    "more than clever tricks: the next reader of the code is often yourself, six months later, with no memory of why it works.",
    "Tomatoes need at least six hours of direct sunlight a day and soil that drains well. Gardeners usually plant seedlings after the "
    "last spring frost, water them deeply but not too often, and tie the stems to stakes as the plants grow heavy with fruit. Pinching "
    "off the small shoots between the main stem and the branches keeps the plant from spending its energy on leaves.",
    "The night train from Vienna to Venice leaves shortly after nine in the evening. Travellers in the sleeping car are woken by the "
    "conductor with coffee and a small pastry as the train crosses the lagoon on a long causeway, and the first view of the city, with "
    "its domes and bell towers rising out of the morning mist, is one that few people forget.",
    "In economics, inflation describes a general rise in prices that reduces the purchasing power of money. Central banks try to keep it "
    "low and stable, usually by raising interest rates when the economy overheats and lowering them when demand is weak. Too much "
    "inflation erodes savings, while deflation can make households postpone spending and push an economy into a long slump.",
    "Johann Sebastian Bach wrote more than a thousand works, from solo suites for cello to vast choral settings of the Passion. Many of "
    "his contemporaries considered his music old-fashioned, and after his death in 1750 it was largely forgotten until the young Felix "
    "Mendelssohn conducted the St Matthew Passion in Berlin in 1829, starting a revival that has never really ended.",
    "Honeybees communicate the location of flowers through a waggle dance performed on the vertical face of the comb. The angle of the "
    "dance relative to straight up tells the other workers the direction of the food relative to the sun, and the length of the "
    "waggling run tells them how far they must fly. A strong colony can gather nectar from flowers several kilometres away.",
    "The first practical telephone exchange opened in New Haven, Connecticut, in 1878 with twenty-one subscribers. Operators sat at a "
    "switchboard and connected calls by hand, plugging cords into jacks. Within a few decades cities around the world were wired, and "
    "the automatic exchange, invented by an undertaker who suspected that operators were diverting his customers, began to replace them.",
    "Glaciers form where more snow falls in winter than melts in summer. Over many years the snow compacts into dense blue ice that "
    "flows slowly downhill under its own weight, carving deep valleys and carrying boulders far from where they started. Many of the "
    "lakes of northern Europe and America lie in basins that were scooped out by ice sheets during the last glacial period.",
    "A good cup of tea depends on fresh water, the right temperature and patience. Black tea wants water just off the boil and three to "
    "five minutes of steeping, while delicate green teas turn bitter unless the water has cooled for a minute or two first. Some people "
    "add milk, others lemon or honey, and a few insist that anything at all added to the cup is a crime against the leaf.",
    "Marathon runners train for months, slowly building the distance of their long weekly run while keeping most other sessions easy. "
    "In the final weeks they taper, running less so that their legs recover, and on race morning they eat a light breakfast hours before "
    "the start. The hardest part often comes after thirty kilometres, when the body's stores of glycogen run low.",
    "Medieval scribes copied books by hand on parchment made from calfskin, working in cold rooms lit only by daylight. A single Bible "
    "could take a monastery years to finish. Scribes sometimes left notes in the margins complaining about their aching hands, the poor "
    "ink or the cat that had walked across the page, small human voices that still speak to readers today.",
]

PROMPTS = [
    "The capital of France is",
    "Water boils at",
    "Once upon a time, in a small village by the sea, there lived",
    "Write a short poem about autumn leaves falling in a quiet park.",
    PARAGRAPHS[0] + " Years later, the keeper's daughter wrote that",
    " ".join(PARAGRAPHS[1:3]) + "\n\nSummarize the text above in one sentence:",
    "\n\n".join(PARAGRAPHS[3:7]) + "\n\nThe main topics of these paragraphs are",
    "\n\n".join(PARAGRAPHS) + "\n\nIn summary, the passages above describe",
]


def hf_greedy(hf_model, hf_tokenizer, prompt: str) -> list[int]:
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=hf_tokenizer.eos_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def hf_references(hf_model, hf_tokenizer) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, computed once for both engines."""
    return [hf_greedy(hf_model, hf_tokenizer, p) for p in PROMPTS]


def test_prompt_set_shape(hf_tokenizer):
    lengths = [len(hf_tokenizer(p).input_ids) for p in PROMPTS]
    assert len(PROMPTS) >= 8
    assert min(lengths) <= 5
    assert max(lengths) > 1000, lengths
    assert len(set(lengths)) == len(lengths)


def test_kv_pool_holds_every_prompt_at_once(hf_tokenizer, engine_config):
    """conftest's KV_PAGES must fit the whole equality workload: no preemption needed."""
    page = engine_config["page_size"]
    need = sum(-(-(len(hf_tokenizer(p).input_ids) + MAX_NEW_TOKENS) // page) for p in PROMPTS)
    assert need + 1 <= engine_config["kv_pages"], f"raise KV_PAGES in conftest.py to at least {need + 1}"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("engine", ["llm_compiled", "llm_eager"])
def test_greedy_matches_transformers(engine, request, hf_references, hf_tokenizer, wait_idle):
    llm = request.getfixturevalue(engine)
    llm.reset_prefix_cache()  # only what this call computes is cached: earlier tests' prompts are not
    assert wait_idle(llm)
    steps_before = llm.engine.num_steps

    # record every step's chunks (request id, first position, tokens) as the engine thread plans them
    plans: list[list[tuple[int, int, int]]] = []
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule

    def recording_schedule(now: float = 0.0):
        plan = schedule(now)
        if plan.chunks:
            plans.append([(c.seq.seq_id, c.start, c.num_tokens) for c in plan.chunks])
        return plan

    scheduler.schedule = recording_schedule
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0))
    finally:
        del scheduler.schedule

    assert len(outputs) == len(PROMPTS)
    for prompt, out, ref in zip(PROMPTS, outputs, hf_references):
        assert out.prompt == prompt
        assert out.prompt_token_ids == hf_tokenizer(prompt).input_ids
        assert out.finished
        assert out.token_ids == ref, f"prompt of {len(out.prompt_token_ids)} tokens diverges from transformers"
        stopped = ref[-1] == hf_tokenizer.eos_token_id
        assert out.finish_reason == ("stop" if stopped else "length")
        if not stopped:
            assert len(out.token_ids) == MAX_NEW_TOKENS
        assert out.text == hf_tokenizer.decode(ref, skip_special_tokens=True)

    # SplitFuse: every forward pass stays within the token budget, and some carried decodes and prompt chunks together
    stats = llm.engine.steps_since(steps_before)
    assert len(stats) == len(plans)
    budget = llm.engine.config.token_budget
    assert all(s.decode_tokens + s.prompt_tokens <= budget and s.bucket in llm.engine.config.buckets for s in stats)
    assert any(s.decode_tokens > 0 and s.prompt_tokens > 0 for s in stats), stats
    # the plans themselves: each prompt computed exactly once past its cached prefix (no preemption), decodes one token at a time
    prompt_len = {o.request_id: len(o.prompt_token_ids) for o in outputs}
    cached = {o.request_id: o.num_cached_tokens for o in outputs}
    assert cached[outputs[7].request_id] >= 64  # the last prompt starts with prompt 4's paragraph, computed steps before
    for rid, n_prompt in prompt_len.items():
        chunks = [(start, n) for plan in plans for r, start, n in plan if r == rid]
        assert sum(n for start, n in chunks if start < n_prompt) == n_prompt - cached[rid]
        assert all(n == 1 for start, n in chunks if start >= n_prompt)
    # and step_stats agree with the plans, step by step
    for stat, plan in zip(stats, plans):
        assert stat.prompt_tokens == sum(n for rid, start, n in plan if start < prompt_len[rid])
        assert stat.decode_tokens == sum(n for rid, start, n in plan if start >= prompt_len[rid])
        assert stat.num_seqs == len(plan)

    # the >1000-token prompt was split over several steps, in order, with no gap or overlap
    longest = max(outputs, key=lambda o: len(o.prompt_token_ids))
    assert len(longest.prompt_token_ids) > 1000
    prefill = [(start, n) for plan in plans for rid, start, n in plan if rid == longest.request_id and start < len(longest.prompt_token_ids)]
    computed = len(longest.prompt_token_ids) - longest.num_cached_tokens
    assert len(prefill) >= -(-computed // budget)
    assert [start for start, _ in prefill] == [longest.num_cached_tokens + sum(n for _, n in prefill[:i]) for i in range(len(prefill))]
    assert sum(n for _, n in prefill) == computed
    # and its chunks shared steps with other sequences' decodes
    fused = [
        plan
        for plan in plans
        if any(rid == longest.request_id and start < prompt_len[rid] for rid, start, _ in plan)
        and any(rid != longest.request_id and start >= prompt_len[rid] for rid, start, _ in plan)
    ]
    assert fused

    assert wait_idle(llm)


def test_step_stats_count_a_one_token_prompt_chunk_as_prompt(llm_compiled, wait_idle):
    """Regression: stats once classified chunks after sampling, so a 1-token prompt chunk looked like a decode."""
    llm = llm_compiled
    assert wait_idle(llm)
    before = llm.engine.num_steps
    (out,) = llm.generate(prompt_token_ids=[[504]], sampling_params=SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 2
    stats = llm.engine.steps_since(before)
    # step 1 runs the 1-token prompt, step 2 decodes the first generated token
    assert [(s.prompt_tokens, s.decode_tokens) for s in stats] == [(1, 0), (0, 1)]


def test_a_prepared_gguf_copy_reads_its_resolved_args_not_autoconfig(llm_compiled, embedded_path, graphs_dir):
    """The engines above loaded the session's prepared fp32 copy of the GGUF file from its fastgen_resolved.json
    (family, args, eos ids) and a fast tokenizer, without AutoConfig: what AutoConfig reads there agrees."""
    folder = loader.prepared_gguf(graphs_dir, embedded_path, torch.float32)  # the session's, made by llm_compiled
    family, args, eos = loader._read_resolved(folder / loader.RESOLVED)
    config = AutoConfig.from_pretrained(folder)
    assert (family, args) == resolve(config) and eos == config.eos_token_id
    assert llm_compiled.engine.model.args == args and config.eos_token_id in llm_compiled.engine.eos_token_ids
    text = "Ünïcödé 日本語 <|im_start|>user\nHi<|im_end|>"
    assert llm_compiled.tokenizer.encode(text) == AutoTokenizer.from_pretrained(folder).encode(text)
    # nested tuples (rope scaling lists, a vocabulary shard) come back as they were
    rope = RopeArgs(5e5, 64, "longrope", (("long_factor", (1.0, 2.5)), ("original_max_position_embeddings", 4096)), 8192)
    nested = dataclasses.replace(args, rope=rope, vocab_shard=(0, 100))
    assert ModelArgs.from_json(json.loads(json.dumps(dataclasses.asdict(nested)))) == nested

"""After warmup the compiled engine serves any workload with the graphs it already has."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch._dynamo.utils import counters

from fastgen_compile import SamplingParams
from fastgen_compile.engine.scheduler import StepPlan
from fastgen_compile.errors import RecompileError

SENTENCES = [
    "The river flooded the lower town twice that spring.",
    "She kept her grandfather's watch in a drawer of the desk.",
    "Most of the committee voted to postpone the decision until autumn.",
    "A thin layer of frost covered the windscreen every morning.",
    "The museum's newest exhibit explains how early maps were drawn.",
    "He practised the violin for an hour before breakfast.",
    "Engineers tested the bridge with trucks full of sand.",
    "Our neighbours grow peppers, beans and sunflowers on the balcony.",
]


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def text_of(n_sentences: int, offset: int = 0) -> str:
    return " ".join(SENTENCES[(offset + i) % len(SENTENCES)] for i in range(n_sentences))


def test_warmup_compiled_every_bucket(llm_compiled):
    engine = llm_compiled.engine
    assert engine.compiler.warm
    assert engine.compiler.graphs_compiled == len(engine.config.buckets)  # one layer graph per bucket, shared by all layers


def test_new_workload_shapes_trigger_no_recompile(llm_compiled, wait_idle):
    llm = llm_compiled
    # a warm run of the plain kind first (the suite may run this module alone)
    llm.generate(["Hello there"], SamplingParams(max_new_tokens=2, temperature=0))
    assert wait_idle(llm)
    graphs_before = unique_graphs()
    steps_before = llm.engine.num_steps
    assert llm.engine.compiler.recompiles_since_warmup() == 0

    jobs = [
        # many tiny prompts at once: more sequences than max_seqs=16 in a step
        lambda: llm.generate([f"Item {i}:" for i in range(20)], SamplingParams(max_new_tokens=3, temperature=0)),
        # one ~700-token prompt, sampled with top-k and a seed
        lambda: llm.generate([text_of(60)], SamplingParams(max_new_tokens=5, temperature=0.7, top_k=20, seed=1)),
        # medium prompts with nucleus sampling, no seed
        lambda: llm.generate([text_of(3, 1), text_of(9, 2), text_of(17, 3)], SamplingParams(max_new_tokens=11, temperature=1.2, top_p=0.5)),
        # raw token ids, a stop string, and a lone 1-token prompt
        lambda: llm.generate(prompt_token_ids=[[504], [504, 3575, 282]], sampling_params=SamplingParams(max_new_tokens=7, temperature=0, stop=[".", "\n"])),
        # a stream with a mix of greedy and sampling neighbours
        lambda: list(llm.stream(text_of(5, 4), SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.95, top_k=100, seed=99, ignore_eos=True))),
        lambda: llm.chat([{"role": "user", "content": "Name three colours."}], SamplingParams(max_new_tokens=6, temperature=0)),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = [f.result(timeout=300) for f in [pool.submit(job) for job in jobs]]
    assert all(results)
    assert wait_idle(llm)

    buckets = {s.bucket for s in llm.engine.steps_since(steps_before)}
    assert buckets == set(llm.engine.config.buckets)  # both compiled shapes were used
    assert unique_graphs() == graphs_before
    assert llm.engine.compiler.recompiles_since_warmup() == 0


def test_a_recompile_in_strict_mode_raises_naming_the_failed_guard(llm_compiled, wait_idle):
    """The test engines are strict: a shape the warmup never saw (bucket 32) is an error that names it."""
    llm = llm_compiled
    assert wait_idle(llm)
    engine = llm.engine
    assert engine.compiler.strict
    with pytest.raises(RecompileError, match=r"recompile while serving: an input of 32 rows, which no warmed bucket has \(warmed: 16, 64\)"):
        engine.runner.forward(engine.pack(StepPlan(), 32))
    assert engine.compiler.recompiles_since_warmup() == 0  # refused before compiling
    out = llm.generate(["Hi"], SamplingParams(max_new_tokens=2, temperature=0))  # and the engine serves on
    assert len(out[0].token_ids) == 2


def test_a_recompile_while_serving_is_counted_and_logged(llm_compiled, wait_idle, caplog):
    """Not strict (production): a shape the warmup never saw compiles a new graph: counted, warned with the failed guard, not forgotten."""
    llm = llm_compiled
    assert wait_idle(llm)
    engine = llm.engine
    compiler = engine.compiler
    compiler.strict = False
    try:
        with caplog.at_level(logging.WARNING, logger="fastgen_compile.engine.compiler"):
            engine.runner.forward(engine.pack(StepPlan(), 32))
            assert engine.compiler.recompiles_since_warmup() == 1
            llm.generate(["Hi"], SamplingParams(max_new_tokens=1, temperature=0))  # one more forward pass
        assert engine.compiler.recompiles_since_warmup() == 1, "the recompile was forgotten"
        warnings = [r.getMessage() for r in caplog.records if "recompiled while serving" in r.getMessage()]
        assert len(warnings) == 1
        assert "an input of 32 rows" in warnings[0]
    finally:
        compiler.strict = True
        compiler.mark_warm()  # later tests start from a clean baseline

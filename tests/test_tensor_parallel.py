"""Tensor parallelism on the embedded model: 2 processes (gloo, one core each) give TP=1's greedy
output token for token, each serving a varied workload with the graphs of its warmup.

SmolLM2's 9 query heads and 3 KV heads do not divide by 2: rank 0 holds 2 KV heads (6 query
heads), rank 1 one (3). One tensor-parallel engine is open per process at a time (torch.distributed's
default group), so the other families and the process lifecycle are in test_tensor_parallel_lifecycle.py.
"""

from __future__ import annotations

import pytest

from fastgen_compile import LLM, SamplingParams
from fastgen_compile.errors import ConfigError
from fastgen_compile.models.decoder import ModelArgs
from fastgen_compile.models.shard import Shard, split
from test_equality import MAX_NEW_TOKENS, PROMPTS


@pytest.fixture(scope="module")
def tp2(engine_config):
    llm = LLM(**engine_config, tensor_parallel_size=2)
    yield llm
    llm.close()
    assert all(w.proc.poll() is not None for w in llm.engine.tp.workers), "a worker outlived close()"


def smollm2_args(**kw) -> ModelArgs:
    return ModelArgs(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                     norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True, rope=None, **kw)


def test_uneven_split_keeps_gqa_groups_whole():
    a = smollm2_args()
    assert [split(3, 2, r) for r in (0, 1)] == [range(0, 2), range(2, 3)]
    assert [Shard(r, 2).heads(a) for r in (0, 1)] == [range(0, 6), range(6, 9)]  # 3 query heads per KV head
    local = [Shard(r, 2).args(a) for r in (0, 1)]
    assert [(x.num_heads, x.num_kv_heads, x.intermediate_size) for x in local] == [(6, 2, 768), (3, 1, 768)]
    assert [x.vocab_shard for x in local] == [(0, 24576), (24576, 24576)] and local[0].vocab_size == 49152


def test_fewer_kv_heads_than_ranks_is_a_clear_error(engine_config):
    with pytest.raises(ConfigError, match="tensor_parallel_size=4 needs at least one KV head per rank: .* 9 query heads and 3 KV heads"):
        LLM(**(engine_config | dict(tensor_parallel_size=4, compile=False)))  # the session's prepared fp32 copy: nothing to prepare


def test_greedy_output_equals_one_process(llm_compiled, tp2):
    """The prompts of test_equality in one call: long ones split over many steps beside the short ones' decodes."""
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0, ignore_eos=True)
    first_step = tp2.engine.num_steps
    one, two = llm_compiled.generate(PROMPTS, params), tp2.generate(PROMPTS, params)
    steps = tp2.engine.steps_since(first_step)
    assert any(s.decode_tokens and s.prompt_tokens for s in steps), "no step fused decodes with prompt chunks"
    for a, b in zip(one, two):
        assert b.token_ids == a.token_ids


def test_each_rank_pool_holds_its_kv_heads(llm_compiled, tp2):
    kv_one, kv_two = llm_compiled.engine.runner.kv_caches[0].k, tp2.engine.runner.kv_caches[0].k
    assert (kv_one.shape[2], kv_two.shape[2]) == (3, 2)  # rank 0 holds 2 of the 3 KV heads
    assert tp2.engine.model.args.num_heads == 6 and tp2.engine.model.embed.shape[0] == 49152 // 2


def test_no_rank_recompiles_after_warmup(tp2, wait_idle):
    jobs = [
        ([f"Item {i}:" for i in range(20)], SamplingParams(max_new_tokens=3, temperature=0)),  # more sequences than max_seqs
        ([PROMPTS[-1]], SamplingParams(max_new_tokens=5, temperature=0.7, top_k=20, seed=1)),  # one long prompt, sampled
        (["Hi", PROMPTS[5]], SamplingParams(max_new_tokens=7, temperature=1.2, top_p=0.5, prompt_logprobs=2)),  # scored prompt rows
    ]
    for prompts, params in jobs:
        tp2.generate(prompts, params)
    assert wait_idle(tp2)
    engine = tp2.engine
    assert engine.compiler.recompiles_since_warmup() == 0 and engine.compiler.graphs_compiled == len(engine.config.buckets)
    (worker,) = engine.tp.worker_stats()
    assert worker["warm"] and worker["recompiles_since_warmup"] == 0 and worker["graphs_compiled"] == len(engine.config.buckets)

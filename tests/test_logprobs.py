"""Logprobs of generated and prompt tokens against transformers' log-softmax in fp32, and min_tokens.

The prompts are longer than the 64-token budget, so prompt logprobs are gathered across chunks
and steps, fused with other requests' decodes.
"""

from __future__ import annotations

import pytest
import torch

from fastgen_compile import SamplingParams
from fastgen_compile.errors import RequestError

PROMPTS = [
    "The old lighthouse on the northern cape was built in 1857, after three ships ran aground on the reef during a single winter. "
    "Its keeper lived in a small stone cottage beside the tower and climbed the spiral staircase twice a night to trim the wick.",
    "Honeybees communicate the location of flowers through a waggle dance.",
    "2 + 2 =",
]
TOP = 3


@pytest.fixture(scope="module")
def reference(hf_model, hf_tokenizer, llm_compiled):
    """For each prompt: the engine's greedy output with logprobs, and transformers' log-softmax over prompt + output."""
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=TOP, prompt_logprobs=TOP)
    outs = llm_compiled.generate(PROMPTS, params)
    refs = []
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids + out.token_ids])
        with torch.no_grad():
            refs.append(hf_model(ids).logits[0].float().log_softmax(-1))
    return outs, refs


def _check(entry, ref_row: torch.Tensor, token: int) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(ref_row[token].item(), abs=2e-3)
    top_lp, top_ids = ref_row.topk(TOP)
    assert [t for t, _ in entry.top] == top_ids.tolist()
    assert [lp for _, lp in entry.top] == pytest.approx(top_lp.tolist(), abs=2e-3)


def test_prompt_logprobs_match_transformers(reference):
    outs, refs = reference
    for out, ref in zip(outs, refs):
        n = len(out.prompt_token_ids)
        assert len(out.prompt_logprobs) == n and out.prompt_logprobs[0] is None
        for p in range(1, n):  # token p is scored by the logits at position p - 1
            _check(out.prompt_logprobs[p], ref[p - 1], out.prompt_token_ids[p])


def test_generated_logprobs_match_transformers(reference):
    outs, refs = reference
    for out, ref in zip(outs, refs):
        n = len(out.prompt_token_ids)
        assert len(out.logprobs) == len(out.token_ids)
        for i, token in enumerate(out.token_ids):
            _check(out.logprobs[i], ref[n - 1 + i], token)
            assert out.logprobs[i].top[0][0] == token  # greedy picks the best


def test_no_logprobs_unless_asked(llm_compiled):
    (out,) = llm_compiled.generate(["Hello"], SamplingParams(max_new_tokens=2, temperature=0))
    assert out.logprobs is None and out.prompt_logprobs is None


def test_min_tokens_holds_back_eos(llm_compiled, hf_tokenizer):
    """A prompt whose greedy answer ends at once: min_tokens makes it run on past eos."""
    prompt = llm_compiled.apply_chat_template([{"role": "user", "content": "Reply with just the word yes."}])
    (free,) = llm_compiled.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0))
    assert free.finish_reason == "stop" and len(free.token_ids) < 30
    want = len(free.token_ids) + 5
    (held,) = llm_compiled.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0, min_tokens=want))
    assert len(held.token_ids) >= want
    assert hf_tokenizer.eos_token_id not in held.token_ids[: want - 1]


@pytest.mark.parametrize("field, value", [("logprobs", -1), ("logprobs", 21), ("prompt_logprobs", 1.5), ("min_tokens", 9)])
def test_bad_logprob_and_min_token_values(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(max_new_tokens=8, **{field: value})

"""The Python API over the compiled engine: stream, abort, threads, seeds, chat, pipeline, stops."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastgen_compile import SamplingParams
from fastgen_compile.entrypoints.llm import Pipeline

GREEDY = SamplingParams(max_new_tokens=16, temperature=0)
SEEDED = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=123, ignore_eos=True)
MATH_CHAT = [{"role": "user", "content": "What is 2+2? Answer with just the number."}]


@pytest.fixture
def llm(llm_compiled, wait_idle, idle_free_pages):
    """The shared compiled LLM; every test must leave it idle with every KV page free."""
    assert wait_idle(llm_compiled)
    yield llm_compiled
    assert wait_idle(llm_compiled), "a request is still running or KV pages leaked"
    assert llm_compiled.engine.pages.num_free == idle_free_pages(llm_compiled)
    assert not llm_compiled.loop.num_pending, "finished or aborted requests left sinks behind"


def _abort_everything(llm) -> None:
    """Cleanup after a failed abort check, so later tests find an idle engine."""
    for rid in list(llm.engine._seqs):
        llm.loop.abort(rid)


# ---- stream -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "The capital of France is",
        "Translate 'good morning' into Japanese:",  # multi-byte characters split over tokens
        "My favourite emoji is",
    ],
)
def test_stream_deltas_add_up_to_generate(llm, prompt):
    (reference,) = llm.generate([prompt], GREEDY)
    outs = list(llm.stream(prompt, GREEDY))

    assert outs, "the stream yielded nothing"
    final = outs[-1]
    assert final.finished and final.finish_reason in ("length", "stop")
    assert not any(o.finished for o in outs[:-1])
    assert all(len(o.delta_token_ids) == 1 for o in outs)
    assert [t for o in outs for t in o.delta_token_ids] == final.token_ids == reference.token_ids
    assert "".join(o.delta_text for o in outs) == final.text == reference.text
    # a character split over tokens is held back until complete (only the final text may end in a partial one)
    assert not any("\ufffd" in o.delta_text for o in outs[:-1])
    assert final.text == llm.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    for i, o in enumerate(outs):  # every output carries all text and tokens so far
        assert o.token_ids == final.token_ids[: i + 1]
        assert o.text == "".join(x.delta_text for x in outs[: i + 1])
    assert final.prompt == prompt and final.prompt_token_ids == llm.tokenizer.encode(prompt)


def test_breaking_out_of_a_stream_aborts_the_request(llm, wait_idle, idle_free_pages):
    idle = idle_free_pages(llm)
    long_run = SamplingParams(max_new_tokens=1000, temperature=0, ignore_eos=True)
    steps_before = llm.engine.num_steps
    received = 0
    for _ in llm.stream("Tell me a very long story about a dragon.", long_run):
        received += 1
        if received == 3:
            break
    assert received == 3
    assert wait_idle(llm, timeout=60)
    assert llm.engine.pages.num_free == idle
    # aborted after a handful of steps, not run to its 1000 tokens
    assert llm.engine.num_steps - steps_before < 100


def test_closing_a_started_stream_aborts_the_request(llm, wait_idle, idle_free_pages):
    idle = idle_free_pages(llm)
    steps_before = llm.engine.num_steps
    gen = llm.stream("List every prime number you know:", SamplingParams(max_new_tokens=1000, temperature=0, ignore_eos=True))
    first = next(gen)
    assert not first.finished and len(first.token_ids) == 1
    assert llm.engine.pages.num_free < idle  # the request holds pages while it runs
    gen.close()
    assert wait_idle(llm, timeout=60)
    assert llm.engine.pages.num_free == idle
    assert llm.engine.num_steps - steps_before < 100
    with pytest.raises(StopIteration):
        next(gen)


def test_closing_an_unstarted_stream_aborts_the_request(llm):
    gen = llm.stream("Count from one to one thousand:", SamplingParams(max_new_tokens=1000, temperature=0, ignore_eos=True))
    gen.close()
    try:
        # a marker request queued after the close: once it is done, an abort sent by close() has been applied
        llm.generate(["Hi"], SamplingParams(max_new_tokens=1, temperature=0))
        assert not llm.engine.has_work(), "the closed stream's request is still running"
    finally:
        _abort_everything(llm)


# ---- threads and seeds --------------------------------------------------------------------


def test_concurrent_generate_from_threads_matches_a_single_call(llm):
    prompts = ["The capital of France is", "Water boils at", "Once upon a time, in a small village by the sea, there lived"]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    reference = [o.token_ids for o in llm.generate(prompts, params)]

    start = threading.Barrier(4)

    def call(i: int) -> list[list[int]]:
        start.wait()
        rotated = prompts[i % 3 :] + prompts[: i % 3]  # each thread submits in its own order
        outs = llm.generate(rotated, params)
        assert [o.prompt for o in outs] == rotated
        by_prompt = {o.prompt: o.token_ids for o in outs}
        return [by_prompt[p] for p in prompts]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4), timeout=300))
    assert results == [reference] * 4


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    prompt = "Write a sentence about the sea."
    (alone,) = llm.generate([prompt], SEEDED)
    assert len(alone.token_ids) == SEEDED.max_new_tokens

    # again, while other requests (unseeded, greedy, top-k, other seeds) share the forward passes
    steps_before = llm.engine.num_steps
    others = [
        llm.stream("Tell me about volcanoes.", SamplingParams(max_new_tokens=40, temperature=1.0, ignore_eos=True)),
        llm.stream("The history of Rome", SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)),
        llm.stream("A recipe for soup:", SamplingParams(max_new_tokens=40, temperature=1.3, top_k=40, seed=7, ignore_eos=True)),
    ]
    (batched,) = llm.generate([prompt], SEEDED)
    for other in others:
        assert list(other)[-1].finished
    assert batched.token_ids == alone.token_ids
    assert max(s.num_seqs for s in llm.engine.steps_since(steps_before)) > 1

    # and inside one generate call, between other prompts that use the same parameters
    outs = llm.generate(["Describe a forest at night.", prompt, "Why is the sky blue?"], SEEDED)
    assert outs[1].token_ids == alone.token_ids


# ---- chat, pipeline -----------------------------------------------------------------------


def test_chat_applies_the_chat_template(llm, hf_tokenizer):
    out = llm.chat(MATH_CHAT, GREEDY)
    templated = hf_tokenizer.apply_chat_template(MATH_CHAT, tokenize=False, add_generation_prompt=True)
    assert out.prompt == templated == llm.apply_chat_template(MATH_CHAT)
    assert "<|im_start|>user\nWhat is 2+2? Answer with just the number.<|im_end|>" in out.prompt
    assert out.prompt.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == hf_tokenizer(templated).input_ids
    (plain,) = llm.generate([templated], GREEDY)
    assert out.token_ids == plain.token_ids
    # the instruct model answers and ends its turn
    assert "4" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] == hf_tokenizer.eos_token_id
    assert "<|im_end|>" not in out.text


def test_reset_prefix_cache_forgets_every_cached_prompt(llm, wait_idle):
    prompt = "LLM.reset_prefix_cache: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    params = SamplingParams(max_new_tokens=2, temperature=0)
    (cold,) = llm.generate([prompt], params)
    (warm,) = llm.generate([prompt], params)
    page = llm.engine.config.page_size
    assert cold.num_cached_tokens == 0 and warm.num_cached_tokens == (len(warm.prompt_token_ids) - 1) // page * page > 0
    llm.reset_prefix_cache()
    assert wait_idle(llm) and llm.engine.snapshot().pages_cached == 0  # an idle engine forgets at once
    (again,) = llm.generate([prompt], params)
    assert again.num_cached_tokens == 0 and again.token_ids == warm.token_ids == cold.token_ids


def test_pipeline_call(llm):
    outs = Pipeline(llm)(["The capital of France is"], max_new_tokens=8)
    assert len(outs) == 1
    out = outs[0]
    assert isinstance(out.generated_text, str) and out.generated_text == out.text
    assert out.finished and 1 <= len(out.token_ids) <= 8
    (greedy,) = Pipeline(llm)("The capital of France is", max_new_tokens=8, temperature=0)
    assert greedy.token_ids == llm.generate(["The capital of France is"], SamplingParams(max_new_tokens=8, temperature=0))[0].token_ids


# ---- stop conditions ----------------------------------------------------------------------


STOP_PROMPT = "The capital of France is"
NO_EOS = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


def _token_boundaries(llm, token_ids: list[int]) -> list[int]:
    """Character offset in the decoded text where each generated token's text ends."""
    return [len(llm.tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)) for i in range(len(token_ids))]


def _stopped(llm, stop: str, stream: bool = False):
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, stop=["never appears in this text", stop])
    if stream:
        return list(llm.stream(STOP_PROMPT, params))
    return llm.generate([STOP_PROMPT], params)[0]


def _spanning_stop(llm):
    """Greedy output without stops, its token ends, and a stop string from the last 2 characters of token k into token k+1."""
    (full,) = llm.generate([STOP_PROMPT], NO_EOS)
    ends = _token_boundaries(llm, full.token_ids)
    k = next(
        i
        for i in range(4, len(ends) - 1)
        if ends[i] - ends[i - 1] >= 3 and ends[i + 1] - ends[i] >= 2 and full.text.find(full.text[ends[i] - 2 : ends[i] + 2]) == ends[i] - 2
    )
    return full, ends, k, full.text[ends[k] - 2 : ends[k] + 2]


def test_stop_string_cuts_the_text_before_it(llm):
    (full,) = llm.generate([STOP_PROMPT], NO_EOS)
    ends = _token_boundaries(llm, full.token_ids)
    assert full.text.isascii() and ends[-1] == len(full.text)
    # a 3-character stop string at the start of a token (the 5th or a later one), inside that token
    k = next(i for i in range(4, len(ends)) if ends[i] - ends[i - 1] >= 3 and full.text.find(full.text[ends[i - 1] : ends[i - 1] + 3]) == ends[i - 1])
    cut = ends[k - 1]
    stop = full.text[cut : cut + 3]

    stopped = _stopped(llm, stop)
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    assert stop not in stopped.text
    assert stopped.token_ids == full.token_ids[: k + 1]  # generation ended on the token that completed the stop string

    outs = _stopped(llm, stop, stream=True)  # the stream's deltas are cut the same way
    assert outs[-1].finish_reason == "stop" and outs[-1].token_ids == stopped.token_ids
    assert "".join(o.delta_text for o in outs) == outs[-1].text == full.text[:cut]


def test_stop_string_spanning_tokens_cuts_the_text(llm):
    full, ends, k, stop = _spanning_stop(llm)

    stopped = _stopped(llm, stop)
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: ends[k] - 2]
    assert stopped.token_ids == full.token_ids[: k + 2]


def test_stop_string_spanning_tokens_is_never_streamed(llm):
    full, ends, k, stop = _spanning_stop(llm)

    outs = _stopped(llm, stop, stream=True)
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].text == full.text[: ends[k] - 2]
    assert "".join(o.delta_text for o in outs) == outs[-1].text, f"streamed part of the stop string {stop!r}"


def test_stop_token_ids(llm):
    prompt = "The capital of France is"
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    (full,) = llm.generate([prompt], params)
    stop_token = full.token_ids[6]
    first = full.token_ids.index(stop_token)

    (stopped,) = llm.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[stop_token]))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: first + 1]


def test_eos_stops_and_ignore_eos_runs_on(llm, hf_tokenizer):
    eos = hf_tokenizer.eos_token_id
    prompt = llm.apply_chat_template(MATH_CHAT)
    (stopped,) = llm.generate([prompt], GREEDY)
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == eos
    assert len(stopped.token_ids) < GREEDY.max_new_tokens

    (ignoring,) = llm.generate([prompt], SamplingParams(max_new_tokens=GREEDY.max_new_tokens, temperature=0, ignore_eos=True))
    assert ignoring.finish_reason == "length"
    assert len(ignoring.token_ids) == GREEDY.max_new_tokens
    assert ignoring.token_ids[: len(stopped.token_ids)] == stopped.token_ids  # ran straight through the EOS

"""AsyncLLM over the shared compiled engine: the same tokens as LLM, all-or-nothing batches, and
cancellation that aborts."""

from __future__ import annotations

import asyncio

import pytest

from fastgen_compile import AsyncLLM, RequestError, SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
LONG = SamplingParams(max_new_tokens=1000, temperature=0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture
def async_llm(llm_compiled, wait_idle, idle_free_pages):
    assert wait_idle(llm_compiled)
    yield AsyncLLM(loop=llm_compiled.loop)
    assert wait_idle(llm_compiled), "a request is still running"
    assert llm_compiled.engine.pages.num_free == idle_free_pages(llm_compiled)
    assert not llm_compiled.loop.num_pending


def test_streamed_outputs_match_the_sync_api(async_llm, llm_compiled):
    async def stream(prompt):
        return [out async for out in async_llm.generate_async(prompt, GREEDY)]

    async def main():
        return await asyncio.gather(*(stream(p) for p in PROMPTS))

    streams = asyncio.run(main())
    reference = llm_compiled.generate(PROMPTS, GREEDY)
    for outs, ref in zip(streams, reference):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert outs[-1].token_ids == ref.token_ids and outs[-1].text == ref.text
        assert "".join(o.delta_text for o in outs) == ref.text


def test_generate_returns_finals_in_prompt_order(async_llm, llm_compiled):
    finals = asyncio.run(async_llm.generate(PROMPTS, GREEDY))
    assert [f.token_ids for f in finals] == [r.token_ids for r in llm_compiled.generate(PROMPTS, GREEDY)]


def test_a_bad_request_raises_at_the_call_and_queues_nothing(async_llm, llm_compiled):
    async def main():
        with pytest.raises(RequestError, match="the prompt is empty"):
            await async_llm.generate(["fine", ""], GREEDY)
        with pytest.raises(RequestError, match="the prompt is empty"):
            async_llm.generate_async("", GREEDY)

    steps = llm_compiled.engine.num_steps
    asyncio.run(main())
    assert llm_compiled.engine.num_steps == steps and not llm_compiled.engine.has_work()


def test_cancelling_the_task_aborts_the_request(async_llm, llm_compiled):
    received = []

    async def consume():
        async for out in async_llm.generate_async("Tell me a very long story.", LONG):
            received.append(out)

    async def main():
        task = asyncio.create_task(consume())
        while len(received) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    steps = llm_compiled.engine.num_steps
    asyncio.run(main())
    assert not received[-1].finished
    # the fixture checks that the request ended and gave its pages back; well before its 1000 tokens
    assert llm_compiled.engine.num_steps - steps < 200


def test_leaving_the_loop_early_aborts_the_request(async_llm):
    async def main():
        outputs = async_llm.generate_async("List every prime number:", LONG)
        async for out in outputs:
            if len(out.token_ids) == 3:
                break
        await outputs.aclose()
        return out

    assert len(asyncio.run(main()).token_ids) == 3

"""AsyncLLM: the engine's asyncio face, what a server stands on. The same engine thread as LLM's
(EngineLoop); outputs cross into the caller's event loop through call_soon_threadsafe, and
cancelling or leaving the `async for` early aborts the request.

    llm = AsyncLLM()
    async for out in llm.generate_async("Hello", SamplingParams(max_new_tokens=8)):
        print(out.delta_text, end="")
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from fastgen_compile.config import EngineConfig
from fastgen_compile.engine.engine import Prompt
from fastgen_compile.engine.loop import EngineLoop, Sink, unwrap
from fastgen_compile.request import RequestOutput, SamplingParams


class AsyncLLM:
    def __init__(self, model: str | None = None, *, loop: EngineLoop | None = None, **config):
        """loop: share a running engine (e.g. an LLM's `.loop`) instead of building one; it then
        stays open when this closes."""
        self._owns_loop = loop is None
        self.loop = loop or EngineLoop(EngineConfig(model=model, **config))
        self.engine = self.loop.engine
        self.tokenizer = self.engine.tokenizer

    def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """One output per new token. Call it inside the event loop: a bad request raises RequestError
        here, before anything is iterated (a server can still answer 400)."""
        return _outputs_only(self.generate_many([prompt], sampling_params))

    def generate_many(self, prompts: Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> RequestStreams:
        """Every prompt at once (all valid, or none runs, RequestError raised here); then (prompt
        index, output) as each arrives. Closing it or leaving early aborts what did not finish."""
        event_loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def sink_of(index: int) -> Sink:
            def sink(item: RequestOutput | BaseException) -> None:
                with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
                    event_loop.call_soon_threadsafe(queue.put_nowait, (index, item))
            return sink

        ids = self.loop.submit(list(prompts), sampling_params, [sink_of(i) for i in range(len(prompts))])
        return RequestStreams(ids, self._follow(ids, queue))

    async def submit(self, prompts: Seq[Prompt], sampling_params: Seq[SamplingParams]) -> RequestStreams:
        """generate_many as a server's backend calls it (serving/service.py)."""
        return self.generate_many(prompts, sampling_params)

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def stopped(self) -> str | None:
        """Why this cannot serve, if it cannot."""
        return None if self.loop.alive else "the engine stopped; see the server's log"

    async def generate(self, prompts: Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Every prompt at once (all valid, or none runs); the final outputs, in prompt order."""
        return await self.generate_many(prompts, sampling_params).finals()

    def abort(self, request_id: int) -> None:
        """Stop a request from anywhere; its follower gets a last output with finish_reason "abort"."""
        self.loop.abort(request_id, keep_sink=True)

    async def _follow(self, ids: list[int], queue: asyncio.Queue) -> AsyncIterator[tuple[int, RequestOutput]]:
        unfinished = set(range(len(ids)))
        try:
            while unfinished:
                index, item = await queue.get()
                out = unwrap(item)
                if out.finished:
                    unfinished.discard(index)
                yield index, out
        finally:
            for index in unfinished:
                self.loop.abort(ids[index])

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix; requests submitted after this call find nothing cached."""
        self.loop.reset_prefix_cache()

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def close(self) -> None:
        if self._owns_loop:
            self.loop.close()


@dataclass
class RequestStreams:
    """The outputs of requests submitted together, as (prompt index, output), and their engine ids
    (for AsyncLLM.abort). Closing it aborts those not finished."""

    request_ids: list[int]
    outputs: AsyncIterator[tuple[int, RequestOutput]]
    replicas: tuple[str, ...] = ()  # the Ray Serve replicas serving them, where there are replicas

    def __aiter__(self) -> RequestStreams:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        return await self.outputs.__anext__()

    async def aclose(self) -> None:
        await self.outputs.aclose()

    async def finals(self) -> list[RequestOutput]:
        """Each request's last output, in prompt order; leaving early (cancelled) aborts the rest."""
        last: list[RequestOutput] = [None] * len(self.request_ids)  # type: ignore[list-item] - every index gets its last
        async with contextlib.aclosing(self):
            async for i, out in self:
                last[i] = out
        return last


async def _outputs_only(outputs: RequestStreams) -> AsyncIterator[RequestOutput]:
    async with contextlib.aclosing(outputs):
        async for _, out in outputs:
            yield out

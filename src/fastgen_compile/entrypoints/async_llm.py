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

from fastgen_compile.config import EngineConfig
from fastgen_compile.engine.engine import Engine, Prompt
from fastgen_compile.engine.loop import EngineLoop, Sink, unwrap
from fastgen_compile.request import RequestOutput, SamplingParams


class AsyncLLM:
    def __init__(self, model: str | None = None, *, loop: EngineLoop | None = None, **config):
        """loop: share a running engine (e.g. an LLM's `.loop`) instead of building one; it then
        stays open when this closes."""
        self._owns_loop = loop is None
        self.loop = loop or EngineLoop(Engine(EngineConfig(model=model, **config)))
        self.engine = self.loop.engine
        self.tokenizer = self.engine.tokenizer

    def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """One output per new token. Call it inside the event loop: a bad request raises RequestError
        here, before anything is iterated (a server can still answer 400)."""
        queue, sink = _queue_sink()
        (rid,) = self.loop.submit([prompt], sampling_params, [sink])
        return self._follow(rid, queue)

    async def generate(self, prompts: Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Every prompt at once (all valid, or none runs); the final outputs, in prompt order."""
        pairs = [_queue_sink() for _ in prompts]
        ids = self.loop.submit(list(prompts), sampling_params, [sink for _, sink in pairs])
        followers = [self._follow(rid, queue) for rid, (queue, _) in zip(ids, pairs)]
        try:
            return list(await asyncio.gather(*(_last(f) for f in followers)))
        finally:
            for f in followers:
                await f.aclose()  # aborts whatever did not finish (a sibling failed, or we were cancelled)

    async def _follow(self, rid: int, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = unwrap(await queue.get())
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.loop.abort(rid)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def close(self) -> None:
        if self._owns_loop:
            self.loop.close()


def _queue_sink() -> tuple[asyncio.Queue, Sink]:
    """A queue of the running event loop, and a sink the engine thread may call."""
    event_loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def sink(item: RequestOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
            event_loop.call_soon_threadsafe(queue.put_nowait, item)

    return queue, sink


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for final in outputs:  # noqa: B007 - the last one is the point
        pass
    return final

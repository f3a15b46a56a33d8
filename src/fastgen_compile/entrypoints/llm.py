"""The Python API: LLM (generate, stream, chat) and the DeepSpeed-MII-style pipeline().

One background thread (EngineLoop) runs the engine; every caller's requests, from any thread,
are batched into the same forward passes.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

from fastgen_compile.config import EngineConfig
from fastgen_compile.engine.loop import EngineLoop, unwrap
from fastgen_compile.errors import RequestError
from fastgen_compile.request import RequestOutput, SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **config):
        self.loop = EngineLoop(EngineConfig(model=model, **config))
        self.engine = self.loop.engine
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> list[RequestOutput]:
        """All prompts go to the engine at once (continuous batching); outputs in prompt order.
        A bad prompt or parameter raises RequestError and none of them runs."""
        if prompts is not None and prompt_token_ids is not None:
            raise RequestError("give prompts or prompt_token_ids, not both")
        if prompts is None and prompt_token_ids is None:
            raise RequestError("give prompts or prompt_token_ids")
        batch = [prompts] if isinstance(prompts, str) else list(prompt_token_ids if prompts is None else prompts)
        queues = [queue.SimpleQueue() for _ in batch]
        ids = self.loop.submit(batch, sampling_params, [q.put for q in queues])
        return [last(self._follow(rid, q)) for rid, q in zip(ids, queues)]

    def stream(self, prompt: str | None = None, sampling_params: SamplingParams | None = None, *,
               prompt_token_ids: list[int] | None = None) -> RequestStream:
        """Yields one output per new token; closing or dropping it early aborts the request."""
        if (prompt is None) == (prompt_token_ids is None):
            raise RequestError("give exactly one of prompt and prompt_token_ids")
        q: queue.SimpleQueue = queue.SimpleQueue()
        (rid,) = self.loop.submit([prompt if prompt is not None else prompt_token_ids], sampling_params, [q.put])
        return RequestStream(self.loop, rid, self._follow(rid, q))

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.apply_chat_template(messages)], sampling_params)[0]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (e.g. before timing uncached prompts); requests running
        keep their pages. Requests submitted after this call find nothing cached."""
        self.loop.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine thread (also done at interpreter exit); idempotent."""
        self.loop.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _follow(self, rid: int, q: queue.SimpleQueue) -> Iterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = unwrap(q.get())
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.loop.abort(rid)


def last(outputs: Iterator[RequestOutput]) -> RequestOutput:
    *_, final = outputs
    return final


class RequestStream:
    """A request's outputs as an iterator; close() aborts it, even before the first token."""

    def __init__(self, loop: EngineLoop, request_id: int, outputs: Iterator[RequestOutput]):
        self.loop, self.request_id, self._outputs, self._done = loop, request_id, outputs, False

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> RequestOutput:
        out = next(self._outputs)
        self._done = out.finished
        return out

    def abort(self) -> None:
        """Stop the request from any thread: the thread iterating it gets a last output with
        finish_reason "abort" (close() must run on the iterating thread)."""
        self.loop.abort(self.request_id, keep_sink=True)

    def close(self) -> None:
        self._outputs.close()
        if not self._done:
            self.loop.abort(self.request_id)
            self._done = True

    def __del__(self) -> None:
        self.close()


class Pipeline:
    """DeepSpeed-MII's non-persistent pipeline: `pipe(prompts, max_new_tokens=...)`."""

    def __init__(self, llm: LLM):
        self.llm = llm

    def __call__(self, prompts: str | list[str], **sampling) -> list[RequestOutput]:
        return self.llm.generate(prompts, SamplingParams(**sampling))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


def pipeline(model: str | None = None, **config) -> Pipeline:
    return Pipeline(LLM(model, **config))

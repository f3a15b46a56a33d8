"""Service: what the HTTP and gRPC faces share over one AsyncLLM: admission (the waiting-queue
bound, draining), request streams that abort when their caller leaves, and the metrics they feed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from fastgen_compile.engine.engine import Engine, Prompt
from fastgen_compile.entrypoints.async_llm import AsyncLLM, RequestStreams
from fastgen_compile.request import RequestOutput, SamplingParams
from fastgen_compile.serving.metrics import Metrics
from fastgen_compile.serving.responses import TokenTexts


class Overloaded(Exception):
    """The waiting queue is full: try again later (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""


class Draining(Exception):
    """The server is shutting down and takes no new requests (HTTP 503, gRPC UNAVAILABLE)."""


@dataclass
class Service:
    llm: AsyncLLM
    max_waiting: int  # requests queued for admission, at most
    metrics: Metrics = field(init=False)
    texts: TokenTexts = field(init=False)  # token ids as text, for logprobs
    draining: bool = False
    in_flight: int = 0  # streams open now

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.llm.engine)
        self.texts = TokenTexts(self.llm.tokenizer)

    @property
    def engine(self) -> Engine:
        return self.llm.engine

    def admit(self, num_requests: int) -> None:
        if self.draining:
            raise Draining("the server is shutting down")
        waiting = self.engine.num_waiting
        if waiting + num_requests > self.max_waiting:
            raise Overloaded(f"{waiting} requests are waiting (at most {self.max_waiting}); try again later")

    def generate(self, prompts: Seq[Prompt], params: Seq[SamplingParams]) -> RequestStreams:
        """Admit and submit all now (Overloaded, Draining, RequestError: none runs, before any
        response starts); then (index, output) as they come. Leaving early (a disconnect, a
        cancelled call) aborts what did not finish."""
        self.admit(len(prompts))
        streams = self.llm.generate_many(prompts, list(params))
        return RequestStreams(streams.request_ids, self._observe(streams))

    async def _observe(self, outputs: RequestStreams) -> AsyncIterator[tuple[int, RequestOutput]]:
        arrival = time.perf_counter()
        last_token: dict[int, float] = {}
        finished: set[int] = set()
        m = self.metrics
        self.in_flight += 1
        try:
            async with contextlib.aclosing(outputs):
                async for i, out in outputs:
                    now = time.perf_counter()
                    if out.delta_token_ids:
                        if i in last_token:
                            m.itl.observe(now - last_token[i])
                        else:
                            m.ttft.observe(now - arrival)
                            m.prompt_tokens.inc(len(out.prompt_token_ids))
                        last_token[i] = now
                        m.generation_tokens.inc(len(out.delta_token_ids))
                    if out.finished:
                        finished.add(i)
                        m.e2e.observe(now - arrival)
                        m.requests_finished.labels(out.finish_reason).inc()
                    yield i, out
        finally:
            self.in_flight -= 1
            for _ in range(len(outputs.request_ids) - len(finished)):
                m.requests_finished.labels("abort").inc()

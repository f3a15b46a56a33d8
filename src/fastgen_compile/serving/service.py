"""Service: what the HTTP and gRPC faces share over one backend: admission (the waiting-queue
bound, draining), request streams that abort when their caller leaves, and the metrics they feed.

The backend is an AsyncLLM in `fastgen-compile serve`, or a ReplicaSet (serving/replicas.py)
that spreads the prompts over Ray Serve replicas.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastgen_compile.engine.engine import Engine, Prompt
from fastgen_compile.entrypoints.async_llm import AsyncLLM, RequestStreams
from fastgen_compile.request import RequestOutput, SamplingParams
from fastgen_compile.serving.metrics import Metrics
from fastgen_compile.serving.responses import TokenTexts


class Overloaded(Exception):
    """The waiting queue is full: try again later (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""


class Draining(Exception):
    """The server is shutting down and takes no new requests (HTTP 503, gRPC UNAVAILABLE)."""


class Unsupported(Exception):
    """The backend cannot do what was asked (HTTP 501)."""


@dataclass(frozen=True)
class ModelCard:
    """What the API says about the model, and the tokenizer it formats with: picklable, so a Ray
    ingress that holds no engine gets it from a replica."""

    name: str
    tokenizer: Any
    max_model_len: int
    capacity_tokens: int  # the KV pool's tokens: no request can be longer
    vocab_size: int
    eos_token_ids: frozenset[int]
    description: str  # dtype, device and why, quantization: for the ready line

    @classmethod
    def of(cls, engine: Engine) -> ModelCard:
        c = engine.config
        quantized = "".join(f", {part} {method}" for part, method in engine.quantization.items())
        return cls(engine.model_name, engine.tokenizer, engine.max_model_len, engine.pages.capacity_tokens, engine.model.args.vocab_size,
                   engine.eos_token_ids, f"{c.dtype} on {c.device}: {c.dtype_reason}{quantized}")


class Backend(Protocol):
    num_waiting: int  # requests queued for admission
    stopped: str | None  # why it cannot serve, if it cannot

    async def submit(self, prompts: Seq[Prompt], sampling_params: Seq[SamplingParams]) -> RequestStreams:
        """All accepted (or RequestError raised, none runs), then their outputs."""

    def abort(self, request_id: int) -> None: ...

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (Unsupported where it cannot)."""


@dataclass
class Service:
    backend: Backend
    card: ModelCard
    max_waiting: int  # requests queued for admission, at most
    metrics: Metrics
    texts: TokenTexts = field(init=False)  # token ids as text, for logprobs
    draining: bool = False
    in_flight: int = 0  # streams open now

    def __post_init__(self) -> None:
        self.texts = TokenTexts(self.card.tokenizer)

    @classmethod
    def local(cls, llm: AsyncLLM, max_waiting: int) -> Service:
        return cls(llm, ModelCard.of(llm.engine), max_waiting, Metrics(llm.engine))

    def problem(self) -> str | None:
        """Why new requests cannot be served now, if they cannot."""
        if self.draining:
            return "the server is shutting down"
        return self.backend.stopped

    def admit(self, num_requests: int) -> None:
        if self.draining:
            raise Draining("the server is shutting down")
        waiting = self.backend.num_waiting
        if waiting + num_requests > self.max_waiting:
            raise Overloaded(f"{waiting} requests are waiting (at most {self.max_waiting}); try again later")

    async def generate(self, prompts: Seq[Prompt], params: Seq[SamplingParams]) -> RequestStreams:
        """Admit and submit all now (Overloaded, Draining, RequestError: none runs, before any
        response starts); then (index, output) as they come. Leaving early (a disconnect, a
        cancelled call) aborts what did not finish."""
        self.admit(len(prompts))
        streams = await self.backend.submit(prompts, list(params))
        return RequestStreams(streams.request_ids, self._observe(streams), streams.replicas)

    def abort(self, request_ids: Seq[int]) -> None:
        for rid in request_ids:  # finished ones are no-ops
            self.backend.abort(rid)

    def reset_prefix_cache(self) -> None:
        self.backend.reset_prefix_cache()

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

"""The Python API: LLM (generate, stream, chat) and the DeepSpeed-MII-style pipeline().

One background thread runs the engine loop; every caller's requests, from any thread,
are batched into the same forward passes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

from fastgen_compile.config import EngineConfig
from fastgen_compile.engine import Engine
from fastgen_compile.errors import RequestError
from fastgen_compile.sampling import SamplingParams
from fastgen_compile.sequence import RequestOutput, Sequence

log = logging.getLogger(__name__)


class EngineDied(RuntimeError):
    """The engine loop hit an error; pending requests cannot complete."""


class LLM:
    def __init__(self, model: str | None = None, **config):
        self.engine = Engine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer
        self._listeners: dict[int, queue.SimpleQueue] = {}
        self._work = threading.Condition()
        self._closed = False
        self._failure: Exception | None = None  # what stopped the engine loop, if anything
        self._loop_thread = threading.Thread(target=self._loop, name="fastgen-engine", daemon=True)
        self._loop_thread.start()

    # ---- public calls ----------------------------------------------------------------

    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> list[RequestOutput]:
        """All prompts go to the engine at once (continuous batching); outputs in prompt order."""
        if prompts is not None and prompt_token_ids is not None:
            raise RequestError("give prompts or prompt_token_ids, not both")
        if prompts is None and prompt_token_ids is None:
            raise RequestError("give prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        kwargs = [{"prompt": p} for p in prompts] if prompts is not None else [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        seqs = [self.engine.new_sequence(params=sampling_params, **kw) for kw in kwargs]  # all valid, or none runs
        listeners = [self._submit(seq) for seq in seqs]
        return [self._last(rid, q) for rid, q in listeners]

    def stream(self, prompt: str | None = None, sampling_params: SamplingParams | None = None, *,
               prompt_token_ids: list[int] | None = None) -> Iterator[RequestOutput]:
        """Yields one output per new token; closing or dropping it early aborts the request."""
        if (prompt is None) == (prompt_token_ids is None):
            raise RequestError("give exactly one of prompt and prompt_token_ids")
        rid, q = self._submit(self.engine.new_sequence(prompt, sampling_params, prompt_token_ids))
        return RequestStream(self, rid, self._follow(rid, q))

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.apply_chat_template(messages)], sampling_params)[0]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def close(self) -> None:
        with self._work:
            self._closed = True
            self._work.notify()
        self._loop_thread.join()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plumbing --------------------------------------------------------------------

    def _submit(self, seq: Sequence) -> tuple[int, queue.SimpleQueue]:
        if self._closed:
            raise EngineDied("this LLM is closed")
        q: queue.SimpleQueue = queue.SimpleQueue()
        with self._work:
            if self._failure is not None:
                raise EngineDied("the engine loop failed earlier; create a new LLM") from self._failure
            self._listeners[seq.seq_id] = q
            rid = self.engine.submit(seq)
            self._work.notify()
        return rid, q

    def _follow(self, rid: int, q: queue.SimpleQueue) -> Iterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = q.get()
                if isinstance(out, BaseException):
                    raise EngineDied("the engine loop failed") from out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._abort(rid)

    def _abort(self, rid: int, listening: bool = False) -> None:
        """listening: a thread still follows the request and is to get its final "abort" output."""
        self.engine.abort(rid)
        with self._work:
            if not listening:
                self._listeners.pop(rid, None)
            self._work.notify()

    def _last(self, rid: int, q: queue.SimpleQueue) -> RequestOutput:
        *_, last = self._follow(rid, q)
        return last

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._closed and not self.engine.has_work():
                    self._work.wait()
                if self._closed:
                    return
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - surface it to every waiting caller
                with self._work:
                    self._failure = e
                    for q in self._listeners.values():
                        q.put(e)
                    self._listeners.clear()
                log.exception("the engine loop stopped; every pending and later request fails with EngineDied")
                return
            with self._work:
                for out in outputs:
                    q = self._listeners.get(out.request_id)
                    if q is not None:
                        q.put(out)
                        if out.finished:
                            del self._listeners[out.request_id]


class RequestStream:
    """A request's outputs as an iterator; close() aborts it, even before the first token."""

    def __init__(self, llm: LLM, request_id: int, outputs: Iterator[RequestOutput]):
        self.llm, self.request_id, self._outputs, self._done = llm, request_id, outputs, False

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> RequestOutput:
        out = next(self._outputs)
        self._done = out.finished
        return out

    def abort(self) -> None:
        """Stop the request from any thread: the thread iterating it gets a last output with
        finish_reason "abort" (close() must run on the iterating thread)."""
        self.llm._abort(self.request_id, listening=True)

    def close(self) -> None:
        self._outputs.close()
        if not self._done:
            self.llm._abort(self.request_id)
            self._done = True

    def __del__(self) -> None:
        self.close()


class Pipeline:
    """DeepSpeed-MII's non-persistent pipeline: `pipe(prompts, max_new_tokens=...)`."""

    def __init__(self, llm: LLM):
        self.llm = llm

    def __call__(self, prompts: str | list[str], **sampling) -> list[RequestOutput]:
        return self.llm.generate(prompts, SamplingParams(**sampling))


def pipeline(model: str | None = None, **config) -> Pipeline:
    return Pipeline(LLM(model, **config))

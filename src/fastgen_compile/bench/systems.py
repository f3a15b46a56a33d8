"""The systems a benchmark compares, each behind the same streaming call.

fastgen-compile (SplitFuse, or prefill-first: the paper's comparison, same engine otherwise)
and transformers' continuous batching (`ContinuousBatchingManager`, streaming) as the outside
baseline; a running server through its OpenAI streaming API, against the same engine in-process.
All run greedy with eos ignored, so every system generates the same token counts.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Iterator

import torch

from fastgen_compile.bench.workload import Request
from fastgen_compile.entrypoints.llm import LLM
from fastgen_compile.models.loader import embedded_model_path
from fastgen_compile.request import SamplingParams

# engines users might compare against; none is a dependency, so each is skipped when absent
OTHER_ENGINES = ("vllm", "llama_cpp", "sglang")


def transformers_source(model: str | None) -> tuple[str, dict]:
    """from_pretrained's folder and kwargs for an HF folder or a .gguf file (default: the embedded model)."""
    path = model or embedded_model_path()
    if path.endswith(".gguf"):
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    return path, {}


def in_subprocess(fn: Callable, *args):
    """fn(*args) in a fresh process (fn importable, args picklable). Baselines run there, not on
    the caller's thread: a torch thread pool left on the main thread halves our engine thread's
    speed on a small CPU (docs/architecture.md, "The engine thread")."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def missing_engines() -> list[str]:
    return [name for name in OTHER_ENGINES if importlib.util.find_spec(name) is None]


class FastgenSystem:
    def __init__(self, policy: str, name: str | None = None, **engine):
        self.name = name or f"fastgen {policy}"
        self.llm = LLM(policy=policy, **engine)
        self.config = self.llm.engine.config

    def stream(self, request: Request) -> Iterator[int]:
        params = SamplingParams(max_new_tokens=request.max_new_tokens, temperature=0.0, ignore_eos=True)
        for out in self.llm.stream(prompt_token_ids=request.prompt_token_ids, sampling_params=params):
            yield len(out.delta_token_ids)

    def close(self) -> None:
        self.llm.close()


class ServerSystem:
    """A running `fastgen-compile serve` (or any OpenAI-compatible server) through its streaming
    completions API: what a remote client sees, HTTP and SSE included."""

    name = "fastgen server"

    def __init__(self, url: str, api_key: str | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600, limits=httpx.Limits(max_connections=256))
        self.model = self.http.get("/v1/models").raise_for_status().json()["data"][0]["id"]

    def stream(self, request: Request) -> Iterator[int]:
        """A chunk per engine output, nearly always one token; the usage chunk settles the count."""
        body = {"model": self.model, "prompt": request.prompt_token_ids, "max_tokens": request.max_new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        seen = 0
        with self.http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()}")
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                if event["choices"]:
                    seen += 1
                    yield 1
                elif (missing := event["usage"]["completion_tokens"] - seen) > 0:
                    yield missing

    def close(self) -> None:
        self.http.close()


class LlamaCppSystem:
    """llama.cpp through llama-cpp-python (an optional extra, built from source) on the same GGUF
    file, greedy. Its Python API decodes one sequence at a time, so concurrent requests queue."""

    name = "llama.cpp"

    def __init__(self, model: str | None, threads: int):
        from llama_cpp import Llama

        path = model or embedded_model_path()
        if not path.endswith(".gguf"):
            raise ValueError(f"llama.cpp runs GGUF files, not {path}")
        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=4096, verbose=False)
        self._lock = threading.Lock()

    def stream(self, request: Request) -> Iterator[int]:
        with self._lock:
            # generate() never stops at eos by itself: eos ignored, as for the others
            for count, _ in enumerate(self.llm.generate(request.prompt_token_ids, top_k=1, temp=0.0, reset=True), start=1):
                yield 1
                if count >= request.max_new_tokens:
                    return

    def close(self) -> None:
        self.llm.close()


class TransformersSystem:
    """transformers' ContinuousBatchingManager; one router thread hands each request its outputs."""

    name = "transformers CB"

    def __init__(self, model: str | None, dtype: str):
        from transformers import AutoModelForCausalLM, GenerationConfig

        folder, kwargs = transformers_source(model)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs).eval()
        # eos_token_id=-1: no stop token, as ignore_eos for our engine
        config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=self.model.config.eos_token_id)
        self.manager = self.model.init_continuous_batching(generation_config=config)
        self.manager.start()
        self._outputs: dict[str, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self._running = True
        self._router = threading.Thread(target=self._route, name="transformers-router", daemon=True)
        self._router.start()

    def _route(self) -> None:
        while self._running:
            out = self.manager.get_result(timeout=0.1)
            if out is not None:
                with self._lock:
                    q = self._outputs.get(out.request_id)
                if q is not None:
                    q.put(out)

    def stream(self, request: Request) -> Iterator[int]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            rid = f"bench-{len(self._outputs)}"
            self._outputs[rid] = q
        self.manager.add_request(request.prompt_token_ids, request_id=rid, max_new_tokens=request.max_new_tokens, streaming=True)
        seen = 0
        while True:
            out = q.get()
            if out.error:
                raise RuntimeError(out.error)
            if len(out.generated_tokens) > seen:
                yield len(out.generated_tokens) - seen
                seen = len(out.generated_tokens)
            if out.is_finished():
                return

    def close(self) -> None:
        self._running = False
        self._router.join()
        self.manager.stop(block=True)

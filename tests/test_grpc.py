"""The gRPC face of the real server (a subprocess of this module's own) through fastgen_compile.client:
unary, streaming, abort by request id, a cancelled call, bad values, and grpc.health.v1."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastgen_compile import RequestError, ServerError, client

PROMPTS = ["The capital of France is", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def rpc(server):
    with client(server.grpc_address) as c:
        yield c


def pages_used(server) -> float:
    text = httpx.get(server.http_url + "/metrics", timeout=30).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("fastgen_kv_pages_used ")))


def wait_for_free_pages(server, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while (used := pages_used(server)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return used


def test_unary_equals_streaming_and_the_http_api(rpc, server, hf_tokenizer):
    whole = rpc.generate(PROMPTS, max_new_tokens=16, temperature=0)
    pieces: list = []
    streamed = rpc.generate(PROMPTS, streaming_fn=pieces.extend, max_new_tokens=16, temperature=0)
    assert [r.generated_text for r in whole] == [r.generated_text for r in streamed]
    assert [r.token_ids for r in whole] == [r.token_ids for r in streamed]
    for prompt, r in zip(PROMPTS, whole):
        assert r.prompt_length == len(hf_tokenizer.encode(prompt))
        assert r.generated_length == len(r.token_ids) and r.finish_reason in ("stop", "length")
    assert sum(p.finish_reason is not None for p in pieces) == len(PROMPTS)  # once per prompt, on its last piece
    with httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60) as http:
        text = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}).json()["choices"][0]["text"]
    assert whole[0].generated_text == text


def test_a_repeated_prompt_reports_its_cached_prompt_length(rpc):
    prompt = "gRPC and the prefix cache: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    (first,) = rpc.generate(prompt, max_new_tokens=2, temperature=0)
    pieces: list = []
    (second,) = rpc.generate(prompt, streaming_fn=pieces.extend, max_new_tokens=2, temperature=0)
    assert first.cached_prompt_length == 0
    assert second.cached_prompt_length == (second.prompt_length - 1) // 16 * 16 > 0  # its full pages but the last token's (page size 16)


def test_abort_by_request_id(rpc, server):
    result: list = []
    first = threading.Event()

    def call() -> None:
        result.extend(rpc.generate("Tell me a very long story.", streaming_fn=lambda _: first.set(), request_id="long-story",
                                   max_new_tokens=1500, ignore_eos=True, timeout=120))

    thread = threading.Thread(target=call)
    thread.start()
    assert first.wait(60)
    assert rpc.abort("long-story")
    thread.join(60)
    (r,) = result
    assert r.finish_reason == "abort" and r.generated_length < 1500
    assert not rpc.abort("long-story")  # no longer running
    assert wait_for_free_pages(server) == 0


def test_abort_before_any_output(rpc, server):
    """An Abort that comes before the call's sequences have produced anything still ends them all."""
    result: list = []
    thread = threading.Thread(target=lambda: result.extend(rpc.generate(["Once upon a time", "Long ago"], request_id="early",
                                                                        max_new_tokens=500, ignore_eos=True, timeout=120)))
    thread.start()
    deadline = time.monotonic() + 30
    while not rpc.abort("early") and time.monotonic() < deadline:
        pass  # until the call is running
    thread.join(120)
    assert [r.finish_reason for r in result] == ["abort", "abort"] and all(r.generated_length < 500 for r in result)
    assert wait_for_free_pages(server) == 0


def test_a_taken_port_is_an_error():
    """No SO_REUSEPORT: a second server on the port fails instead of silently sharing its connections."""
    from fastgen_compile.serving.grpc_server import GrpcServer

    async def bind_twice() -> None:
        first = GrpcServer(lambda: None, "127.0.0.1", 0)
        await first.start()
        try:
            with pytest.raises(OSError, match="cannot bind"):
                GrpcServer(lambda: None, "127.0.0.1", first.port)
        finally:
            await first.stop(0)

    asyncio.run(bind_twice())


def test_a_cancelled_call_is_aborted(rpc, server):
    with pytest.raises(ServerError, match="DEADLINE_EXCEEDED"):
        rpc.generate("Tell me a very long story.", max_new_tokens=1500, ignore_eos=True, timeout=1.5)
    assert wait_for_free_pages(server) == 0


def test_bad_values(rpc):
    with pytest.raises(RequestError, match="temperature"):
        rpc.generate("Hi", temperature=-1)
    with pytest.raises(RequestError, match="empty"):
        rpc.generate([])
    with pytest.raises(RequestError, match="unknown sampling options: bogus"):
        rpc.generate("Hi", bogus=1)
    assert rpc.generate("Hi", max_new_tokens=2, ignore_eos=True)[0].generated_length == 2  # still serving


def test_health(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "fastgen.TextGeneration"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == health_pb2.HealthCheckResponse.SERVING

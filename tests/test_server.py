"""The real server (a subprocess, one for this module) through the official `openai` client,
httpx and curl-like raw requests: completions and chat, streaming and not, usage, echo +
logprobs against transformers, every error class, the API key, disconnects, and a load test."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import openai
import pytest
import torch

from fastgen_compile import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
GREEDY = dict(temperature=0, max_tokens=12)
SERVER_EXTRA_FLAGS = ("--no-grpc",)  # tests/test_grpc.py has the gRPC face


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    (card,) = client.models.list().data
    return card.id


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120) as c:
        yield c


def metric(http: httpx.Client, name: str, labels: str = "") -> float:
    text = http.get("/metrics").text
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_for_zero_load(http: httpx.Client, timeout: float = 30.0) -> dict[str, float]:
    names = ("fastgen_requests_running", "fastgen_requests_waiting", "fastgen_kv_pages_used")
    deadline = time.monotonic() + timeout
    while True:
        load = {n: metric(http, n) for n in names}
        if not any(load.values()) or time.monotonic() > deadline:
            return load
        time.sleep(0.1)


# ---- completions ----------------------------------------------------------------------

def test_greedy_completion_equals_the_in_process_engine(client, model, llm_compiled):
    reply = client.completions.create(model=model, prompt=PROMPTS[0], **GREEDY)
    (want,) = llm_compiled.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0))
    (choice,) = reply.choices
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    assert reply.usage.prompt_tokens == len(want.prompt_token_ids)
    assert reply.usage.completion_tokens == len(want.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_text_joins_to_the_non_streamed_text(client, model):
    whole = client.completions.create(model=model, prompt=PROMPTS[1], **GREEDY)
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[1], stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])  # once, on the last chunk
    assert all(c.usage is None for c in chunks)


def test_include_usage_adds_a_last_usage_chunk(client, model):
    whole = client.completions.create(model=model, prompt=PROMPTS[2], **GREEDY)
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[2], stream=True, stream_options={"include_usage": True}, **GREEDY))
    *content, last = chunks
    assert last.choices == [] and last.usage.model_dump() == {**whole.usage.model_dump()}
    assert all(c.usage is None for c in content)


def test_prompt_lists_token_ids_and_n(client, model, hf_tokenizer):
    ids = hf_tokenizer.encode(PROMPTS[0])
    by_text = client.completions.create(model=model, prompt=PROMPTS[0], **GREEDY)
    by_ids = client.completions.create(model=model, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    other = client.completions.create(model=model, prompt=PROMPTS[1], **GREEDY)
    many = client.completions.create(model=model, prompt=[PROMPTS[0], PROMPTS[1]], n=2, **GREEDY)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == [by_text.choices[0].text] * 2 + [other.choices[0].text] * 2  # choice k: prompt k // n
    assert many.usage.prompt_tokens == by_text.usage.prompt_tokens + other.usage.prompt_tokens  # each prompt once
    assert many.usage.completion_tokens == 2 * (by_text.usage.completion_tokens + other.usage.completion_tokens)


def test_stop_and_extras(client, model):
    text = client.completions.create(model=model, prompt=PROMPTS[0], **GREEDY).choices[0].text
    stop = text.strip()[:3]
    stopped = client.completions.create(model=model, prompt=PROMPTS[0], stop=[stop], **GREEDY).choices[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text and text.startswith(stopped.text)
    long = client.completions.create(model=model, prompt=PROMPTS[0], temperature=0, max_tokens=30,
                                     extra_body={"ignore_eos": True, "top_k": 5, "min_tokens": 30, "unknown_field": 1})
    assert long.usage.completion_tokens == 30 and long.choices[0].finish_reason == "length"


def test_echo_logprobs_match_transformers(client, model, hf_model, hf_tokenizer):
    """What lm-evaluation-harness's loglikelihood sends: token ids, echo, one new token, logprobs=1."""
    ids = hf_tokenizer.encode(PROMPTS[2])
    reply = client.completions.create(model=model, prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0)
    lp = reply.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=2e-3)
        assert max(lp.top_logprobs[p].values()) == pytest.approx(ref[p - 1].max().item(), abs=2e-3)
    assert lp.token_logprobs[-1] == pytest.approx(ref[-1].max().item(), abs=2e-3)  # greedy: the best token
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_streamed_logprobs_and_echo(client, model):
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[0], stream=True, echo=True, logprobs=2, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks)
    assert text.startswith(PROMPTS[0])
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens) == text
    assert all(len(top) >= 2 for c in chunks for top in c.choices[0].logprobs.top_logprobs if top is not None)


# ---- chat -----------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def test_chat_equals_the_in_process_engine(client, model, llm_compiled):
    reply = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_completion_tokens=16)
    want = llm_compiled.chat(MESSAGES, SamplingParams(max_new_tokens=16, temperature=0))
    assert reply.choices[0].message.content == want.text and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(want.prompt_token_ids) and reply.usage.completion_tokens == len(want.token_ids)


def test_chat_streaming(client, model):
    whole = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, usage = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content][-1] == whole.choices[0].finish_reason
    assert usage.choices == [] and usage.usage.total_tokens == whole.usage.total_tokens


def test_chat_logprobs(client, model):
    reply = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


# ---- prefix caching: usage, metrics, the reset -----------------------------------------

PAGE_SIZE = 16  # SERVER_FLAGS' --page-size


def cached_tokens(prompt_tokens: int) -> int:
    """What a repeated prompt finds cached: its full pages, less the page of its last token (that one is computed, for its logits)."""
    return (prompt_tokens - 1) // PAGE_SIZE * PAGE_SIZE


def long_text(tag: str) -> str:
    """~80 tokens that start with tag, so no other test's prompt shares its first page."""
    return f"{tag}: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 8)


def streamed_usage(http: httpx.Client, route: str, body: dict) -> dict:
    """The usage of a streamed request (include_usage): its last chunk's."""
    with http.stream("POST", route, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"] == [] and all("usage" not in e for e in events[:-1])
    return events[-1]["usage"]


def test_a_repeated_prompt_reports_its_cached_tokens_and_the_metrics_count_them(http):
    queries, hits = metric(http, "fastgen_prefix_cache_queries_total"), metric(http, "fastgen_prefix_cache_hits_total")
    body = {"prompt": long_text("Cached completion"), "max_tokens": 2, "temperature": 0}
    first = http.post("/v1/completions", json=body).json()["usage"]
    second = http.post("/v1/completions", json={**body, "n": 2}).json()["usage"]
    n = first["prompt_tokens"]
    assert n > 4 * PAGE_SIZE and second["prompt_tokens"] == n
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens_details"] == {"cached_tokens": cached_tokens(n)}  # its two choices share one prompt: counted once
    # each of the three sequences looked its whole prompt up; the two of the second request found it
    assert metric(http, "fastgen_prefix_cache_queries_total") == queries + 3 * n
    assert metric(http, "fastgen_prefix_cache_hits_total") == hits + 2 * cached_tokens(n)
    assert metric(http, "fastgen_kv_pages_cached") >= n // PAGE_SIZE


def test_the_streamed_usage_chunk_carries_cached_tokens_and_reset_forgets_them(server, http):
    messages = [{"role": "system", "content": long_text("Cached chat")}, {"role": "user", "content": "Say hi."}]
    body = {"messages": messages, "max_tokens": 2, "temperature": 0}
    first = streamed_usage(http, "/v1/chat/completions", body)
    second = streamed_usage(http, "/v1/chat/completions", body)
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens_details"] == {"cached_tokens": cached_tokens(first["prompt_tokens"])} and second["prompt_tokens_details"]["cached_tokens"]
    completion = streamed_usage(http, "/v1/completions", {"prompt": long_text("Cached chat"), "max_tokens": 2})
    assert completion["prompt_tokens_details"]["cached_tokens"] == 0  # the chat template put other tokens first

    with httpx.Client(base_url=server.http_url, timeout=30) as bare:
        assert bare.post("/reset_prefix_cache").status_code == 401  # an admin route: behind the key
    reset = http.post("/reset_prefix_cache")
    assert reset.status_code == 200 and reset.json() == {"status": "ok"}
    after = http.post("/v1/chat/completions", json=body).json()["usage"]
    assert after["prompt_tokens"] == first["prompt_tokens"] and after["prompt_tokens_details"] == {"cached_tokens": 0}


# ---- the other routes -----------------------------------------------------------------

def test_health_version_and_tokenizer_routes_need_no_key(server, hf_tokenizer):
    with httpx.Client(base_url=server.http_url, timeout=30) as bare:
        assert bare.get("/health").status_code == 200
        assert bare.get("/version").json()["version"]
        ids = bare.post("/tokenize", json={"prompt": PROMPTS[1]}).json()
        assert ids["tokens"] == hf_tokenizer.encode(PROMPTS[1]) and ids["count"] == len(ids["tokens"])
        assert bare.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == PROMPTS[1]
        info = bare.get("/tokenizer_info").json()
        assert info["eos_token"] == hf_tokenizer.eos_token and info["chat_template"]
        assert bare.get("/v1/models").status_code == 401


# ---- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"),
    ({"logprobs": 6}, "logprobs"), ({"stream_options": {"include_usage": True}}, "stream_options"), ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, None), ({"prompt": "word " * 9000}, None), ({"max_tokens": 100_000}, None),
])
def test_bad_values_get_400_naming_the_field(client, model, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": model, "prompt": "Hi", **fields})
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if param:
        assert param in error["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=1)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_api_key(server, model):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.http_url + "/v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.completions.create(model=model, prompt="Hi", max_tokens=1)
        assert caught.value.body["code"] == "invalid_api_key"


def test_malformed_bodies(http):
    cases = [
        (dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400),
        (dict(content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400),
        (dict(content=b'{"prompt": "Hi"}', headers={"Content-Type": "text/plain"}), 415),
        (dict(content=b'{"prompt": "' + b"x" * (9 << 20) + b'"}', headers={"Content-Type": "application/json"}), 413),
    ]
    for kwargs, status in cases:
        r = http.post("/v1/completions", **kwargs)
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # a bad request never disturbs the next one
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


# ---- disconnects and load -------------------------------------------------------------

LONG = {"prompt": "Tell me a very long story.", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}


def test_a_stream_left_mid_way_is_aborted(server, http):
    aborted = metric(http, "fastgen_requests_finished_total", '{finish_reason="abort"}')
    with httpx.Client(base_url=server.http_url, headers=http.headers, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
    assert wait_for_zero_load(http) == dict.fromkeys(("fastgen_requests_running", "fastgen_requests_waiting", "fastgen_kv_pages_used"), 0)
    assert metric(http, "fastgen_requests_finished_total", '{finish_reason="abort"}') == aborted + 1


def test_a_non_streaming_client_that_leaves_is_aborted(server, http):
    aborted = metric(http, "fastgen_requests_finished_total", '{finish_reason="abort"}')
    with httpx.Client(base_url=server.http_url, headers=http.headers, timeout=1.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=LONG)
    assert not any(wait_for_zero_load(http).values())
    assert metric(http, "fastgen_requests_finished_total", '{finish_reason="abort"}') == aborted + 1


def test_load_64_streaming_clients_a_third_leaving(server, http):
    """Bounded: 64 requests of at most 24 tokens, loopback only, a 120 s cap on the whole."""
    rng = random.Random(0)
    leavers = set(rng.sample(range(64), 21))

    async def one(c: httpx.AsyncClient, i: int) -> str | None:
        body = {"prompt": f"Request {i}: write about the number {i}.", "max_tokens": 24, "temperature": 0, "stream": True}
        leave_after = rng.randint(0, 6) if i in leavers else None
        seen, reason = 0, None
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if leave_after is not None and seen >= leave_after:
                    return None  # leaving the block closes the connection mid-stream
                seen += 1
                reason = json.loads(line[6:])["choices"][0]["finish_reason"] or reason
        return reason

    async def main() -> list[str | None]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.http_url, headers=http.headers, timeout=120, limits=limits) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(64))), 120)

    reasons = asyncio.run(main())
    for i, reason in enumerate(reasons):
        if i not in leavers:
            assert reason in ("stop", "length"), (i, reason)
    assert not any(wait_for_zero_load(http).values())
    assert metric(http, "fastgen_recompiles_total") == 0  # every step of this module ran in a warm graph
    assert http.post("/v1/completions", json={"prompt": "Still there?", "max_tokens": 2, "ignore_eos": True}).json()["usage"]["completion_tokens"] == 2

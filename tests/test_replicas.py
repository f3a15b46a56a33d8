"""`fastgen-compile serve --replicas 2` on a real local Ray Serve instance (a subprocess of this
module's own, loopback only): the `openai` client and the step-7 gRPC client, prompts spread
over both replicas, a replica killed mid-load, start-up failures, and no process left behind."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import openai
import psutil
import pytest

from conftest import API_KEY, start_server, stop_server_process
from fastgen_compile import RequestError, SamplingParams, client
from fastgen_compile.serving.openai_api import REPLICA_HEADER

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,", "Water boils at"]
SERVER_EXTRA_FLAGS = ("--replicas", "2")
REPLICA_TITLE = "ServeReplica:fastgen:EngineReplica"  # Ray's process title of an engine replica


@pytest.fixture(scope="module")
def ray_server(server):
    """The module's server, and at the end: no process it started is left."""
    started: set[int] = set()
    yield server, started
    stop_server_process(server.proc)
    deadline = time.monotonic() + 30
    while (left := [pid for pid in started if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [psutil.Process(pid).cmdline() for pid in left]


def descendants(server, started: set[int]) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            found.append((p, " ".join(p.cmdline())))
        except psutil.Error:  # ended while we looked
            continue
    started.update(p.pid for p, _ in found)
    return [p for p, title in found if REPLICA_TITLE in title]


@pytest.fixture(scope="module")
def oai(ray_server) -> openai.OpenAI:
    server, _ = ray_server
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(ray_server):
    server, _ = ray_server
    with httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def test_two_replicas_run_as_processes_and_share_the_graphs(ray_server, http):
    server, started = ray_server
    assert "2 replicas x 1 threads on a local Ray instance" in server.ready_line
    assert len(descendants(server, started)) == 2
    # /health counts what Ray Serve's controller reports, polled each second: it may lag the ready line by a poll
    deadline = time.monotonic() + 30
    while (health := http.get("/health").json())["replicas"]["running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert health == {"status": "ok", "replicas": {"running": 2, "target": 2}}


def test_the_openai_client_gets_the_in_process_engines_greedy_text(oai, llm_compiled):
    (card,) = oai.models.list().data
    reply = oai.completions.create(model=card.id, prompt=PROMPTS, temperature=0, max_tokens=10)
    want = llm_compiled.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0))
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == [w.text for w in want]
    assert reply.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    chat = oai.chat.completions.create(model=card.id, messages=[{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=6, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices)


def test_a_multi_prompt_request_is_spread_over_both_replicas(http):
    seen: set[str] = set()
    for _ in range(5):  # the router picks by load; two idle replicas take four prompts between them
        r = http.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 2})
        assert r.status_code == 200
        served = r.headers[REPLICA_HEADER].split(",")
        assert 1 <= len(served) <= 2
        seen.update(served)
        if len(seen) == 2:
            break
    assert len(seen) == 2


def test_the_grpc_proxy_answers_the_step7_client(ray_server):
    server, _ = ray_server
    with client(server.grpc_address) as rpc:
        whole = rpc.generate(PROMPTS[:2], max_new_tokens=6, temperature=0)
        pieces: list = []
        streamed = rpc.generate(PROMPTS[:2], streaming_fn=pieces.append, max_new_tokens=6, temperature=0)
        assert [r.generated_text for r in streamed] == [r.generated_text for r in whole]
        assert all(r.finish_reason == "length" and r.generated_length == 6 for r in whole) and len(pieces) >= 6
        with pytest.raises(RequestError, match="the prompt is empty"):
            rpc.generate([""], max_new_tokens=3)
        assert rpc.abort("no-such-call") is False


def stream_one(url: str, max_tokens: int) -> tuple[str, str]:
    """One streamed greedy completion: ('ok', its text) or ('error', the message); bounded by its timeout."""
    body = {"prompt": "Count to a hundred:", "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0}
    texts, reason = [], None
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return "error", r.read().decode()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return "error", event["error"]["message"]
            texts.append(event["choices"][0]["text"])
            reason = event["choices"][0]["finish_reason"]
    assert reason == "length", reason
    return "ok", "".join(texts)


def test_a_killed_replica_fails_its_requests_promptly_and_is_restarted(ray_server, http):
    server, started = ray_server
    before = descendants(server, started)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream_one, server.http_url, 48) for _ in range(6)]
        time.sleep(3)  # all streaming
        victim = before[0]
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.monotonic()
        results = [f.result(timeout=90) for f in futures]
        ended_in = time.monotonic() - t0
    ok = {text for kind, text in results if kind == "ok"}
    errors = [message for kind, message in results if kind == "error"]
    assert len(ok) == 1  # the other replica's requests complete, all with the same greedy text
    assert all("died while serving this request" in e for e in errors), errors
    assert ended_in < 60
    deadline = time.monotonic() + 120  # Ray Serve restarts the replica: a new process, two running again
    while time.monotonic() < deadline:
        now = descendants(server, started)
        health = http.get("/health").json()
        if len(now) == 2 and victim.pid not in {p.pid for p in now} and health["replicas"]["running"] == 2:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the replica was not restarted: {health}")
    assert stream_one(server.http_url, 48) == ("ok", ok.pop())  # served again, the same greedy text


def test_a_bad_model_path_is_one_error_line_before_ray_starts(tmp_path):
    with pytest.raises(RuntimeError, match="error: the model could not be loaded: .*missing.gguf"):
        start_server("--replicas", "2", "--model", str(tmp_path / "missing.gguf"), timeout=60)


def test_a_replica_that_cannot_start_is_one_error_line_in_bounded_time():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="error: the model could not be served: .*") as caught:
        start_server("--replicas", "1", "--kv-pages", "1", "--startup-timeout", "120", timeout=200)
    assert time.monotonic() - t0 < 200
    assert "KV" in str(caught.value) or "pages" in str(caught.value)

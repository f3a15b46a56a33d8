"""The server's life: start-up failures (one error line, exit 2), the queue bound (429), and
SIGTERM (in-flight requests finish, new ones get 503, exit 0). A server of this module's own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx

from conftest import API_KEY, serve_command, start_server, stop_server_process


def run_serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(serve_command(*flags), capture_output=True, text=True, timeout=120, start_new_session=True)


def test_a_port_in_use_is_one_error_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_serve("--port", str(taken.getsockname()[1]), "--no-grpc")
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [result.stderr.strip().splitlines()[-1]]
    assert "Address already in use" in result.stderr


def test_an_unloadable_model_is_one_error_line(tmp_path):
    result = run_serve("--port", "0", "--no-grpc", "--model", str(tmp_path / "missing.gguf"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.gguf" in errors[0]


def test_queue_bound_then_sigterm_drains():
    server = start_server("--no-grpc", "--max-waiting", "2", "--grace", "60")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        with httpx.Client(base_url=server.http_url, headers=headers, timeout=60) as http:
            full = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "n": 3})
            assert full.status_code == 429 and full.headers["Retry-After"] == "1"
            assert full.json()["error"]["type"] == "rate_limit_error"

            # a long stream in flight when SIGTERM comes: it still finishes, with its finish_reason
            reasons, first_chunk = [], threading.Event()

            def in_flight() -> None:
                body = {"prompt": "Count to a hundred:", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
                with httpx.Client(base_url=server.http_url, headers=headers, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            first_chunk.set()
                            reasons.append(json.loads(line[6:])["choices"][0]["finish_reason"])

            thread = threading.Thread(target=in_flight)
            thread.start()
            assert first_chunk.wait(60)
            os.killpg(server.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (r := http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})).status_code != 503:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.05)
            assert r.json()["error"]["message"] == "the server is shutting down"
            assert http.get("/health").status_code == 503
            thread.join(60)
        assert reasons[-1] == "length" and not any(reasons[:-1])
        assert server.proc.wait(60) == 0
        assert "draining" in server.stderr()
    finally:
        stop_server_process(server.proc)

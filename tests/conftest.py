"""Session-wide fixtures: the embedded model, its transformers twin, and two engines.

Everything heavy is built once per test session: the compiled engine compiles each
bucket's graph at start (~30 s), and every engine-level test shares it.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest
import torch

# The engines' shape. Small buckets make the SplitFuse token budget (the largest
# bucket, 64) split long prompts over many steps and fuse them with decodes.
# KV_PAGES holds every prompt of tests/test_equality.py at once (+24 new tokens each,
# + the scratch page); test_equality asserts that, so a longer prompt set fails loudly.
KV_PAGES = 128
ENGINE_CONFIG = dict(dtype="float32", buckets=(16, 64), decode_rows=16, page_size=16, q_block=16, kv_pages=KV_PAGES, max_seqs=16, strict_recompiles=True,
                     itl_target_ms=0)  # a fixed budget: step composition is deterministic (test_step_costs.py has the SLA-aware one)


@pytest.fixture(scope="session", autouse=True)
def graphs_dir(tmp_path_factory):
    """Persisted graphs go to a folder of this session, never the checkout's graphs/."""
    from fastgen_compile.artifacts import ROOT_ENV

    folder = tmp_path_factory.mktemp("graphs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ROOT_ENV, str(folder))
        yield folder


@pytest.fixture(scope="session")
def engine_config() -> dict:
    return dict(ENGINE_CONFIG)


@pytest.fixture(scope="session")
def embedded_path() -> str:
    from fastgen_compile.models.loader import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_tokenizer(embedded_path):
    from transformers import AutoTokenizer

    folder, name = os.path.split(embedded_path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def hf_model(embedded_path):
    """transformers' own reading of the same GGUF file, dequantized to fp32: the reference."""
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(embedded_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


def _make_llm(**overrides):
    from fastgen_compile import LLM

    return LLM(**{**ENGINE_CONFIG, **overrides})


@pytest.fixture(scope="session")
def llm_compiled():
    llm = _make_llm(compile=True, warmup=True)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def llm_eager():
    llm = _make_llm(compile=False)
    yield llm
    llm.close()


def _idle_free_pages(llm) -> int:
    """Free pages of an engine that holds no sequence: all but the scratch page."""
    from fastgen_compile.engine.pages import SCRATCH_PAGES

    return llm.engine.pages.num_pages - SCRATCH_PAGES


def _wait_idle(llm, timeout: float = 120.0) -> bool:
    """Poll until the engine has no work, every KV page is back on the free list and the
    loop thread has handed out every request's last output (no listener left)."""
    deadline = time.monotonic() + timeout
    idle = _idle_free_pages(llm)
    while time.monotonic() < deadline:
        if not llm.engine.has_work() and llm.engine.pages.num_free == idle and not llm.loop.num_pending:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def idle_free_pages():
    return _idle_free_pages


@pytest.fixture(scope="session")
def wait_idle():
    return _wait_idle


# ---- the real server, a subprocess ------------------------------------------------------

SERVER_FLAGS = ["--dtype", "float32", "--buckets", "16", "64", "--decode-rows", "16", "--page-size", "16", "--q-block", "16",
                "--kv-pages", str(KV_PAGES), "--max-seqs", "16", "--itl-target-ms", "0"]  # ENGINE_CONFIG as flags
API_KEY = "test-key-123"


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    http_url: str
    grpc_address: str | None
    api_key: str | None
    ready_line: str
    stderr_path: str

    def stderr(self) -> str:
        with open(self.stderr_path) as f:
            return f.read()


def serve_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "fastgen_compile.cli", "serve", *SERVER_FLAGS, *flags]


def start_server(*flags: str, api_key: str | None = API_KEY, timeout: float = 300.0) -> ServerProcess:
    """`fastgen-compile serve` on free loopback ports, in its own process group; returns once its ready line is out."""
    stderr = tempfile.NamedTemporaryFile("w", prefix="fastgen-serve-", suffix=".log", delete=False)
    key = ["--api-key", api_key] if api_key else []
    proc = subprocess.Popen(serve_command("--port", "0", "--grpc-port", "0", *key, *flags), stdout=subprocess.PIPE, stderr=stderr,
                            text=True, start_new_session=True, env={**os.environ, "FASTGEN_API_KEY": ""})
    lines: queue.SimpleQueue = queue.SimpleQueue()

    def read_stdout() -> None:  # keeps the pipe drained for the server's whole life
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if line.startswith("ready:"):
            http = re.search(r"at (http://\S+) ", line).group(1)
            grpc = re.search(r"gRPC at (\S+?)[;,\s]", line)
            return ServerProcess(proc, http, grpc and grpc.group(1), api_key, line, stderr.name)
    stop_server_process(proc)
    raise RuntimeError(f"the server did not start: {open(stderr.name).read()[-3000:]}")


def stop_server_process(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM to its process group (it drains and exits); SIGKILL if it does not."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def server(request):
    """One real server per test module that asks for it, with the module's SERVER_EXTRA_FLAGS."""
    s = start_server(*getattr(request.module, "SERVER_EXTRA_FLAGS", ()))
    yield s
    stop_server_process(s.proc)

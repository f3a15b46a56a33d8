"""Tensor parallelism on tiny checkpoints of other families (Qwen2's QKV biases, Mixtral's experts,
OPT's heads without GQA, biases everywhere and learned positions, Phi-3's fused checkpoint tensors), and the workers' lifecycle: a
killed worker fails every pending request, and no worker outlives rank 0 however it ends.

Every test that opens a tensor-parallel engine closes it (one is open per process at a time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import start_server, stop_server_process
from fastgen_compile import LLM, SamplingParams
from fastgen_compile.engine.engine import Engine
from fastgen_compile.errors import EngineDied
from test_model import ENGINE_KW, VARIANTS, Request, assert_matches_hf, drive, greedy_through_engine_step, make_tiny, random_ids
from tiny_llama import one_torch_thread, save_tiny, tiny_config  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# an eager engine over a tiny Qwen2: the lifecycle tests need workers, not speed
LIFECYCLE = dict(dtype="float32", compile=False, buckets=(16, 32), decode_rows=0, page_size=8, q_block=16, kv_pages=64, max_seqs=4)


@pytest.mark.parametrize("name, compiled", [("qwen2", True), ("mixtral", False), ("opt-pre-norm", False), ("phi3-longrope", False)])
def test_family_matches_transformers_and_one_process(name, compiled, tmp_path):
    """Logits of every position (prefill, a chunk beside a decode, decodes) within fp32 tolerance of
    transformers at TP=2; greedy tokens of split and fused prompts equal TP=1's."""
    kw = dict(compile=True, buckets=(16,), page_size=16, strict_recompiles=True) if compiled else {}
    tiny = make_tiny(tmp_path, name, tensor_parallel_size=2, **kw)
    prompts = [random_ids(n, seed=20 + n) for n in (7, 40, 3)]
    try:
        a = Request(random_ids(12 + 8, seed=11), prompt_len=12)
        b = Request(random_ids(9 + 5, seed=12), prompt_len=9, add_at_step=1)
        log = drive(tiny.engine, [a, b])
        for r in (a, b):
            assert_matches_hf(tiny, r, log)
        two = greedy_through_engine_step(tiny.engine, prompts, 10)
        if compiled:
            (worker,) = tiny.engine.tp.worker_stats()
            assert tiny.engine.compiler.recompiles_since_warmup() == 0 and worker["recompiles_since_warmup"] == 0
            assert worker["graphs_compiled"] == tiny.engine.compiler.graphs_compiled == 1
    finally:
        tiny.engine.close()
    one = greedy_through_engine_step(Engine(model=str(tmp_path), **(ENGINE_KW | VARIANTS[name].engine | kw)), prompts, 10)
    assert [tokens for tokens, _ in two] == [tokens for tokens, _ in one]


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2")
    save_tiny(folder, tiny_config("qwen2"))
    return folder


def gone(pid: int) -> bool:
    """Exited (a zombie counts: whoever reaps it, it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return False


def test_killed_worker_fails_every_pending_request(qwen_folder):
    llm = LLM(str(qwen_folder), tensor_parallel_size=2, **LIFECYCLE)
    (worker,) = llm.engine.tp.workers
    try:
        params = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
        stream = llm.stream(prompt_token_ids=random_ids(10, seed=1), sampling_params=params)
        other = llm.stream(prompt_token_ids=random_ids(30, seed=2), sampling_params=params)
        next(stream)
        os.kill(worker.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineDied, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 30
        with pytest.raises(EngineDied):
            list(other)
        with pytest.raises(EngineDied):
            llm.generate(prompt_token_ids=[[5, 6]], sampling_params=params)
    finally:
        llm.close()
    assert worker.proc.poll() is not None


# rank 0 in a process of its own: it prints its worker's pid, then leaves without closing the
# engine (the interpreter's exit must end the worker) or is killed (the worker must notice)
RANK0 = """
import json, os, signal, sys
from fastgen_compile import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2, **json.loads(sys.argv[3]))
print(llm.engine.tp.workers[0].proc.pid, flush=True)
if sys.argv[2] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("how", ["exits", "killed"])
def test_no_worker_outlives_rank0(how, qwen_folder):
    done = subprocess.run([sys.executable, "-c", RANK0, str(qwen_folder), how, json.dumps(LIFECYCLE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == (-signal.SIGKILL if how == "killed" else 0), done.stderr[-2000:]
    assert wait_gone(int(done.stdout.split()[0])), f"the worker outlived rank 0 ({how})"


def test_server_sigterm_ends_its_workers(qwen_folder):
    server = start_server("--model", str(qwen_folder), "--no-compile", "--page-size", "8", "--tensor-parallel", "2", api_key=None)
    try:
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == server.proc.pid]
        workers = [pid for pid in children if b"engine.parallel" in _cmdline(pid)]
        assert len(workers) == 1
        body = json.dumps({"model": qwen_folder.name, "prompt": [5, 17, 40], "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(f"{server.http_url}/v1/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                assert json.load(reply)["usage"]["completion_tokens"] == 4
        except urllib.error.HTTPError as e:
            raise AssertionError(e.read()) from e
    finally:
        assert stop_server_process(server.proc) == 0, server.stderr()[-2000:]
    assert wait_gone(workers[0])


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""
